"""What edge methods read from a run: the prompt pairs batched by length and every sender's
output; one forward and backward with the gradients at every receiver's read (`grad_pass`; grads.py
keeps them in head space); the leading positions a batch of pairs shares, run once (`Prefix`).

Sender outputs [b, s, n_senders, d]: EMB is the residual stream entering block 0 (token and
position embeddings, Gemma's sqrt(d_model) scale included), a head's output is z_h · W_O[h]
(its bias-free write; through a post-norm, times the norm's gain / rms of the block's raw
attention output in the same run: heads' shares of hook_attn_out), an MLP's is the block's
output (after its post-norm). Biases are the same in every run, so they cancel in every
difference.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch

from tdb_agent.engine import Engine
from tdb_agent.engine.component_sites import EMBED_SITE, kind_site, receiver_site, resid_site
from tdb_agent.errors import TdbError
from tdb_agent.ops.decompose import frozen_norms, post_norm_factor
from tdb_agent.ops.edges.graph import check_supported
from tdb_agent.ops.edges.heads import head_read
from tdb_agent.ops.edges.reads import NormMode
from tdb_agent.ops.metrics import MetricName, make_metric
from tdb_agent.ops.runs import RunCache, get_means, reference_documents


class Pair(Protocol):
    """A prompt pair (circuits.pairs.PromptPair has this shape)."""

    prompt: str
    corrupted_prompt: str | None
    target: str
    distractor: str | None


@dataclass
class PairGroup:
    """Pairs of one token length, batched together."""

    index: list[int]
    ids: torch.Tensor  # [n, s]
    corrupted: torch.Tensor | None  # [n, s]
    target: torch.Tensor  # [n]
    distractor: torch.Tensor | None  # [n]


def group_pairs(engine: Engine, pairs: Sequence[Pair], need_corrupted: bool,
                metric: MetricName | None = None) -> tuple[list[PairGroup], MetricName]:
    """Tokenise the pairs, check them, and group them by length (one batch per length)."""
    check_supported(engine)
    if not pairs:
        raise TdbError("edge methods need at least one prompt pair")
    name: MetricName = metric or ("logit_diff" if all(p.distractor for p in pairs) else "logprob")
    rows: dict[int, list] = {}
    for i, p in enumerate(pairs):
        m = make_metric(engine, p.target, p.distractor if name == "logit_diff" else None, name)
        ids = engine.to_tokens(p.prompt)
        cids = None
        if need_corrupted:
            if not p.corrupted_prompt:
                raise TdbError(f"pair {i} has no corrupted_prompt; the corrupted reference needs one for every "
                               "pair (or use reference='mean')")
            cids = engine.to_tokens(p.corrupted_prompt)
            if cids.shape[1] != ids.shape[1]:
                raise TdbError(f"pair {i}: the corrupted prompt has {cids.shape[1]} tokens but the prompt has "
                               f"{ids.shape[1]}; edge patching needs prompts of the same length")
        rows.setdefault(ids.shape[1], []).append((i, ids, cids, m))
    groups = []
    dev = engine.device
    for rs in rows.values():
        groups.append(PairGroup(
            index=[r[0] for r in rs], ids=torch.cat([r[1] for r in rs]),
            corrupted=torch.cat([r[2] for r in rs]) if need_corrupted else None,
            target=torch.tensor([r[3].target_id for r in rs], device=dev),
            distractor=torch.tensor([r[3].distractor_id for r in rs], device=dev) if name == "logit_diff" else None))
    return groups, name


def metric_rows(logits: torch.Tensor, target: torch.Tensor, distractor: torch.Tensor | None) -> torch.Tensor:
    """The metric of each row from last-position logits [n, vocab] (docs/DESIGN.md §4)."""
    t = logits.gather(-1, target[:, None])[:, 0]
    if distractor is not None:
        return t - logits.gather(-1, distractor[:, None])[:, 0]
    return t.float() - torch.logsumexp(logits.float(), dim=-1)


@dataclass
class SenderActs:
    """What sender outputs are made of: the residual stream entering block 0 [.., d], each
    layer's z [.., H, d_head] (a head's output is z_h · W_O[h]) and MLP output [.., d]. From a
    run ([b, s, ..]) or corpus means (no batch and position axes). Where a post-norm follows
    attention (a head's write is not linear in z), the sender outputs themselves instead:
    `full` [b, s, n_senders, d] or [n_senders, d]."""

    emb: torch.Tensor | None = None
    z: list[torch.Tensor] | None = None
    mlp: list[torch.Tensor] | None = None
    full: torch.Tensor | None = None

    def __sub__(self, other: "SenderActs") -> "SenderActs":
        """In float32: in a bf16 model a difference of ~1 % of a value keeps about one bit."""
        def sub(a, b):
            return a.float() - b.float()
        if self.full is not None:
            return SenderActs(full=sub(self.full, other.full))
        return SenderActs(sub(self.emb, other.emb), [sub(a, b) for a, b in zip(self.z, other.z)],
                          [sub(a, b) for a, b in zip(self.mlp, other.mlp)])

    @classmethod
    def from_acts(cls, engine: Engine, acts: dict[str, torch.Tensor], rows: slice = slice(None)) -> "SenderActs":
        acts = {k: acts[k][rows].detach() for k in sender_sites(engine)}
        if post_norm_heads(engine):  # the writes made in float32: differences of them are taken next
            return cls(full=senders_from(engine, {k: v.float() for k, v in acts.items()}))
        L = engine.spec.n_layers
        return cls(acts[EMBED_SITE], [acts[kind_site("head", l)] for l in range(L)],
                   [acts[kind_site("mlp", l)] for l in range(L)])


def post_norm_heads(engine: Engine) -> bool:
    """Whether a post-norm follows attention (head writes are then not linear in z)."""
    return engine.adapter.post_attn_norm(0) is not None


def sender_sites(engine: Engine) -> list[str]:
    sites = [EMBED_SITE]
    for l in range(engine.spec.n_layers):
        sites += [kind_site("head", l), kind_site("mlp", l)]
    return sites


def head_outputs(engine: Engine, layer: int, z: torch.Tensor) -> torch.Tensor:
    """Each head's write z_h · W_O[h]: [..., heads, d_head] -> [..., heads, d_model]; through a
    post-norm, times its gain / rms(raw attention output of this z) (so they sum to hook_attn_out)."""
    out = torch.einsum("...hk,hkd->...hd", z, engine.adapter.W_O(layer).to(z.dtype))
    f = post_norm_factor(engine, "attn", layer, z.reshape(-1, *z.shape[-2:]))
    return out if f is None else out * f.view(*z.shape[:-2], 1, -1).to(out.dtype)


def senders_from(engine: Engine, acts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sender outputs [b, s, n_senders, d] (or [n_senders, d] from means) from captured sites."""
    parts = [acts[EMBED_SITE].unsqueeze(-2)]
    for l in range(engine.spec.n_layers):
        parts += [head_outputs(engine, l, acts[kind_site("head", l)]), acts[kind_site("mlp", l)].unsqueeze(-2)]
    return torch.cat(parts, dim=-2)


@torch.no_grad()
def run_senders(engine: Engine, ids: torch.Tensor) -> torch.Tensor:
    """Sender outputs of a plain run of `ids` [b, s] -> [b, s, n_senders, d]."""
    return corrupted_senders(engine, ids)[0]


@dataclass
class Prefix:
    """The leading positions that a pair's clean and corrupted prompts share (in every row of a
    batch): their keys/values per layer, [rows, kv_heads, offset, d_head]. A causal model
    computes the same values there in the clean run, the corrupted run and every input between
    them, so each sender's reference − clean difference is 0 at those positions and no edge has
    a score there: the corrupted run (`reference_run`) keeps these keys/values, and the clean
    passes run the positions after them only, continuing from them (their backward too)."""

    offset: int
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]

    def repeat(self, k: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The keys/values for k stacked copies of the rows (EAP-IG's steps in one pass)."""
        return {l: (stack_rows(a, k), stack_rows(b, k)) for l, (a, b) in self.kv.items()}

    def rows(self, index: torch.Tensor) -> "Prefix":
        """The prefix of the rows `index` (exact patching's rows: edge set × pair)."""
        return Prefix(self.offset, {l: (a[index], b[index]) for l, (a, b) in self.kv.items()})


def stack_rows(t: torch.Tensor, k: int) -> torch.Tensor:
    """k copies of the rows of t, stacked step-major (the batch of k steps in one pass)."""
    return t.repeat(k, *([1] * (t.dim() - 1))) if k > 1 else t


def shared_positions(ids: torch.Tensor, corrupted: torch.Tensor) -> int:
    """How many leading positions are the same token in every row of both [b, s] (at most s - 1:
    the last position, where the metric reads, is always run)."""
    same = (ids == corrupted).all(0).int().cumprod(0)
    return min(int(same.sum()), ids.shape[1] - 1)


def run_keeping_prefix(engine: Engine, ids: torch.Tensor, sites: list[str], shared: int,
                       last_mlp_tail: bool = False) -> tuple[dict[str, torch.Tensor], Prefix | None]:
    """A plain run of `ids` [b, s]: `sites` at positions `shared`.. and, when shared > 0, the
    keys/values of the positions before (`Prefix`), which runs of prompts sharing them continue."""
    L = engine.spec.n_layers
    kv_sites = [receiver_site(x, l) for l in range(L) for x in "kv"] if shared else []
    with last_mlp_tail_only(engine) if last_mlp_tail else nullcontext():
        _, acts = engine.run_with_cache(ids, list(dict.fromkeys(sites + kv_sites)), logit_positions=[-1],
                                        logit_ids=[0])
    if not shared:
        return {k: acts[k] for k in sites}, None
    kv = {l: (acts[receiver_site("k", l)][:, :shared].transpose(1, 2),
              acts[receiver_site("v", l)][:, :shared].transpose(1, 2)) for l in range(L)}
    return {k: acts[k][:, shared:] for k in sites}, Prefix(shared, kv)


@torch.no_grad()
def reference_run(engine: Engine, corrupted: torch.Tensor, shared: int = 0,
                  last_mlp_tail: bool = True) -> tuple[SenderActs, Prefix | None]:
    """EAP's corrupted run of `corrupted` [b, s]: the sender parts at positions `shared`.. and,
    when shared > 0, the keys/values of the positions before (those the clean prompts share:
    `Prefix`), which the clean passes continue. last_mlp_tail: the last MLP at the last
    position only (`last_mlp_tail_only`: its output elsewhere is read by no metric)."""
    acts, prefix = run_keeping_prefix(engine, corrupted, sender_sites(engine), shared, last_mlp_tail)
    return SenderActs.from_acts(engine, acts), prefix


@torch.no_grad()
def corrupted_senders(engine: Engine, corrupted: torch.Tensor, shared: int = 0) -> tuple[torch.Tensor, Prefix | None]:
    """Exact patching's reference: the corrupted run's sender outputs at positions `shared`..,
    [b, s - shared, n_senders, d], and the keys/values of the positions before (`Prefix`)."""
    acts, prefix = run_keeping_prefix(engine, corrupted, sender_sites(engine), shared)
    return senders_from(engine, acts), prefix


def continue_prefix(prefix: Prefix | None, k: int = 1) -> dict:
    """The forward's keyword arguments continuing `prefix` (k stacked copies of its rows)."""
    return {} if prefix is None else {"position_offset": prefix.offset, "prefix_kv": prefix.repeat(k)}


@contextmanager
def last_mlp_tail_only(engine: Engine) -> Iterator[None]:
    """Run the last block's MLP at the last position only (0 at the others; call under
    engine.lock). For EAP's passes, whose metric reads the last position's logits: the last
    MLP's output at another position reaches only that position's logits, so its gradient
    there is exactly 0 and so is its edge's share of the score (its sender value, kept as 0,
    meets only that gradient), and the gradient at its input there is 0 with or without it.
    The scores are the same; each pass skips (s - 1)/s of that MLP's forward and backward."""
    mlp = engine.adapter.mlp(engine.spec.n_layers - 1)
    run = mlp.forward

    def tail(x, *args, **kwargs):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] < 2:
            return run(x, *args, **kwargs)
        out = run(x[:, -1:], *args, **kwargs)
        full = out.new_zeros(*x.shape[:2], out.shape[-1])
        full[:, -1:] = out
        return full
    own = mlp.__dict__.get("forward")  # an instance-level forward (accelerate's device-map hook) stays
    mlp.forward = tail
    try:
        yield
    finally:
        if own is None:
            del mlp.forward
        else:
            mlp.forward = own


def mean_acts(engine: Engine, cache: RunCache | None) -> SenderActs:
    """The sender parts averaged over the reference corpus (ops/runs.py)."""
    if post_norm_heads(engine):
        return SenderActs(full=mean_senders(engine, cache))
    return SenderActs.from_acts(engine, get_means(engine, sender_sites(engine), cache))


def mean_senders(engine: Engine, cache: RunCache | None) -> torch.Tensor:
    """Sender outputs averaged over the reference corpus (ops/runs.py): [n_senders, d]. Through
    a post-norm a head's write is not linear in z (its scale is per token): the writes
    themselves are averaged, token by token."""
    if not post_norm_heads(engine):
        return senders_from(engine, get_means(engine, sender_sites(engine), cache))
    total, n = 0.0, 0
    for text in reference_documents(engine):
        s = run_senders(engine, engine.to_tokens(text, truncate=True))
        total, n = total + s.float().sum((0, 1)), n + s.shape[0] * s.shape[1]  # float32 sums (bf16 engines)
    return total / n


def mean_embedding(engine: Engine, cache: RunCache | None) -> torch.Tensor:
    """The mean token embedding (`hook_embed`) over the reference corpus: [d]."""
    return get_means(engine, ["hook_embed"], cache)["hook_embed"]


def _norms(engine: Engine) -> list[torch.nn.Module]:
    a = engine.adapter
    return [m for l in range(engine.spec.n_layers) for m in (a.ln1(l), a.ln2(l))] + [a.final_norm()]


def autograd_head_grads(engine: Engine, layer: int, x: torch.Tensor, run: list[torch.Tensor],
                        g: list[torch.Tensor], rot, norm: NormMode) -> torch.Tensor:
    """[H + 2KV, b, s, d]: the gradient at each q, k and v receiver's own copy of x, as the
    vector-Jacobian product of heads.head_read (families outside grads.py's closed form:
    q/k norms, no input norm)."""
    n = sum(t.shape[2] for t in run)
    xs = x.detach().unsqueeze(2).expand(-1, -1, n, -1).clone().requires_grad_(True)
    outs, start = [], 0
    with torch.enable_grad():
        for i, t in enumerate(run):
            k = t.shape[2]
            outs.append(head_read(engine, layer, i, x, xs[:, :, start:start + k], t, rot, norm == "frozen"))
            start += k
        (gx,) = torch.autograd.grad(outs, [xs], grad_outputs=[gi.to(o.dtype) for gi, o in zip(g, outs)])
    return gx.permute(2, 0, 1, 3)


def grad_pass(engine: Engine, ids: torch.Tensor, target: torch.Tensor, distractor: torch.Tensor | None,
              embed: torch.Tensor | None, norm: NormMode, want_senders: bool, hooks: dict | None = None,
              last_mlp_tail: bool = False, prefix: Prefix | None = None):
    """One forward and one backward of rows `ids` [R, s] (token embeddings replaced by `embed`
    [R, s, d] if given): (activations, gradients at the reads, metric per row). last_mlp_tail:
    the last MLP at the last position only (`last_mlp_tail_only`; its output elsewhere is 0).
    prefix: `ids` continue it (R a multiple of its rows; its keys/values are constants)."""
    spec = engine.spec
    L = spec.n_layers
    sites = []
    for l in range(L):
        sites += [resid_site("pre", l)] + [receiver_site(k, l) for k in ("q", "k", "v", "mlp")]
        if not spec.parallel_residual:
            sites.append(resid_site("mid", l))
    if want_senders:
        sites += sender_sites(engine)
    sites.append("hook_resid_final")

    def leaf(x, site):
        x = embed.to(x.dtype) if embed is not None else x
        return x.detach().requires_grad_(True)

    frozen = frozen_norms(engine, _norms(engine)) if norm == "frozen" else nullcontext()
    with torch.enable_grad(), frozen, last_mlp_tail_only(engine) if last_mlp_tail else nullcontext():
        # the MLP reads a copy of its input, so that the gradient there is its own: in blocks whose
        # attention and MLP share one norm (GPT-J, Falcon, Cohere, parallel StableLM) or whose MLP
        # reads the raw stream (OLMo-2), the tensor also feeds attention or the residual add
        own = {receiver_site("mlp", l): (lambda h, site: h.clone()) for l in range(L)}
        # logit_diff reads two logits a row: only those columns are projected (and back-propagated)
        R = ids.shape[0]
        few = distractor is not None and 2 * R < engine.spec.vocab_size
        k = 1 if prefix is None else R // next(iter(prefix.kv.values()))[0].shape[0]
        out, acts = engine.run_with_cache(ids, list(dict.fromkeys(sites)), hooks={"hook_embed": leaf} | own | (hooks or {}),
                                          logit_positions=[-1], logit_ids=torch.cat([target, distractor]) if few else None,
                                          **continue_prefix(prefix, k))
        if few:
            cols = torch.arange(R, device=target.device)
            m = metric_rows(out.logits[:, -1], cols, cols + R)
        else:
            m = metric_rows(out.logits[:, -1], target, distractor)
        reads = [acts[receiver_site(k, l)] for l in range(L) for k in "qkv"]
        reads += [acts[receiver_site("mlp", l)] for l in range(L)] + [acts["hook_resid_final"]]
        grads = torch.autograd.grad(m.sum(), reads)
    return {k: v.detach() for k, v in acts.items()}, grads, m.detach()
