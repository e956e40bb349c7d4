"""Transcoder features (`L{l}.tc.F{i}`, engine/transcoder.py) in the operations: their
activations, ablation/patch hooks and steering directions. ablate and steer call in here
for components of kind `transcoder`.

Conventions (docs/DESIGN.md §4, as for SAE latents):
* activation of a feature = its transcoder's encoding of the clean MLP input of its layer;
* ablating a feature changes every MLP output it writes to by (f' - f) · W_dec (the error
  term is kept), with f' zero, its mean over the reference set, or its value on the
  corrupted prompt;
* its steering direction is its decoder row into its own layer's MLP output.
"""

from __future__ import annotations

import torch

from tdb_agent.components import Component
from tdb_agent.engine import Engine
from tdb_agent.engine.component_sites import kind_site
from tdb_agent.errors import TdbError
from tdb_agent.ops.runs import CleanRun, reference_documents


def _tcs(engine: Engine):
    if engine.transcoders is None:
        raise TdbError("transcoder features need transcoders loaded (tdb-agent serve --transcoders PATH)")
    return engine.transcoders


@torch.no_grad()
def feature_acts(engine: Engine, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Feature activations of every transcoder layer on a prompt: {layer: [s, d_tc]}."""
    cap: dict[int, torch.Tensor] = {}
    engine.forward(ids, hooks=_tcs(engine).splice_hooks(capture=cap), logit_positions=[-1], logit_ids=[0])
    return {l: f[0] for l, f in cap.items()}


@torch.no_grad()
def feature_means(engine: Engine) -> dict[int, torch.Tensor]:
    """Mean feature activation over every token of the reference set, per layer (cached)."""
    tcs = _tcs(engine)
    cached = getattr(tcs, "means", None)
    if cached is not None:
        return cached
    total: dict[int, torch.Tensor] = {}
    count = 0
    for text in reference_documents(engine):
        ids = engine.to_tokens(text, truncate=True)
        for l, f in feature_acts(engine, ids).items():
            total[l] = total[l] + f.sum(0) if l in total else f.sum(0)
        count += ids.shape[1]
    tcs.means = {l: v / count for l, v in total.items()}
    return tcs.means


def component_hooks(engine: Engine, comps: list[Component], mode: str, source: CleanRun | None) -> dict:
    """Splice hooks that set the chosen features (at their positions) to zero, their mean,
    or their value on `source`; everything else passes through exactly."""
    tcs = _tcs(engine)
    by_layer: dict[int, list[Component]] = {}
    for c in comps:
        by_layer.setdefault(c.layer, []).append(c)
    if mode == "mean":
        values = feature_means(engine)
    elif mode == "resample":
        if source is None:
            raise TdbError("mode 'resample' needs a corrupted_prompt")
        values = {l: f[None] for l, f in feature_acts(engine, source.ids).items()}
    else:
        values = {}
    fns = {}
    for layer, cs in by_layer.items():
        def rewrite(f, cs=cs, value=values.get(layer)):
            mask = torch.zeros(f.shape[-2:], dtype=torch.bool, device=f.device)
            for c in cs:
                mask[slice(None) if c.position is None else c.position, c.index] = True
            new = torch.zeros((), dtype=f.dtype, device=f.device) if value is None else value.to(f.dtype)
            return torch.where(mask, new, f)
        fns[layer] = [rewrite]
    return tcs.splice_hooks(fns)


def steering_vector(engine: Engine, c: Component) -> tuple[str, torch.Tensor]:
    """A feature's decoder row into its own layer's MLP output."""
    tc = _tcs(engine).get(c.layer)
    return kind_site("mlp", c.layer), tc.W_dec[c.index, 0].to(engine.dtype)


def direct_effects(engine: Engine, run: CleanRun, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """kind key 'transcoder@L{l}' -> [1, 1, d_tc]: f_i(last) · (sum over the MLP outputs it
    writes of W_dec[i, o] · g), g = ∂metric/∂(final residual), final norm frozen."""
    acts = feature_acts(engine, run.ids)
    out = {}
    for l, tc in _tcs(engine).layers.items():
        dec = tc.W_dec.sum(1)  # every output it writes reaches the final residual directly
        out[f"transcoder@L{l}"] = (acts[l][-1] * (dec @ g.to(dec.dtype)))[None, None]
    return out


def act_times_grad(engine: Engine, ids: torch.Tensor, metric, reference: str, corrupted: CleanRun | None,
                   per_position: bool) -> dict[str, torch.Tensor]:
    """kind key -> [s or 1, 1, d_tc]: (f - f_ref) · ∂metric/∂f, one forward and backward
    with the transcoders spliced. ∂metric/∂f is the real model's: a zero-valued leaf is added
    to each layer's features, so a change flows through its decoder rows and then through the
    real MLPs downstream (later features are not held fixed; the forward value is unchanged)."""
    tcs = _tcs(engine)
    leaves: dict[int, torch.Tensor] = {}
    feats: dict[int, torch.Tensor] = {}

    def leaf(l):
        def fn(f):
            feats[l] = f.detach()
            leaves[l] = torch.zeros_like(f).requires_grad_(True)
            return f + leaves[l]
        return fn
    with torch.enable_grad():
        out = engine.forward(ids, hooks=tcs.splice_hooks({l: [leaf(l)] for l in tcs.layers}),
                             logit_positions=[-1], logit_ids=metric.logit_ids())
        value = metric.from_logits(out.logits[:, -1])[0]
        keys = list(leaves)
        grads = torch.autograd.grad(value, [leaves[k] for k in keys], allow_unused=True)
    refs = feature_means(engine) if reference == "mean" else (
        feature_acts(engine, corrupted.ids) if reference == "corrupted" else {})
    effects = {}
    for l, gr in zip(keys, grads):
        f = feats[l][0]
        gr = torch.zeros_like(f) if gr is None else gr[0]
        e = (f - refs[l] if l in refs else f) * gr
        effects[f"transcoder@L{l}"] = e[:, None] if per_position else e.sum(0)[None, None]
    return effects
