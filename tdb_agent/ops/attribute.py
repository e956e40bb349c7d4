"""Attribution of a metric to components: direct effect and act x grad (docs/DESIGN.md §4).

direct_effect: a component's write at the last position · g, where g = ∂metric/∂(final
residual stream) with the final norm's scale frozen. For logit_diff this is exact: the
effects of every head and neuron, the embedding and the named bias terms add up to the
metric. It needs the clean run only (cached) and one tiny backward through the final norm.

act_times_grad (attribution patching): (a − a_ref) · ∂metric/∂a summed over positions and
the component's dimensions, with a_ref = 0, the mean activation, or the activation on a
corrupted prompt. One forward and one backward pass serve every component.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, Field

from tdb_agent.engine import Engine
from tdb_agent.engine.component_sites import EMBED_SITE, kind_site
from tdb_agent.errors import TdbError
from tdb_agent.ops.decompose import decompose, frozen_norm
from tdb_agent.ops.metrics import Metric, MetricName, make_metric
from tdb_agent.ops.runs import CleanRun, RunCache, get_mean, get_run
from tdb_agent.ops import sae_ops, transcoder_ops

Method = Literal["direct_effect", "act_times_grad"]
Reference = Literal["zero", "mean", "corrupted"]
AttrKind = Literal["head", "neuron", "attn", "mlp", "emb", "sae", "transcoder"]
ALL_KINDS: tuple[AttrKind, ...] = ("head", "neuron", "attn", "mlp", "emb", "sae", "transcoder")


class AttributionRow(BaseModel):
    id: str
    kind: str
    layer: int | None = None
    index: int | None = None
    position: int | None = None
    effect: float
    share: float = Field(description="effect / sum of |effect| over all rows of this kind")


class AttributionResult(BaseModel):
    prompt: str
    method: Method
    reference: Reference | None = None
    metric_name: MetricName
    metric: float = Field(description="metric on the clean prompt")
    metric_reference: float | None = Field(None, description="metric on the corrupted prompt, if given")
    rows: list[AttributionRow]
    n_ranked: int = Field(description="rows before top_k was applied")
    total_effect: float = Field(description="sum of effects over all heads, neurons and the embedding")
    remainder: dict[str, float] = Field(description="named terms that are not components (biases, ...)")
    sum_check: float = Field(description="total_effect + remainder; equals `metric` for direct_effect "
                                         "with logit_diff")


def final_gradient(engine: Engine, run: CleanRun, metric: Metric) -> tuple[torch.Tensor, float]:
    """g = ∂metric/∂(final residual at the last position), final norm scale frozen, and the
    metric value. Runs the final norm and the needed unembedding rows only."""
    with torch.enable_grad():
        x = run.acts["hook_resid_final"][0, -1].detach().float().requires_grad_(True)  # float32 (§4)
        normed = frozen_norm(engine, engine.adapter.final_norm(), x)
        logits = engine.unembed(normed[None], metric.logit_ids())
        m = metric.from_logits(logits)[0]
        (g,) = torch.autograd.grad(m, x)
    return g, m.item()


def _component_id(kind: str, layer: int, unit: int) -> tuple[str, int | None, int | None]:
    if kind.startswith("sae@"):  # 'sae@L{l}.{site}': one SAE's latents (see ops/sae_ops.py)
        return sae_ops.latent_row_id(kind, unit), int(kind[5:].split(".")[0]), unit
    if kind.startswith("transcoder@"):  # 'transcoder@L{l}': one layer's transcoder features
        layer = int(kind.split("@L", 1)[1])
        return f"L{layer}.tc.F{unit}", layer, unit
    if kind == "head":
        return f"L{layer}.H{unit}", layer, unit
    if kind == "neuron":
        return f"L{layer}.N{unit}", layer, unit
    if kind == "emb":
        return "EMB", None, None
    return f"L{layer}.{kind.upper()}", layer, None


def _rank(effects: dict[str, torch.Tensor], positions: list[int] | None, top_k: int | None
          ) -> tuple[list[AttributionRow], int]:
    """Rows for the top_k largest |effect| over all kinds, ranked in torch (a model can have
    hundreds of thousands of neurons). effects: kind -> [P, layers, units]; positions: the
    P positions, or None when effects are summed over positions."""
    flat, owners = [], []
    for kind, e in effects.items():
        flat.append(e.flatten().float())
        owners.append((kind, e.shape))
    allv = torch.cat(flat)
    n = allv.numel()
    k = n if top_k is None else min(top_k, n)
    top = allv.abs().topk(k).indices.tolist()
    abs_sum: dict[str, float] = {}
    for kind, e in effects.items():  # shares are per kind; every SAE's latents share kind 'sae'
        abs_sum[kind.split("@")[0]] = abs_sum.get(kind.split("@")[0], 0.0) + e.abs().sum().item()
    offsets, acc = [], 0
    for f in flat:
        offsets.append(acc)
        acc += f.numel()
    rows = []
    values = allv[top].tolist()
    for i, v in zip(top, values):
        j = max(o for o in range(len(offsets)) if offsets[o] <= i)
        kind, (P, L, U) = owners[j]
        p, rest = divmod(i - offsets[j], L * U)
        layer, unit = divmod(rest, U)
        base, lay, index = _component_id(kind, layer, unit)
        pos = positions[p] if positions is not None else None
        kind = kind.split("@")[0]
        rows.append(AttributionRow(id=_pid(base, pos), kind=kind, layer=lay, index=index, position=pos,
                                   effect=v, share=v / abs_sum[kind] if abs_sum[kind] else 0.0))
    return rows, n


def _check_kinds(kinds) -> tuple[str, ...]:
    kinds = tuple(kinds or ("head", "neuron"))
    bad = [k for k in kinds if k not in ALL_KINDS]
    if bad:
        raise TdbError(f"unknown kinds {bad}; kinds are {', '.join(ALL_KINDS)}")
    return kinds


def attribute(engine: Engine, prompt: str, target: str, distractor: str | None = None,
              method: Method = "direct_effect", corrupted_prompt: str | None = None,
              reference: Reference | None = None, kinds=None, top_k: int | None = 20,
              per_position: bool = False, metric: MetricName | None = None,
              cache: RunCache | None = None) -> AttributionResult:
    """Attribute the metric on the prompt's next token to components, ranked by |effect|.

    Args:
        prompt: the text to run.
        target: the single token whose logit or probability is explained.
        distractor: optional single token; with it the metric is logit_diff
            (logit[target] - logit[distractor] at the last position), without it logprob.
        method: "direct_effect" (a component's write at the last position dotted with the
            gradient of the metric w.r.t. the final residual stream, final norm frozen; exact
            for logit_diff) or "act_times_grad" ((a - a_ref) x d metric / d a, summed over
            positions and the component's dimensions; one forward and one backward).
        corrupted_prompt: for act_times_grad with reference "corrupted": the prompt whose
            activations are a_ref (same number of tokens).
        reference: act_times_grad's a_ref: "zero", "mean" (mean over the reference set) or
            "corrupted"; default corrupted if a corrupted_prompt is given, else zero.
        kinds: component kinds to rank, among head, neuron, attn, mlp, emb, sae (default head
            and neuron).
        top_k: how many rows to return (None: all).
        per_position: report components with their position (ids with @position; for
            direct_effect the last position) instead of summing over positions.
        metric: force "logit_diff" or "logprob" (default as described for distractor).

    Returns:
        AttributionResult: the metric's value (and on the corrupted prompt), ranked rows (id,
        kind, layer, index, position, effect, share), n_ranked, total_effect over all heads,
        neurons and the embedding, named remainder terms (biases, first-order error) and
        sum_check = total_effect + remainder.
    """
    kinds = _check_kinds(kinds)
    m = make_metric(engine, target, distractor, metric)
    with engine.lock:
        if method == "direct_effect":
            return _direct_effect(engine, get_run(engine, prompt, cache), m, kinds, top_k, per_position)
        if method == "act_times_grad":  # its own forward + backward: the clean run is not needed
            ref = reference or ("corrupted" if corrupted_prompt else "zero")
            return _act_times_grad(engine, prompt, m, kinds, top_k, per_position, ref, corrupted_prompt, cache)
    raise TdbError(f"unknown method {method!r}; methods: direct_effect, act_times_grad")


def _direct_effect(engine, run, m, kinds, top_k, per_position) -> AttributionResult:
    spec = engine.spec
    g, value = final_gradient(engine, run, m)
    last = run.n_tokens - 1
    d = decompose(engine, run, [last], g[None], spec.n_layers, spec.n_layers)
    x_dot_g = (run.acts["hook_resid_final"][0, -1].float() * g).sum().item()
    effects: dict[str, torch.Tensor] = {}
    if "head" in kinds:
        effects["head"] = d.heads[None]
    if "neuron" in kinds:
        effects["neuron"] = d.neurons[None]
    if "attn" in kinds:
        effects["attn"] = (d.heads.sum(1) + d.attn_bias)[None, :, None]
    if "mlp" in kinds:
        effects["mlp"] = (d.neurons.sum(1) + d.mlp_bias)[None, :, None]
    if "emb" in kinds:
        effects["emb"] = d.emb.reshape(1, 1, 1)
    if "sae" in kinds:
        effects |= sae_ops.direct_effects(engine, run, g)
    if "transcoder" in kinds:
        effects |= transcoder_ops.direct_effects(engine, run, g)
    rows, n = _rank(effects, [last] if per_position else None, top_k)
    total = (d.heads.sum() + d.neurons.sum() + d.emb).item()
    if engine.adapter.final_softcap:  # the cap is nonlinear: g is its derivative at the clean point
        const_name = "final_norm_bias_and_softcap_nonlinearity"
    elif m.name == "logit_diff":
        const_name = "final_norm_and_unembed_bias"
    else:
        const_name = "final_norm_bias_and_nonlinearity"
    remainder = {"attn_output_biases": d.attn_bias.sum().item(), "mlp_output_biases": d.mlp_bias.sum().item(),
                 const_name: value - x_dot_g}
    return AttributionResult(prompt=run.prompt, method="direct_effect", metric_name=m.name, metric=value,
                             rows=rows, n_ranked=n, total_effect=total, remainder=remainder,
                             sum_check=total + sum(remainder.values()))


def _pid(base: str, pos: int | None) -> str:
    return base if pos is None else f"{base}@{pos}"


def _sites_for(engine: Engine, kinds) -> dict[str, tuple[str, int]]:
    """site -> (kind, layer) for the act x grad capture."""
    out: dict[str, tuple[str, int]] = {}
    for kind in ("head", "neuron", "attn", "mlp"):  # kind by kind, layers in order
        if kind in kinds:
            out |= {kind_site(kind, layer): (kind, layer) for layer in range(engine.spec.n_layers)}
    if "emb" in kinds:
        out[EMBED_SITE] = ("emb", 0)
    return out


def metric_gradients(engine: Engine, ids: torch.Tensor, metric: Metric,
                     sites: list[str]) -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One forward and one backward: the metric, activations and ∂metric/∂activation at sites."""
    def make_leaf(x, site):
        return x.detach().requires_grad_(True)

    with torch.enable_grad():
        out, acts = engine.run_with_cache(ids, sites, hooks={EMBED_SITE: make_leaf},
                                          logit_positions=[-1], logit_ids=metric.logit_ids())
        value = metric.from_logits(out.logits[:, -1])[0]
        grads = torch.autograd.grad(value, [acts[s] for s in sites], allow_unused=True)
    return value.item(), {s: a.detach() for s, a in acts.items()}, {
        s: (gr if gr is not None else torch.zeros_like(acts[s])) for s, gr in zip(sites, grads)}


