"""Reading vectors of the residual basis as logits: the one logit-lens function of the
project (weights' "promotes/suppresses", the explainer's output direction, the logit-lens
and direct-logit-attribution tools all go through `to_vocab`).

* a residual-stream state (`scale=None`): the final norm runs as the model runs it (its own
  per-token scale, gain and bias) and the unembedding adds its bias: the logit lens.
* a direction or one component's write (`scale` given): the norm's scale is frozen at
  `scale` (1 for a bare direction; the clean run's value for a write, docs/DESIGN.md §4), only
  its centring (LayerNorm) and gain apply and no bias is added, so writes add up.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field

from tdb_agent.components import Component, parse_component
from tdb_agent.engine import Engine
from tdb_agent.engine.component_sites import sae_site
from tdb_agent.errors import TdbError
from tdb_agent.ops import sae_ops
from tdb_agent.ops.runs import CleanRun, RunCache, get_run


def to_vocab(engine: Engine, x: torch.Tensor, *, scale: torch.Tensor | float | None = None,
             logit_ids: list[int] | torch.Tensor | None = None) -> torch.Tensor:
    """Logits [..., vocab] (or [..., len(logit_ids)]) of vectors x [..., d_model]."""
    norm = engine.adapter.final_norm()
    if scale is None:
        return engine.unembed(norm(x.to(engine.dtype)), logit_ids).float()
    v = x.float()
    if engine.spec.norm == "layernorm":
        v = v - v.mean(-1, keepdim=True)
    v = v * (scale.float() if isinstance(scale, torch.Tensor) else float(scale))
    gain = engine.adapter.norm_gain(norm)  # weight, or 1 + weight (Gemma)
    if gain is not None:
        v = v * gain.detach().float().to(v.device)
    W_U = engine.adapter.W_U().detach().float().to(v.device)  # [d, vocab]
    if logit_ids is not None:
        W_U = W_U[:, torch.as_tensor(logit_ids, device=W_U.device)]
    return v @ W_U


def top_tokens(engine: Engine, direction: torch.Tensor, k: int = 8) -> tuple[list[tuple[str, float]],
                                                                            list[tuple[str, float]]]:
    """The k tokens a direction [d_model] promotes most and the k it suppresses most, with
    their logit effects (final norm's scale frozen at 1)."""
    logits = to_vocab(engine, direction.detach(), scale=1.0)
    k = min(k, logits.numel())
    top, bottom = logits.topk(k), (-logits).topk(k)
    toks = engine.str_tokens(top.indices.tolist() + bottom.indices.tolist())
    return ([(t, float(s)) for t, s in zip(toks[:k], top.values.tolist())],
            [(t, -float(s)) for t, s in zip(toks[k:], bottom.values.tolist())])


# ---------------------------------------------------------------- logit lens and direct logit attribution
class LensToken(BaseModel):
    token: str
    prob: float
    logit: float


class LensCell(BaseModel):
    position: int
    token: str = Field(description="the input token at this position (the lens predicts the next one)")
    top: list[LensToken]
    target_prob: float | None = None
    target_rank: int | None = Field(None, description="0 = the lens's top token")


class LensLayer(BaseModel):
    layer: int = Field(description="residual stream before block `layer` (0 = the embeddings); n_layers = the "
                                   "final residual stream, whose lens is the model's own output")
    cells: list[LensCell]


class LogitLensResult(BaseModel):
    prompt: str
    n_tokens: int
    target: str | None = None
    layers: list[LensLayer]


@torch.no_grad()
def logit_lens(engine: Engine, prompt: str, *, top_k: int = 5, target: str | None = None,
               positions: list[int] | None = None, cache: RunCache | None = None) -> LogitLensResult:
    """The residual stream at every layer and position read as next-token predictions
    through the final norm and unembedding (`to_vocab`, no tuned lens).

    Args:
        prompt: the text the model reads.
        top_k: top next tokens listed per layer and position.
        target: a single token whose probability and rank to report at every cell.
        positions: token positions to read (negative counts from the end; default all).

    Returns:
        LogitLensResult: per layer (0 = the embeddings, n_layers = the final residual stream,
        which reads as the model's own output) and position, the top tokens with
        probabilities and logits, and the target's probability and rank.
    """
    run = get_run(engine, prompt, cache)
    s = run.n_tokens
    pos = list(range(s)) if positions is None else positions
    for p in pos:
        if not -s <= p < s:
            raise TdbError(f"position {p} is out of range; the prompt has {s} tokens (0..{s - 1})")
    pos = [p % s for p in pos]
    t_id = engine.token_id(target) if target else None
    n = engine.spec.n_layers
    states = [run.acts[f"blocks.{l}.hook_resid_pre"] for l in range(n)] + [run.acts["hook_resid_final"]]
    toks = engine.str_tokens(run.ids[0])
    layers = []
    for layer, x in enumerate(states):
        logits = to_vocab(engine, x[0, pos])  # [P, vocab]
        probs = logits.softmax(-1)
        top = probs.topk(min(top_k, probs.shape[-1]))
        names = engine.str_tokens(top.indices.flatten())
        cells = []
        for i, p in enumerate(pos):
            row = [LensToken(token=names[i * top.indices.shape[1] + j], prob=float(top.values[i, j]),
                             logit=float(logits[i, top.indices[i, j]])) for j in range(top.indices.shape[1])]
            cell = LensCell(position=p, token=toks[p], top=row)
            if t_id is not None:
                cell.target_prob = float(probs[i, t_id])
                cell.target_rank = int((logits[i] > logits[i, t_id]).sum())
            cells.append(cell)
        layers.append(LensLayer(layer=layer, cells=cells))
    return LogitLensResult(prompt=prompt, n_tokens=s, target=target, layers=layers)


class DLAPosition(BaseModel):
    position: int
    token: str
    effect: float = Field(description="the component's write here, through the final norm (scale frozen at its "
                                      "clean value here) and the unembedding, on the metric's logits")


class DirectLogitAttribution(BaseModel):
    prompt: str
    component: str
    metric: str = Field(description="logit[target] - logit[distractor], or logit[target] without a distractor")
    positions: list[DLAPosition]
    total: float = Field(description="sum over positions")


def component_write(engine: Engine, run: CleanRun, c: Component) -> torch.Tensor:
    """A component's write to the residual stream at every position [s, d_model], from a
    clean run: a head's z_h W_O[h], a neuron's post_n W_out[n], a block's output, the
    embeddings, an SAE latent's f_i W_dec[i]."""
    a, acts = engine.adapter, run.acts
    if c.kind == "head":
        return acts[f"blocks.{c.layer}.attn.hook_z"][0, :, c.index].float() @ a.W_O(c.layer)[c.index].float()
    if c.kind == "neuron":
        return acts[f"blocks.{c.layer}.mlp.hook_post"][0, :, c.index, None].float() * a.W_out(c.layer)[c.index].float()
    if c.kind in ("attn", "mlp"):
        return acts[f"blocks.{c.layer}.hook_{c.kind}_out"][0].float()
    if c.kind == "emb":
        return acts["blocks.0.hook_resid_pre"][0].float()
    if c.kind == "sae":
        sae = engine.saes.get(c.layer, c.sae_site)
        x = acts[sae_site(c.layer, c.sae_site)][0].float()
        return sae.encode(x)[:, c.index, None] * sae.W_dec[c.index].float()
    raise TdbError(f"{c.id} writes nothing to the residual stream; give a head, neuron, block, EMB or SAE latent")


@torch.no_grad()
def direct_logit_attribution(engine: Engine, prompt: str, component: str, target: str,
                             distractor: str | None = None, cache: RunCache | None = None) -> DirectLogitAttribution:
    """Per position, the component's direct effect on the next-token logits there: its write
    through the final norm with that position's clean scale frozen (docs/DESIGN.md §4), on
    logit[target] - logit[distractor] (or logit[target]).

    Args:
        prompt: the text the model reads.
        component: a head, neuron, L{l}.ATTN / L{l}.MLP, EMB or SAE latent (`@t`: one position).
        target: the single token whose logit is explained.
        distractor: an optional single token to compare with.

    Returns:
        DirectLogitAttribution: the effect at every position (at the last one, the
        component's `direct_effect` in `attribute`) and their sum.
    """
    run = get_run(engine, prompt, cache)
    c = parse_component(component, engine.spec, n_positions=run.n_tokens, sae_sizes=sae_ops.sae_sizes(engine))
    ids = [engine.token_id(target)] + ([engine.token_id(distractor)] if distractor else [])
    write = component_write(engine, run, c)  # [s, d]
    scale = engine.final_norm_scale(run.acts["hook_resid_final"][0].float())  # [s, 1]
    logits = to_vocab(engine, write, scale=scale, logit_ids=ids)  # [s, 1 or 2]
    effect = logits[:, 0] - logits[:, 1] if distractor else logits[:, 0]
    toks = engine.str_tokens(run.ids[0])
    pos = range(run.n_tokens) if c.position is None else [c.position]
    rows = [DLAPosition(position=p, token=toks[p], effect=float(effect[p])) for p in pos]
    metric = f"logit[{target!r}]" + (f" - logit[{distractor!r}]" if distractor else "")
    return DirectLogitAttribution(prompt=prompt, component=c.id, metric=metric, positions=rows,
                                  total=sum(r.effect for r in rows))
