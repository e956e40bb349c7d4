"""The residual stream as a sum of component writes, read along a direction.

At any position the residual stream entering layer l is

    EMB + sum_{l' < l} [ sum_h z_h W_O[h] + b_O ] + sum_{l' < l} [ sum_n post_n W_out[n] + b_out ]

so its dot product with a direction g splits exactly into per-head, per-neuron, embedding
and bias terms. Where a family normalises a block's output before the residual add
(Gemma-2/3, OLMo-2), each write passes through that post-norm with its scale frozen at the
clean run (`write_factor`), so the split stays exact (docs/DESIGN.md §4). Everything is
accumulated in float32. Direct effects (g = gradient of the metric at the final residual stream)
and upstream traces (g = gradient of a node w.r.t. the residual stream feeding it) both use
this one function.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from tdb_agent.engine import Engine
from tdb_agent.engine.norms import apply_norm, norm_eps, norm_scale
from tdb_agent.engine.component_sites import kind_site
from tdb_agent.ops.runs import CleanRun


@dataclass
class Decomposition:
    heads: torch.Tensor  # [n_attn_layers, n_heads]  (per_position: [P, n_attn_layers, n_heads])
    neurons: torch.Tensor  # [n_mlp_layers, d_mlp]  (per_position: [P, n_mlp_layers, d_mlp])
    emb: torch.Tensor  # scalar  ([P])
    attn_bias: torch.Tensor  # [n_attn_layers] (b_O · g per layer)  ([P, n_attn_layers])
    mlp_bias: torch.Tensor  # [n_mlp_layers]  ([P, n_mlp_layers])

    def total(self) -> torch.Tensor:
        return (self.heads.sum() + self.neurons.sum() + self.emb + self.attn_bias.sum()
                + self.mlp_bias.sum())


def decompose(engine: Engine, run: CleanRun, positions: list[int], g: torch.Tensor,
              attn_layers: int, mlp_layers: int, per_position: bool = False) -> Decomposition:
    """Split sum_p resid[p] · g[p] into component terms.

    positions: token positions; g: [len(positions), d_model]; the residual stream read is
    the one after `attn_layers` attention blocks and `mlp_layers` MLP blocks. With
    per_position every term keeps a leading position axis instead of being summed.
    """
    eq_head = "phk,hkd,pd->ph" if per_position else "phk,hkd,pd->h"
    a = engine.adapter
    g = g.float()  # accumulated in float32 whatever the model's dtype
    pos = torch.as_tensor(positions, device=g.device)
    heads, attn_bias, neurons, mlp_bias = [], [], [], []
    for layer in range(attn_layers):
        f = write_factor(engine, run, "attn", layer, positions)
        gl = g if f is None else g * f  # through the frozen post-norm (Gemma-2/3, OLMo-2)
        z = run.acts[kind_site("head", layer)][0, pos].float()  # [P, h, dh]
        heads.append(torch.einsum(eq_head, z, a.W_O(layer).float(), gl))
        b = a.b_O(layer)
        bias = (gl @ b.float()) if b is not None else g.new_zeros(len(positions))
        attn_bias.append(bias if per_position else bias.sum())
    for layer in range(mlp_layers):
        f = write_factor(engine, run, "mlp", layer, positions)
        gl = g if f is None else g * f
        post = run.acts[kind_site("neuron", layer)][0, pos].float()  # [P, d_mlp]
        contrib = post * (gl @ a.W_out(layer).float().T)  # [P, d_mlp]
        neurons.append(contrib if per_position else contrib.sum(0))
        b = a.b_out(layer)
        bias = (gl @ b.float()) if b is not None else g.new_zeros(len(positions))
        mlp_bias.append(bias if per_position else bias.sum())
    emb = (run.acts["blocks.0.hook_resid_pre"][0, pos].float() * g).sum(-1)  # [P]
    spec = engine.spec
    P = len(positions)
    lead = (P,) if per_position else ()
    # stacked as [layers, (P,) units]; with per_position moved to [P, layers, units]
    heads_t = torch.stack(heads) if heads else g.new_zeros((0,) + lead + (spec.n_heads,))
    neurons_t = torch.stack(neurons) if neurons else g.new_zeros((0,) + lead + (spec.d_mlp,))
    attn_b = torch.stack(attn_bias) if attn_bias else g.new_zeros((0,) + lead)
    mlp_b = torch.stack(mlp_bias) if mlp_bias else g.new_zeros((0,) + lead)
    if per_position:
        heads_t, neurons_t = heads_t.transpose(0, 1), neurons_t.transpose(0, 1)
        attn_b, mlp_b = attn_b.T, mlp_b.T
    return Decomposition(heads=heads_t, neurons=neurons_t, emb=emb if per_position else emb.sum(),
                         attn_bias=attn_b, mlp_bias=mlp_b)


def frozen_norm(engine: Engine, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A LayerNorm/RMSNorm with its scale detached: same value, but linear in x for autograd
    (the convention of direct effects and traces, as in Transformer Debugger). Computed in
    float32, returned in x's dtype (pass float32 x to keep float32)."""
    return apply_norm(engine.adapter, module, x, engine.spec.norm, frozen=True).to(x.dtype)


def write_factor(engine: Engine, run: CleanRun, kind: str, layer: int, positions) -> torch.Tensor | None:
    """What the post-norm after block `layer`'s attention (kind "attn") or MLP ("mlp")
    multiplies its raw output by, frozen at the clean run: gain / rms(raw) [P, d_model] in
    float32; None where the family has no post-norm."""
    pos = torch.as_tensor(positions, device=engine.device)
    site = kind_site("head", layer) if kind == "attn" else kind_site("neuron", layer)
    return post_norm_factor(engine, kind, layer, run.acts[site][0, pos])


def post_norm_factor(engine: Engine, kind: str, layer: int, acts: torch.Tensor) -> torch.Tensor | None:
    """`write_factor` from the activations themselves: `acts` is hook_z [P, heads, d_head]
    (kind "attn") or mlp.hook_post [P, d_mlp] ("mlp"), from which the raw output is rebuilt
    with the output weights; None where the family has no post-norm."""
    a = engine.adapter
    norm = a.post_attn_norm(layer) if kind == "attn" else a.post_mlp_norm(layer)
    if norm is None:
        return None
    if kind == "attn":
        raw = torch.einsum("phk,hkd->pd", acts.float(), a.W_O(layer).float())
        bias = a.b_O(layer)
    else:
        raw = acts.float() @ a.W_out(layer).float()
        bias = a.b_out(layer)
    raw = raw + bias.float() if bias is not None else raw
    gain = a.norm_gain(norm)
    return norm_scale(raw, "rmsnorm", norm_eps(norm)) * (gain.float() if gain is not None else 1.0)


@contextmanager
def frozen_norms(engine: Engine, modules: list[torch.nn.Module]) -> Iterator[None]:
    """Inside the block, these norm modules run with their scale frozen (hooks removed on exit)."""
    def hook(mod, args, output):
        return frozen_norm(engine, mod, args[0])

    with engine.lock:
        handles = [m.register_forward_hook(hook) for m in modules if m is not None]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