def _act_times_grad(engine, prompt, m, kinds, top_k, per_position, reference, corrupted_prompt, cache):
    spec = engine.spec
    ids = engine.to_tokens(prompt)
    n_tokens = ids.shape[1]
    if reference == "corrupted":
        if not corrupted_prompt:
            raise TdbError("reference 'corrupted' needs a corrupted_prompt")
        corrupted = get_run(engine, corrupted_prompt, cache)
        if corrupted.n_tokens != n_tokens:
            raise TdbError(f"the corrupted prompt has {corrupted.n_tokens} tokens but the prompt has "
                           f"{n_tokens}; patching needs prompts of the same length")
    site_kinds = _sites_for(engine, kinds)
    # the full set of fine components, for the total: heads, neurons, embedding
    fine = _sites_for(engine, ("head", "neuron", "emb"))
    kind_of = fine | site_kinds
    sites = list(kind_of)
    value, acts, grads = metric_gradients(engine, ids, m, sites)

    def effect(site: str) -> torch.Tensor:
        a = acts[site]
        if reference == "zero":
            ref = torch.zeros((), dtype=a.dtype, device=a.device)
        elif reference == "mean":
            ref = get_mean(engine, site, cache)
        else:
            ref = corrupted.acts[site]
        e = (a.float() - ref.float()) * grads[site].float()  # [1, s, ...], accumulated in float32
        # per position and unit: heads sum over d_head, whole-vector sites over d_model
        kind = kind_of[site][0]
        if kind == "head":
            return e[0].sum(-1)  # [s, h]
        if kind == "neuron":
            return e[0]  # [s, d_mlp]
        return e[0].sum(-1, keepdim=True)  # [s, 1]

    effects = {s: effect(s) for s in sites}
    by_kind: dict[str, list[torch.Tensor]] = {}
    for site, (kind, layer) in site_kinds.items():
        by_kind.setdefault(kind, []).append(effects[site])  # layers in order
    stacked = {kind: torch.stack(v, dim=1) for kind, v in by_kind.items()}  # [s, layers, units]
    if not per_position:
        stacked = {kind: v.sum(0, keepdim=True) for kind, v in stacked.items()}
    if "sae" in kinds:
        stacked |= sae_ops.act_times_grad(engine, ids, m, reference, corrupted if reference == "corrupted" else None,
                                          per_position)
    if "transcoder" in kinds:
        stacked |= transcoder_ops.act_times_grad(engine, ids, m, reference,
                                                 corrupted if reference == "corrupted" else None, per_position)
    rows, n = _rank(stacked, list(range(n_tokens)) if per_position else None, top_k)
    total = sum(effects[s].sum().item() for s in fine)
    metric_ref = None
    remainder: dict[str, float] = {}
    if reference == "corrupted":
        metric_ref = m.from_logits(corrupted.logits[None])[0].item()
        remainder["first_order_error"] = (value - metric_ref) - total
    return AttributionResult(prompt=prompt, method="act_times_grad", reference=reference, metric_name=m.name,
                             metric=value, metric_reference=metric_ref, rows=rows, n_ranked=n,
                             total_effect=total, remainder=remainder, sum_check=total + sum(remainder.values()))
