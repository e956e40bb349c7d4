"""Statistics of a component's weights, computed without a forward pass: what a component
page shows before any dataset exists (norms, rank among the layer's units, and the tokens an
output direction promotes or suppresses through the final norm and the unembedding)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field

from tdb_agent.components import Component
from tdb_agent.engine import Engine
from tdb_agent.ops.lens import top_tokens


class TokenScore(BaseModel):
    token: str
    score: float


class WeightStats(BaseModel):
    """Statistics of the weights behind one component (no forward pass needed)."""

    matrix: str = Field(description="which weights, e.g. W_O[L1.H2] [d_head, d_model]")
    norm: float = Field(description="Frobenius norm")
    layer_mean_norm: float | None = Field(None, description="mean norm of the same matrix over the layer's units")
    rank_in_layer: int | None = Field(None, description="0 = the largest norm in its layer")
    units_in_layer: int | None = None
    bias_norm: float | None = None
    promotes: list[TokenScore] | None = Field(None, description="tokens whose logits the output direction "
                                              "raises most, through the final norm's gain and the unembedding "
                                              "(scores are up to the final norm's positive per-token scale)")
    suppresses: list[TokenScore] | None = None


def _norm(t: torch.Tensor | None) -> float | None:
    return None if t is None else float(t.detach().float().norm())


def _unit_stats(name: str, mats: torch.Tensor, index: int, bias: torch.Tensor | None = None) -> WeightStats:
    """Norm of unit `index` of `mats` [units, ...] and its rank among the layer's units."""
    norms = mats.detach().float().flatten(1).norm(dim=1)
    return WeightStats(matrix=f"{name} {list(mats.shape[1:])}", norm=float(norms[index]),
                       layer_mean_norm=float(norms.mean()), rank_in_layer=int((norms > norms[index]).sum()),
                       units_in_layer=norms.numel(), bias_norm=_norm(bias))


def _token_effects(engine: Engine, direction: torch.Tensor, k: int = 8) -> tuple[list[TokenScore], list[TokenScore]]:
    """Logit effect of adding `direction` [d_model] to the final residual stream, through the
    final norm with its per-token scale frozen (so only its centring and gain apply)."""
    up, down = top_tokens(engine, direction, k)
    return ([TokenScore(token=t, score=round(s, 5)) for t, s in up],
            [TokenScore(token=t, score=round(s, 5)) for t, s in down])


@torch.no_grad()
def weight_stats(engine: Engine, c: Component) -> list[WeightStats]:
    """Statistics of the weights behind component `c`: norms, rank in its layer and, for
    neurons and SAE latents, the tokens its output direction promotes and suppresses."""
    a = engine.adapter
    if c.kind == "head":
        return [_unit_stats(f"W_O[L{c.layer}.H{c.index}]", a.W_O(c.layer), c.index)]
    if c.kind == "neuron":
        stats = _unit_stats(f"W_out[L{c.layer}.N{c.index}]", a.W_out(c.layer), c.index)
        stats.promotes, stats.suppresses = _token_effects(engine, a.W_out(c.layer)[c.index])
        return [stats]
    if c.kind == "attn":
        w = a.W_O(c.layer)
        return [WeightStats(matrix=f"W_O[L{c.layer}] {list(w.shape)}", norm=_norm(w), bias_norm=_norm(a.b_O(c.layer)))]
    if c.kind == "mlp":
        w = a.W_out(c.layer)
        return [WeightStats(matrix=f"W_out[L{c.layer}] {list(w.shape)}", norm=_norm(w),
                            bias_norm=_norm(a.b_out(c.layer)))]
    if c.kind == "emb":
        out = []
        for site, mod in a.embed_modules().items():
            w = getattr(mod, "weight", None)
            if w is not None:
                rows = w.detach().float().norm(dim=1)
                out.append(WeightStats(matrix=f"{site} {list(w.shape)}", norm=_norm(w),
                                       layer_mean_norm=float(rows.mean())))
        return out
    if c.kind == "logits":
        w = a.W_U()
        return [WeightStats(matrix=f"W_U {list(w.shape)}", norm=_norm(w), bias_norm=_norm(a.b_U()))]
    if c.kind == "sae":
        sae = engine.saes.get(c.layer, c.sae_site)
        name = f"L{c.layer}.{c.sae_site}.F{c.index}"
        dec = _unit_stats(f"W_dec[{name}]", sae.W_dec, c.index)
        dec.promotes, dec.suppresses = _token_effects(engine, sae.W_dec[c.index])
        return [dec, _unit_stats(f"W_enc[:, {name}]", sae.W_enc.T, c.index, bias=sae.b_enc[c.index:c.index + 1])]
    if c.kind == "transcoder" and engine.transcoders is not None:  # its decoder row into its own layer
        tc = engine.transcoders.get(c.layer)
        name = f"L{c.layer}.tc.F{c.index}"
        dec = _unit_stats(f"W_dec[{name}]", tc.W_dec[:, 0], c.index)
        dec.promotes, dec.suppresses = _token_effects(engine, tc.W_dec[c.index, 0])
        return [dec, _unit_stats(f"W_enc[:, {name}]", tc.W_enc.T, c.index, bias=tc.b_enc[c.index:c.index + 1])]
    return []
