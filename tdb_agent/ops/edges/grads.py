"""The gradient of the metric at every receiver's own input, kept in the small form the
backward gives it and summed over EAP-IG's steps as each pass arrives; eap.py builds the
[receivers, positions, d] gradient a chunk of positions at a time, never whole.

For the q, k or v receiver r (head h of block l), with x the residual stream entering the
block, x̂ = normalised x, inv = 1/σ (or 1/rms) and g̃_r the gradient at its un-rotated q/k/v
[d_head] (reads.py's closed form, the norm folded into the weights):

    G_r = inv · g̃_r W̄_r − inv · c_r · x̂,     W̄_r = centre_d(γ ⊙ W_rᵀ)  (centring: LayerNorm only)
    c_r = mean_d(g̃_r W̄_r ⊙ x̂) = g̃_r · (q_r − q_r⁰) / d

since W̄_r x̂ = x̂ (γ ⊙ W_r) is the head's own un-rotated q (k, v) less its value q_r⁰ at
x̂ = 0 (bias and norm shift; the same at every position, read off one position). So:

* the first term is linear in inv · g̃, which is summed over the steps of EAP-IG (and the
  rows of a batch) in head space [b, s, n, d_head]: one matrix product per head in all;
* the second is rank one per position: its weight inv · c costs a dot product in head space
  (kept per step, [m, b, s, n]) and its direction x̂ is kept per step ([m, b, s, d]);
* with frozen norms (inv held, a constant) the second term is absent.

Families outside that closed form (q/k norms, no input norm: heads.closed_form) keep each
q/k/v receiver's gradient whole, [n, b, s, d] per block (the vector-Jacobian product of
heads.head_read, capture.autograd_head_grads), summed over the steps.

An MLP receiver's gradient (norm_vjp of the gradient at the MLP's normalised input) and the
logits' (the gradient at the final residual stream) are [b, s, d] each, summed over steps.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tdb_agent.engine import Engine
from tdb_agent.engine.component_sites import EMBED_SITE, receiver_site, resid_site
from tdb_agent.ops.edges.capture import Prefix, SenderActs, autograd_head_grads, grad_pass, stack_rows
from tdb_agent.ops.edges.heads import closed_form, layer_rotary, q_scale, rotary_block_tables, rotate
from tdb_agent.ops.edges.reads import NormMode, norm_params, norm_vjp


@dataclass
class ReceiverGrads:
    """∂(sum of the rows' metrics)/∂(each receiver's input), averaged over the steps, in parts
    (see the module docstring). n = H + 2·KV receivers per block (q heads, then k, then v)."""

    b: int
    s: int
    head: list[torch.Tensor | None]  # per block [b, s, n, d_head]: mean over steps of inv · g̃
    full: list[torch.Tensor | None] = field(default_factory=list)  # per block [n, b, s, d] outside the closed form
    weight: list[list[torch.Tensor]] = field(default_factory=list)  # per block, per step [b, s, n]: inv · c / m
    xhat: list[list[torch.Tensor]] = field(default_factory=list)  # per block, per step [b, s, d]
    mlp: list[torch.Tensor] = field(default_factory=list)  # per block [b, s, d]
    logits: torch.Tensor | None = None  # [b, s, d]
    steps: int = 1
    metric: torch.Tensor | None = None  # [b] at the clean input
    clean: SenderActs | None = None  # sender parts of the clean run


class BlockWeights:
    """The float32 weights the edge passes read per block (EAP-IG at every step, the
    contraction once per chunk of positions; each is a strided copy of a block's weights),
    kept while they fit in KEEP_BYTES. One per engine (`block_weights`), reused across calls
    while the model's weights are the same ones."""

    KEEP_BYTES = 1 << 28

    def __init__(self, engine: Engine):
        self.engine = engine
        self.identity = weights_identity(engine)
        self._made: dict[tuple[str, int], torch.Tensor] = {}
        self._bytes = 0
        self._work = torch.empty(0, device=engine.device)

    def workspace(self, numel: int) -> torch.Tensor:
        """A float32 buffer of `numel` (contract.py's G, at most CHUNK_BYTES), kept between calls:
        a fresh one of a few MB is fresh pages, whose first touch costs as much as filling it."""
        if self._work.numel() < numel:
            self._work = torch.empty(numel, device=self.engine.device)
        return self._work[:numel]

    def _get(self, kind: str, layer: int, make) -> torch.Tensor:
        t = self._made.get((kind, layer))
        if t is None:
            t = make(layer)
            if self._bytes + t.nbytes <= self.KEEP_BYTES:
                self._made[(kind, layer)] = t
                self._bytes += t.nbytes
        return t

    def folded(self, layer: int) -> torch.Tensor:
        """W̄ [n, d_head, d]: each q/k/v head's weights (W_Q, W_K, W_V stacked) with the input
        norm's gain folded in (and centred over d for LayerNorm): inv · g̃ W̄ is the gradient at
        the head's copy of x."""
        def make(l: int) -> torch.Tensor:
            e = self.engine
            W = torch.cat([w.to(e.device, torch.float32).transpose(-1, -2) for w in e.adapter.W_QKV(l)], dim=0)
            gamma, _ = norm_params(e, e.adapter.ln1(l))
            if gamma is not None:
                W.mul_(gamma.to(W))
            if e.spec.norm == "layernorm":
                W.sub_(W.mean(-1, keepdim=True))
            return W
        return self._get("folded", layer, make)

    def q0(self, layer: int, qkv: torch.Tensor, xhat: torch.Tensor) -> torch.Tensor:
        """[n, d_head]: the heads' un-rotated q, k, v at x̂ = 0 (the norm's shift and the biases
        through W), read off one position of a run (its q/k/v `qkv`, its x̂): x̂ W̄ = x̂ (γ ⊙ W),
        x̂ being centred where W̄ is. The same at every position and in every run."""
        def make(l: int) -> torch.Tensor:
            W = self.folded(l)
            return qkv - (W.view(-1, W.shape[-1]) @ xhat).view(W.shape[:2])
        return self._get("q0", layer, make)

    def W_O(self, layer: int) -> torch.Tensor:
        """W_O [H, d_head, d]."""
        return self._get("W_O", layer, lambda l: self.engine.adapter.W_O(l).to(self.engine.device, torch.float32))


def weights_identity(engine: Engine) -> tuple:
    """Every parameter's storage and in-place version counter (editing a weight in place bumps
    it; loading or moving the model changes the storage): cheap, no weight is read."""
    return tuple((p.data_ptr(), p._version) for p in engine.model.parameters())


_BY_ENGINE: "weakref.WeakKeyDictionary[Engine, BlockWeights]" = weakref.WeakKeyDictionary()


def block_weights(engine: Engine) -> BlockWeights:
    """The engine's BlockWeights, made anew when its weights changed (call under engine.lock)."""
    w = _BY_ENGINE.get(engine)
    if w is None or w.identity != weights_identity(engine):
        w = _BY_ENGINE[engine] = BlockWeights(engine)
    return w


def normalise(engine: Engine, x: torch.Tensor, module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂ [.., d], inv [.., 1]) of the norm `module` at x, in float32."""
    _, eps = norm_params(engine, module)
    xf = x.float()
    if engine.spec.norm == "layernorm":  # one kernel: x̂ and 1/σ
        xh, _, inv = torch.native_layer_norm(xf, [xf.shape[-1]], None, None, eps)
        return xh, inv
    inv = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf * inv, inv


def accumulate(engine: Engine, acc: ReceiverGrads | None, acts: dict, grads, k: int, norm: NormMode,
               scale: float | Sequence[float], weights: BlockWeights, offset: int = 0) -> ReceiverGrads:
    """Add one pass of k steps × b rows (step-major) to `acc`, each step weighted `scale` (one
    weight for all, or one per step: the quadrature's); offset: the pass's first position (a
    shared prefix's length: its rotary angles)."""
    spec, a = engine.spec, engine.adapter
    L = spec.n_layers
    R, s = grads[-1].shape[:2]
    b = R // k
    if acc is None:
        acc = ReceiverGrads(b=b, s=s, head=[None] * L, full=[None] * L, weight=[[] for _ in range(L)],
                            xhat=[[] for _ in range(L)], mlp=[None] * L)
    kw = rotary_block_tables(engine, acts[EMBED_SITE], offset)
    exact_form = closed_form(engine)

    # the steps' weights: one for all (a float) or one per step ([k], broadcast from the left)
    if not isinstance(scale, (int, float)) and len(set(scale)) == 1:
        scale = scale[0]
    w_step = None if isinstance(scale, (int, float)) else torch.tensor(scale, device=grads[-1].device)

    def per_step(t, axis=0):  # t [.., k, b, ...], the steps at `axis`, weighted in place
        return t.mul_(scale) if w_step is None else t.mul_(w_step.view(-1, *([1] * (t.dim() - axis - 1))))

    def fold(t, w=None):  # [k·b, ...] (times w [k·b, ...]) -> weighted sum over the steps: [b, ...] (new)
        if w_step is None:
            w = scale if w is None else w * scale
            if k == 1:
                return t if isinstance(w, float) and w == 1.0 else t * w  # t: a tensor of this pass's own
            return (t * w).view(k, b, *t.shape[1:]).sum(0)
        return per_step((t.clone() if w is None else t * w).view(k, b, *t.shape[1:])).sum(0)

    def add(old, new):
        return new if old is None else old.add_(new)

    for l in range(L):
        x = acts[resid_site("pre", l)]
        rot = layer_rotary(engine, l, kw, x.dtype)
        gq, gk, gv = grads[3 * l: 3 * l + 3]
        if not exact_form:
            full = autograd_head_grads(engine, l, x, [acts[receiver_site(n, l)] for n in "qkv"], [gq, gk, gv], rot,
                                       norm).float()  # [n, k·b, s, d]
            acc.full[l] = add(acc.full[l], per_step(full.view(full.shape[0], k, b, s, -1), 1).sum(1))
        else:
            xh, inv = normalise(engine, x, a.ln1(l))
            qs = q_scale(engine, l)
            gq = rotate(gq, rot, inverse=True)
            g = torch.cat([gq * qs if qs != 1.0 else gq, rotate(gk, rot, inverse=True), gv], dim=2).float()
            acc.head[l] = add(acc.head[l], fold(g, inv.unsqueeze(-1)))
            if norm == "unfrozen":  # q, k, v before rotary and OPT's q scale: norm(x) · W + b
                q = rotate(acts[receiver_site("q", l)], rot, inverse=True)
                qkv = torch.cat([q / qs if qs != 1.0 else q, rotate(acts[receiver_site("k", l)], rot, inverse=True),
                                 acts[receiver_site("v", l)]], dim=2).float()
                c = torch.linalg.vecdot(g, qkv.sub_(weights.q0(l, qkv[0, 0], xh[0, 0])))
                if w_step is None:
                    w = c.mul_(inv * (scale / spec.d_model)).view(k, b, s, -1)
                else:
                    w = per_step(c.mul_(inv / spec.d_model).view(k, b, s, -1))
                acc.weight[l] += list(w.unbind(0))
                acc.xhat[l] += list(xh.view(k, b, s, -1).unbind(0))
        x2 = x if spec.parallel_residual else acts[resid_site("mid", l)]
        acc.mlp[l] = add(acc.mlp[l], fold(norm_vjp(engine, a.ln2(l), x2, grads[3 * L + l], norm).float()))
    acc.logits = add(acc.logits, fold(grads[-1].float()))
    return acc


def receiver_grads(engine: Engine, ids: torch.Tensor, target: torch.Tensor, distractor: torch.Tensor | None,
                   embeds: list[torch.Tensor | None], norm: NormMode, steps_per_pass: int,
                   weights: BlockWeights, step_weights: Sequence[float] | None = None,
                   prefix: Prefix | None = None) -> tuple[ReceiverGrads, int]:
    """The gradients at every receiver, averaged over `embeds` (one per step, the last the
    clean input: None for the model's own embeddings) with `step_weights` (the quadrature's;
    default 1/m each), `steps_per_pass` steps stacked in the batch of one forward and
    backward, the last MLP at the last position only (the metric's: capture.last_mlp_tail_only).
    prefix: `ids` and `embeds` are the positions after a shared prefix (capture.Prefix), which
    the passes continue. Returns (the gradients, the passes run)."""
    acc = None
    m = len(embeds)
    b = ids.shape[0]
    passes = 0
    for i in range(0, m, steps_per_pass):
        part = embeds[i:i + steps_per_pass]
        k = len(part)
        last = i + k == m
        embed = None if part[0] is None else torch.cat(part)  # None: EAP's single clean step
        acts, grads, metric = grad_pass(engine, stack_rows(ids, k), stack_rows(target, k),
                                        None if distractor is None else stack_rows(distractor, k), embed, norm,
                                        want_senders=last, last_mlp_tail=True, prefix=prefix)
        passes += 1
        scale = 1.0 / m if step_weights is None else list(step_weights[i:i + k])
        acc = accumulate(engine, acc, acts, grads, k, norm, scale, weights, 0 if prefix is None else prefix.offset)
        if last:
            acc.metric = metric[-b:]
            acc.clean = SenderActs.from_acts(engine, acts, slice((k - 1) * b, k * b))
    acc.steps = m
    return acc, passes
