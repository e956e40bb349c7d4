"""Interventions on hook sites: zero, mean, patch-from-another-run, add a vector.

An intervention is a hook that rewrites part of a site's tensor: some units (heads or
neurons; all when `units` is None) at some positions (all when None). It is built with
`torch.where` over a broadcast mask, so it stays differentiable and works for batches in
which each row ablates something different (pass `mask` directly for that).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

Kind = Literal["zero", "mean", "patch", "add", "set"]


def site_layout(site: str) -> tuple[int, int | None]:
    """(position dim, unit dim) of a site's tensor. Units are heads or neurons."""
    if site.endswith(("hook_attn_scores", "hook_pattern")):
        return 2, 1  # [b, heads, q_pos, k_pos]: positions are query positions
    if site.endswith(("hook_q", "hook_k", "hook_v", "hook_z")) or site.endswith(("mlp.hook_pre", "mlp.hook_post")):
        return 1, 2  # [b, pos, heads, d_head] or [b, pos, d_mlp]
    return 1, None  # [b, pos, d_model]: the whole vector is the unit


def selection_mask(x: torch.Tensor, site: str, units: Sequence[int] | None,
                   positions: Sequence[int] | None) -> torch.Tensor:
    """Boolean mask broadcastable to `x` that is True on the chosen units and positions."""
    pos_dim, unit_dim = site_layout(site)
    mask = torch.ones([1] * x.dim(), dtype=torch.bool, device=x.device)
    if positions is not None:
        mask = mask & _chosen(x, pos_dim, positions)
    if units is not None:
        if unit_dim is None:
            raise ValueError(f"site {site} has no units (heads/neurons) to select")
        mask = mask & _chosen(x, unit_dim, units)
    return mask


def _chosen(x: torch.Tensor, dim: int, indices: Sequence[int]) -> torch.Tensor:
    """A boolean mask of size 1 in every dim of x but `dim`: True at `indices` along `dim`."""
    shape = [1] * x.dim()
    shape[dim] = x.shape[dim]
    m = torch.zeros(shape, dtype=torch.bool, device=x.device)
    idx = [slice(None)] * x.dim()
    idx[dim] = torch.as_tensor(list(indices), device=x.device)
    m[tuple(idx)] = True
    return m


def intervention(kind: Kind, site: str, *, units: Sequence[int] | None = None,
                 positions: Sequence[int] | None = None, value: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None):
    """A hook implementing one intervention.

    zero: set to 0. mean/set/patch: replace by `value` (broadcast: a mean vector, or the
    activations of another run of the same length). add: add `value` (steering).
    """
    if kind != "zero" and value is None:
        raise ValueError(f"intervention {kind!r} needs a value")

    def hook(x: torch.Tensor, _site: str) -> torch.Tensor:
        m = mask.to(x.device) if mask is not None else selection_mask(x, site, units, positions)
        if kind == "zero":
            new = torch.zeros((), dtype=x.dtype, device=x.device)
        elif kind == "add":  # values may come from the home device (models spread over devices)
            new = x + value.to(x.device, x.dtype)
        else:
            new = value.to(x.device, x.dtype)
        return torch.where(m, new, x)

    return hook
