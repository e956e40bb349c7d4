"""How a receiver reads the residual stream, and its gradient, in closed form.

A head's query input is the residual stream x entering its block; the head reads it as

    q_h = rotary( norm(x) · W_Q[h] + b_Q[h] )

(rotary only in rotary families, on the first `rot` dimensions). Keys and values likewise
with W_K / W_V (one per key/value head). An MLP block reads norm2 of the residual stream
entering it; the logits read the final residual stream (their norm is part of the metric).

The engine runs the model's own fused modules, so the gradient it gives is the one at the
rotated q/k/v (hook sites). `receiver_grad` turns it into the gradient at the receiver's own
copy of x: undo the rotary (a rotation: its transpose), project with the head's W slice,
then apply the norm's vector-Jacobian product at x:

    LayerNorm  y = γ ⊙ (x − μ)/σ + β     Jᵀu = (w − mean(w) − x̂ · mean(w ⊙ x̂)) / σ,  w = γ ⊙ u
    RMSNorm    y = γ ⊙ x / r             Jᵀu = (w − x̂ · mean(w ⊙ x̂)) / r

With a *frozen* norm (σ or r held at its clean value, treated as a constant), the x̂ term
drops: the receiver's read is then affine in x, so a sender's contribution to it is exact
and additive. `unfrozen` is the true gradient (what EAP and MIB use).
"""

from __future__ import annotations

from typing import Literal

import torch

from tdb_agent.engine import Engine

NormMode = Literal["unfrozen", "frozen"]


def norm_params(engine: Engine, module: torch.nn.Module) -> tuple[torch.Tensor | None, float]:
    w = engine.param(module, "weight")
    eps = getattr(module, "eps", None) or getattr(module, "variance_epsilon", 1e-5)
    return w, float(eps)


def norm_vjp(engine: Engine, module: torch.nn.Module, x: torch.Tensor, u: torch.Tensor,
             mode: NormMode = "unfrozen") -> torch.Tensor:
    """uᵀ · ∂norm(x)/∂x for the norm `module` at x [..., d] (broadcast against u [..., d])."""
    gamma, eps = norm_params(engine, module)
    xf, w = x.float(), u.float()
    if gamma is not None:
        w = w * gamma.float()
    if engine.spec.norm == "layernorm":
        c = xf - xf.mean(-1, keepdim=True)
        inv = torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps)
        w = w - w.mean(-1, keepdim=True)
        if mode == "unfrozen":
            xh = c * inv
            w = w - xh * (w * xh).mean(-1, keepdim=True)
    else:
        inv = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        if mode == "unfrozen":
            xh = xf * inv
            w = w - xh * (w * xh).mean(-1, keepdim=True)
    return (w * inv).to(u.dtype)


def rotary_tables(engine: Engine, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(cos, sin) [b, s, rot] of a rotary family for positions 0..s-1, None without rotary."""
    b, s = x.shape[:2]
    pos = torch.arange(s, device=x.device).unsqueeze(0).expand(b, -1)
    pe = engine.adapter.block_kwargs(x, pos).get("position_embeddings")
    return None if pe is None else (pe[0].to(x.dtype), pe[1].to(x.dtype))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def rotate(t: torch.Tensor, tables, inverse: bool = False) -> torch.Tensor:
    """Apply the rotary rotation (or its transpose) to t [b, s, heads, d_head]."""
    if tables is None:
        return t
    cos, sin = (a.unsqueeze(2) for a in tables)
    r = cos.shape[-1]
    rot, rest = t[..., :r], t[..., r:]
    out = rot * cos - _rotate_half(rot * sin) if inverse else rot * cos + _rotate_half(rot) * sin
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out
