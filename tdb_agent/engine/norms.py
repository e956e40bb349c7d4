"""LayerNorm / RMSNorm computed in float32, optionally with the scale frozen (docs/DESIGN.md §4).

Used where numbers are accumulated: the final norm of a half-precision model (its logits
and metrics come out in float32), and the frozen norms of direct effects and traces
(same value as the module, but linear in x for autograd). Gemma's norms multiply by
(1 + weight): the adapter's `norm_gain` says which.
"""

from __future__ import annotations

import torch
from torch import nn


def norm_eps(module: nn.Module) -> float:
    return getattr(module, "eps", None) or getattr(module, "variance_epsilon", None) or 1e-5


def norm_scale(x: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """1/sqrt(var + eps) (LayerNorm) or 1/rms (RMSNorm) of x in float32, [.., 1]."""
    xf = x.float()
    var = xf.var(-1, keepdim=True, unbiased=False) if kind == "layernorm" else xf.pow(2).mean(-1, keepdim=True)
    return torch.rsqrt(var + eps)


def apply_norm(adapter, module: nn.Module, x: torch.Tensor, kind: str, frozen: bool = False,
               scale: torch.Tensor | None = None) -> torch.Tensor:
    """The norm `module` applied to x, in float32 (the caller casts back if it must).
    frozen: the scale is detached (or the given `scale` is used), so the output is linear in x."""
    xf = x.float()
    if kind == "layernorm":
        xf = xf - xf.mean(-1, keepdim=True)
    s = norm_scale(x, kind, norm_eps(module)) if scale is None else scale.float()
    out = xf * (s.detach() if frozen else s)
    gain = adapter.norm_gain(module)
    bias = adapter._p(module, "bias") if hasattr(module, "bias") else None
    if gain is not None:
        out = out * gain.to(out.device, torch.float32)
    return out + bias.to(out.device, torch.float32) if bias is not None else out
