"""How a receiver reads the residual stream, and its gradient, in closed form.

A head's query input is the residual stream x entering its block; the head reads it as

    q_h = rotary( norm(x) · W_Q[h] + b_Q[h] )

(rotary only in rotary families, on the first `rot` dimensions; γ is Gemma's 1 + w). Keys
and values likewise with W_K / W_V (one per key/value head). An MLP block reads norm2 of
the residual stream entering it (OLMo-2: the stream itself); the logits read the final
residual stream (their norm is part of the metric). The rotary's layout (halves or
interleaved pairs, per layer type) and OPT's q scale are in heads.py; families whose heads
read more than this (q/k norms, no input norm) are written out there too, and capture.py
takes the vector-Jacobian product of that read instead.

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
from tdb_agent.engine.norms import norm_eps

NormMode = Literal["unfrozen", "frozen"]


def norm_params(engine: Engine, module: torch.nn.Module) -> tuple[torch.Tensor | None, float]:
    """The norm's gain (weight, or Gemma's 1 + weight) and epsilon."""
    return engine.adapter.norm_gain(module), norm_eps(module)


def norm_vjp(engine: Engine, module: torch.nn.Module | None, x: torch.Tensor, u: torch.Tensor,
             mode: NormMode = "unfrozen") -> torch.Tensor:
    """uᵀ · ∂norm(x)/∂x for the norm `module` at x [..., d] (broadcast against u [..., d]);
    u itself where there is no norm (OLMo-2's MLP reads the raw stream)."""
    if module is None:
        return u
    gamma, eps = norm_params(engine, module)
    xf, w = x.float(), u.float()
    if engine.spec.norm == "layernorm" and mode == "unfrozen" and xf.shape == w.shape:  # the same, one kernel
        _, mean, rstd = torch.native_layer_norm(xf, [xf.shape[-1]], None, None, eps)
        g = None if gamma is None else gamma.float()
        return torch.ops.aten.native_layer_norm_backward(w, xf, [xf.shape[-1]], mean, rstd, g, None,
                                                         [True, False, False])[0].to(u.dtype)
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
