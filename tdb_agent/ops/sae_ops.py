"""SAE latents in the operations: their activations, ablation/patch hooks, attribution,
sweeps and upstream traces. The other ops modules call in here for components of kind
`sae` (ids `L{l}.{resid|mlp|attn}.F{i}`); the SAEs are those attached to `engine.saes`.

Conventions (docs/DESIGN.md §4, applied to latents):
* activation of a latent = its SAE's encoding of the site's clean activation;
* ablating a latent changes the site by (f'_i − f_i) · W_dec[i] (the error term is kept);
  zero removes exactly its decoder contribution f_i · W_dec[i];
* direct effect = f_i(last) · (W_dec[i] · g), g = ∂metric/∂(final residual), final norm frozen;
* act × grad = (f − f_ref) · ∂metric/∂f, summed over positions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tdb_agent.components import Component, hook_site
from tdb_agent.engine import Engine
from tdb_agent.engine.sae import SAE, splice_hook
from tdb_agent.engine.component_sites import sae_site
from tdb_agent.engine.transcoder import tc_sizes
from tdb_agent.errors import Cancelled, TdbError
from tdb_agent.ops.runs import CleanRun, reference_documents


def sae_sizes(engine: Engine) -> dict[tuple[int, str], int]:
    """SAE sizes by (layer, site), plus transcoder feature counts by (layer, "tc"): what
    `parse_component` range-checks latents and features against (the one definition)."""
    return engine.saes.sizes() | tc_sizes(engine)


def sae_for(engine: Engine, c: Component) -> SAE:
    return engine.saes.get(c.layer, c.sae_site)


def latent_acts(engine: Engine, run: CleanRun, layer: int, site: str) -> torch.Tensor:
    """Latent activations of the SAE at (layer, site) on a clean run: [s, d_sae]."""
    sae = engine.saes.get(layer, site)
    with torch.no_grad():
        return sae.encode(run.acts[sae_site(layer, site)][0])


@torch.no_grad()
def latent_mean(engine: Engine, layer: int, site: str, prompts: list[str] | None = None) -> torch.Tensor:
    """Mean latent activation over every token of the reference set (as `reference_means`)."""
    key = (layer, site)
    means = engine.saes.latent_means
    if prompts is None and key in means:
        return means[key]
    sae = engine.saes.get(layer, site)
    s_name = sae_site(layer, site)
    total, count = None, 0
    for text in prompts or reference_documents(engine):
        ids = engine.to_tokens(text, truncate=True)
        _, acts = engine.run_with_cache(ids, [s_name], logit_positions=[-1], logit_ids=[0])
        f = sae.encode(acts[s_name][0]).sum(0)
        total = f if total is None else total + f
        count += ids.shape[1]
    mean = total / count
    if prompts is None:
        means[key] = mean
    return mean


def _replacement(engine: Engine, layer: int, site: str, mode: str, source: CleanRun | None) -> torch.Tensor | None:
    if mode == "zero":
        return None
    if mode == "mean":
        return latent_mean(engine, layer, site)
    if source is None:
        raise TdbError("mode 'resample' needs a corrupted_prompt")
    return latent_acts(engine, source, layer, site)[None]  # [1, s, d_sae]


def sae_component_hooks(engine: Engine, comps: list[Component], mode: str, source: CleanRun | None) -> dict:
    """One splice hook per SAE site that sets the chosen latents (at their positions) to
    zero, their mean, or their value in `source`; everything else passes through exactly."""
    by_key: dict[tuple[int, str], list[Component]] = {}
    for c in comps:
        by_key.setdefault((c.layer, c.sae_site), []).append(c)
    hooks: dict[str, list] = {}
    for (layer, site), cs in by_key.items():
        sae = engine.saes.get(layer, site)
        value = _replacement(engine, layer, site, mode, source)

        def rewrite(f, cs=cs, value=value):
            mask = torch.zeros(f.shape[-2:], dtype=torch.bool, device=f.device)  # [s, d_sae]
            for c in cs:
                if c.position is None:
                    mask[:, c.index] = True
                else:
                    mask[c.position, c.index] = True
            new = torch.zeros((), dtype=f.dtype, device=f.device) if value is None else value.to(f.dtype)
            return torch.where(mask, new, f)

        hooks.setdefault(hook_site(cs[0])[0], []).append(splice_hook(sae, [rewrite]))
    return hooks


def direct_effects(engine: Engine, run: CleanRun, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """kind key 'sae@L{l}.{site}' -> [1, 1, d_sae]: f_i(last) · (W_dec[i] · g)."""
    out = {}
    for (layer, site), sae in engine.saes.items():
        f = latent_acts(engine, run, layer, site)[-1]
        out[f"sae@L{layer}.{site}"] = (f * (sae.W_dec @ g.to(sae.W_dec.dtype)))[None, None]
    return out


def act_times_grad(engine: Engine, ids: torch.Tensor, metric, reference: str, corrupted: CleanRun | None,
                   per_position: bool) -> dict[str, torch.Tensor]:
    """kind key -> [s or 1, 1, d_sae]: (f − f_ref) · ∂metric/∂f, one forward and backward with
    every attached SAE spliced (the latents are leaves; the forward value is unchanged)."""
    leaves: dict = {}
    hooks: dict[str, list] = {}
    for key, sae in engine.saes.items():
        def leaf(f, key=key):
            leaves[key] = f.detach().requires_grad_(True)
            return leaves[key]
        hooks.setdefault(sae_site(*key), []).append(splice_hook(sae, [leaf]))
    if not hooks:
        raise TdbError("kind 'sae' needs an SAE loaded (tdb-agent serve --sae PATH)")
    with torch.enable_grad():
        out = engine.forward(ids, hooks=hooks, logit_positions=[-1], logit_ids=metric.logit_ids())
        value = metric.from_logits(out.logits[:, -1])[0]
        keys = list(leaves)
        grads = torch.autograd.grad(value, [leaves[k] for k in keys], allow_unused=True)
    effects = {}
    for key, gr in zip(keys, grads):
        f = leaves[key].detach()[0]
        gr = torch.zeros_like(f) if gr is None else gr[0]
        if reference == "zero":
            ref = torch.zeros((), dtype=f.dtype, device=f.device)
        elif reference == "mean":
            ref = latent_mean(engine, *key)
        else:
            ref = latent_acts(engine, corrupted, *key)
        e = (f - ref) * gr  # [s, d_sae]
        e = e[:, None] if per_position else e.sum(0)[None, None]
        effects[f"sae@L{key[0]}.{key[1]}"] = e
    return effects


def latent_row_id(kind: str, unit: int) -> str:
    """'sae@L1.resid', 7 -> 'L1.resid.F7'."""
    return f"{kind.split('@', 1)[1]}.F{unit}"


@torch.no_grad()
def sweep(engine: Engine, run: CleanRun, metric, before: float, mode: str, source: CleanRun | None,
          pos_list: list[int] | None, batch_size: int, progress=None,
          should_stop: Callable[[], bool] | None = None) -> tuple[list[tuple[str, int, int, float]], int, int]:
    """Every latent of every attached SAE ablated alone. Rows (id, layer, latent, delta);
    with mode 'zero', latents inactive at the ablated positions have delta exactly 0 and are
    not run. Returns (rows, n_components, forward passes)."""
    if not len(engine.saes):
        raise TdbError("kind 'sae' needs an SAE loaded (tdb-agent serve --sae PATH)")
    s = run.n_tokens
    jobs = []
    for (layer, site), sae in engine.saes.items():
        f = latent_acts(engine, run, layer, site)
        sel = f if pos_list is None else f[pos_list]
        latents = torch.arange(sae.d_sae, device=f.device)
        if mode == "zero":
            latents = latents[(sel != 0).any(0)]
        jobs.append((layer, site, sae, latents.tolist()))
    total = sum(sae.d_sae for _, _, sae, _ in jobs)
    to_run = sum(len(l) for *_, l in jobs)
    rows, passes, done = [], 0, 0
    pos_mask = torch.ones(s, dtype=torch.bool, device=engine.device)
    if pos_list is not None:
        pos_mask[:] = False
        pos_mask[pos_list] = True
    for layer, site, sae, latents in jobs:
        value = _replacement(engine, layer, site, mode, source)
        resid = run.acts[f"blocks.{layer}.hook_resid_pre"]
        for i0 in range(0, len(latents), batch_size):
            if should_stop is not None and should_stop():
                raise Cancelled(f"ablation sweep cancelled after {done} of {to_run} latents")
            chunk = latents[i0:i0 + batch_size]
            b = len(chunk)
            idx = torch.tensor(chunk, device=engine.device)
            mask = torch.zeros(b, s, sae.d_sae, dtype=torch.bool, device=engine.device)
            mask[torch.arange(b), :, idx] = True
            mask &= pos_mask[None, :, None]

            def rewrite(f, mask=mask, value=value):
                new = torch.zeros((), dtype=f.dtype, device=f.device) if value is None else value.to(f.dtype)
                return torch.where(mask, new, f)

            out = engine.forward(run.ids.expand(b, -1), start_layer=layer, resid=resid.expand(b, -1, -1),
                                 hooks={sae_site(layer, site): splice_hook(sae, [rewrite])},
                                 logit_ids=metric.logit_ids())
            deltas = (metric.from_logits(out.logits[:, -1]) - before).tolist()
            rows += [(f"L{layer}.{site}.F{i}", layer, i, d) for i, d in zip(chunk, deltas)]
            passes += 1
            done += b
            if progress is not None:
                progress(done, to_run)
    return rows, total, passes


def steering_vector(engine: Engine, c: Component) -> tuple[str, torch.Tensor]:
    """A latent's decoder row, added at its SAE's site."""
    sae = sae_for(engine, c)
    return hook_site(c)[0], sae.W_dec[c.index].to(engine.dtype)
