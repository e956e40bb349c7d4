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

from tdb_agent.engine import Engine


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
    gain = engine.param(norm, "weight")
    if gain is not None:
        v = v * gain.detach().float().to(v.device)
    W = engine.param(engine.adapter.unembed()).detach().float().to(v.device)  # [vocab, d]
    if logit_ids is not None:
        W = W[torch.as_tensor(logit_ids, device=W.device)]
    return v @ W.T


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
