"""The residual stream as a sum of component writes, read along a direction.

At any position the residual stream entering layer l is

    EMB + sum_{l' < l} [ sum_h z_h W_O[h] + b_O ] + sum_{l' < l} [ sum_n post_n W_out[n] + b_out ]

so its dot product with a direction g splits exactly into per-head, per-neuron, embedding
and bias terms. Direct effects (g = gradient of the metric at the final residual stream)
and upstream traces (g = gradient of a node w.r.t. the residual stream feeding it) both use
this one function.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from tdb_agent.engine import Engine
from tdb_agent.ops.runs import CleanRun


@dataclass
class Decomposition:
    heads: torch.Tensor  # [n_attn_layers, n_heads]
    neurons: torch.Tensor  # [n_mlp_layers, d_mlp]
    emb: torch.Tensor  # scalar
    attn_bias: torch.Tensor  # [n_attn_layers] (b_O · g per layer)
    mlp_bias: torch.Tensor  # [n_mlp_layers]

    def total(self) -> torch.Tensor:
        return (self.heads.sum() + self.neurons.sum() + self.emb + self.attn_bias.sum()
                + self.mlp_bias.sum())


def decompose(engine: Engine, run: CleanRun, positions: list[int], g: torch.Tensor,
              attn_layers: int, mlp_layers: int) -> Decomposition:
    """Split sum_p resid[p] · g[p] into component terms.

    positions: token positions; g: [len(positions), d_model]; the residual stream read is
    the one after `attn_layers` attention blocks and `mlp_layers` MLP blocks.
    """
    a = engine.adapter
    g = g.to(engine.dtype)
    pos = torch.as_tensor(positions, device=g.device)
    heads, attn_bias, neurons, mlp_bias = [], [], [], []
    for layer in range(attn_layers):
        z = run.acts[f"blocks.{layer}.attn.hook_z"][0, pos]  # [P, h, dh]
        heads.append(torch.einsum("phk,hkd,pd->h", z, a.W_O(layer), g))
        b = a.b_O(layer)
        attn_bias.append((b @ g.T).sum() if b is not None else g.new_zeros(()))
    for layer in range(mlp_layers):
        post = run.acts[f"blocks.{layer}.mlp.hook_post"][0, pos]  # [P, d_mlp]
        neurons.append((post * (g @ a.W_out(layer).T)).sum(0))
        b = a.b_out(layer)
        mlp_bias.append((b @ g.T).sum() if b is not None else g.new_zeros(()))
    emb = (run.acts["blocks.0.hook_resid_pre"][0, pos] * g).sum()
    spec = engine.spec
    empty = g.new_zeros(0)
    return Decomposition(
        heads=torch.stack(heads) if heads else g.new_zeros(0, spec.n_heads),
        neurons=torch.stack(neurons) if neurons else g.new_zeros(0, spec.d_mlp),
        emb=emb,
        attn_bias=torch.stack(attn_bias) if attn_bias else empty,
        mlp_bias=torch.stack(mlp_bias) if mlp_bias else empty,
    )


def frozen_norm(engine: Engine, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A LayerNorm/RMSNorm with its scale detached: same value, but linear in x for autograd
    (the convention of direct effects and traces, as in Transformer Debugger)."""
    w = module.weight
    b = getattr(module, "bias", None)
    eps = getattr(module, "eps", None) or getattr(module, "variance_epsilon", 1e-5)
    xf = x.float()
    if engine.spec.norm == "layernorm":
        centered = xf - xf.mean(-1, keepdim=True)
        scale = torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + eps).detach()
        out = centered * scale
    else:
        scale = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps).detach()
        out = xf * scale
    out = out.to(x.dtype) * w
    return out + b if b is not None else out


@contextmanager
def frozen_norms(engine: Engine, modules: list[torch.nn.Module]) -> Iterator[None]:
    """Inside the block, these norm modules run with their scale frozen (hooks removed on exit)."""
    def hook(mod, args, output):
        return frozen_norm(engine, mod, args[0])

    with engine.lock:
        handles = [m.register_forward_hook(hook) for m in modules]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
