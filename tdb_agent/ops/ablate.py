"""Ablation, batched ablation sweeps and activation patching (docs/DESIGN.md §4).

ablation effect = metric(ablated) − metric(clean), with `zero`, `mean` (mean over the
reference set, see `runs.reference_means`) or `resample` (the activation on the corrupted
prompt). Patching moves activations between a clean and a corrupted run.

Sweeps are exact but skip work that cannot change: rows of a batch ablate one component
each; the layers below the ablated layer start from the cached residual stream; only the
metric's logits at the last position are computed; and when only the last position is
ablated, earlier positions' keys and values are reused, so one position runs per row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from pydantic import BaseModel, Field

from tdb_agent.components import Component, hook_site, parse_component
from tdb_agent.engine import Engine
from tdb_agent.engine.interventions import intervention
from tdb_agent.engine.component_sites import kind_site
from tdb_agent.errors import Cancelled, TdbError
from tdb_agent.ops.basic import TokenPrediction
from tdb_agent.ops.metrics import MetricName, make_metric
from tdb_agent.ops.runs import CleanRun, RunCache, get_means, get_run
from tdb_agent.ops import sae_ops, transcoder_ops

Mode = Literal["zero", "mean", "resample"]
SweepKind = Literal["head", "neuron", "attn", "mlp", "sae"]
Progress = Callable[[int, int], None]


class AblateResult(BaseModel):
    prompt: str
    components: list[str]
    mode: Mode
    metric_name: MetricName
    before: float
    after: float
    delta: float = Field(description="after − before")
    top_after: list[TokenPrediction] = Field(description="top next tokens with the ablation")


class SweepRow(BaseModel):
    id: str
    kind: str
    layer: int
    index: int | None = None
    delta: float = Field(description="metric(ablated) − metric(clean)")


class SweepResult(BaseModel):
    prompt: str
    kind: SweepKind
    mode: Mode
    positions: str = Field(description="'all', 'last' or the list of ablated positions")
    metric_name: MetricName
    before: float
    rows: list[SweepRow]
    n_components: int
    forward_passes: int


class PatchResult(BaseModel):
    clean_prompt: str
    corrupted_prompt: str
    components: list[str]
    direction: Literal["denoise", "noise"]
    metric_name: MetricName
    metric_clean: float
    metric_corrupted: float
    metric_patched: float
    fraction_restored: float | None = Field(description="(patched − corrupted) / (clean − corrupted): 1 = the "
                                            "clean metric, 0 = the corrupted one; None when the two prompts give "
                                            "the same metric (nothing to restore)")


def resolve_components(engine: Engine, ids: Sequence[str], n_tokens: int) -> list[Component]:
    if isinstance(ids, str):
        ids = [ids]
    if not ids:
        raise TdbError("give at least one component id")
    comps = [parse_component(c, engine.spec, n_positions=n_tokens, sae_sizes=sae_ops.sae_sizes(engine))
             for c in ids]
    for c in comps:
        if c.kind == "logits":
            raise TdbError(f"{c.id} cannot be ablated here")
    return comps


def _check_same_length(a: CleanRun, b: CleanRun) -> None:
    if a.n_tokens != b.n_tokens:
        raise TdbError(f"the corrupted prompt has {b.n_tokens} tokens but the prompt has {a.n_tokens}; "
                       "resampling and patching need prompts of the same length (tokenize both)")


def resample_source(engine: Engine, run: CleanRun, mode: Mode, corrupted_prompt: str | None,
                    cache: RunCache | None) -> CleanRun | None:
    """The corrupted run that `resample` takes activations from (None for other modes)."""
    if mode != "resample":
        return None
    if not corrupted_prompt:
        raise TdbError("mode 'resample' needs a corrupted_prompt")
    source = get_run(engine, corrupted_prompt, cache)
    _check_same_length(run, source)
    return source


def replacement_value(site: str, mode: Mode, source: CleanRun | None,
                      means: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """What an ablated activation becomes: None (zero), the reference mean, or the source run's."""
    if mode == "zero":
        return None
    if mode == "mean":
        return means[site]
    if source is None:
        raise TdbError("mode 'resample' needs a corrupted_prompt")
    return source.acts[site]


def component_hooks(engine: Engine, comps: list[Component], mode: Mode, source: CleanRun | None,
                    cache: RunCache | None) -> dict[str, list]:
    """Engine hooks that ablate (or patch from `source`) each component."""
    hooks: dict[str, list] = {}
    for site, fns in sae_ops.sae_component_hooks(engine, [c for c in comps if c.kind == "sae"], mode,
                                                 source).items():
        hooks.setdefault(site, []).extend(fns)
    tc = [c for c in comps if c.kind == "transcoder"]
    for site, fns in (transcoder_ops.component_hooks(engine, tc, mode, source) if tc else {}).items():
        hooks.setdefault(site, []).extend(fns)
    plain = [c for c in comps if c.kind not in ("sae", "transcoder")]
    means = get_means(engine, [hook_site(c)[0] for c in plain], cache) if mode == "mean" else {}
    for c in plain:
        site, unit = hook_site(c)
        value = replacement_value(site, mode, source, means)
        hooks.setdefault(site, []).append(intervention(
            "zero" if mode == "zero" else "set", site, units=None if unit is None else [unit],
            positions=None if c.position is None else [c.position], value=value))
    return hooks


def _top(engine: Engine, logits: torch.Tensor, k: int = 5) -> list[TokenPrediction]:
    probs = logits.float().softmax(-1)
    top = probs.topk(k)
    return [TokenPrediction(token=engine.str_tokens([i])[0], id=i, prob=p, logit=logits[i].item())
            for p, i in zip(top.values.tolist(), top.indices.tolist())]


@torch.no_grad()
def ablate(engine: Engine, prompt: str, components: Sequence[str], target: str, distractor: str | None = None,
           mode: Mode = "zero", corrupted_prompt: str | None = None, metric: MetricName | None = None,
           cache: RunCache | None = None) -> AblateResult:
    """Ablate components together and measure the change in the metric.

    Args:
        prompt: the text to run.
        components: component ids (heads, neurons, attn, mlp, SAE latents; optionally @position
            to ablate at one position only, otherwise at every position).
        target: the single token whose logit or probability is measured.
        distractor: optional single token; with it the metric is logit_diff
            (logit[target] - logit[distractor] at the last position), without it logprob.
        mode: "zero" (set the activation to 0), "mean" (its mean over the reference set) or
            "resample" (its activation on corrupted_prompt).
        corrupted_prompt: for mode "resample": the prompt to take activations from (same
            number of tokens).
        metric: force "logit_diff" or "logprob" (default as described for distractor).

    Returns:
        AblateResult: the metric before and after the ablation, delta = after - before, and the
        top next tokens with the ablation.
    """
    m = make_metric(engine, target, distractor, metric)
    with engine.lock:
        run = get_run(engine, prompt, cache)
        comps = resolve_components(engine, components, run.n_tokens)
        source = resample_source(engine, run, mode, corrupted_prompt, cache)
        hooks = component_hooks(engine, comps, mode, source, cache)
        logits = engine.forward(run.ids, hooks=hooks).logits[0, -1]
    before = m.from_logits(run.logits[None])[0].item()
    after = m.from_logits(logits[None])[0].item()
    return AblateResult(prompt=prompt, components=[c.id for c in comps], mode=mode, metric_name=m.name,
                        before=before, after=after, delta=after - before, top_after=_top(engine, logits))


def _n_units(engine: Engine, kind: SweepKind) -> int:
    return {"head": engine.spec.n_heads, "neuron": engine.spec.d_mlp, "attn": 1, "mlp": 1}[kind]


@torch.no_grad()
def ablation_sweep(engine: Engine, prompt: str, kind: SweepKind, target: str, distractor: str | None = None,
                   mode: Mode = "zero", corrupted_prompt: str | None = None,
                   positions: Literal["all", "last"] | list[int] = "all", top_k: int | None = None,
                   metric: MetricName | None = None, batch_size: int = 64, max_batch_tokens: int = 16384,
                   cache: RunCache | None = None, progress: Progress | None = None,
                   should_stop: Callable[[], bool] | None = None) -> SweepResult:
    """Ablate every component of one kind, one at a time, and rank them by |change in metric|.

    Exact (one ablation per batch row), with work that cannot change skipped.

    Args:
        prompt: the text to run.
        kind: "head", "neuron", "attn", "mlp" or "sae" (every latent of every attached SAE).
        target: the single token whose logit or probability is measured.
        distractor: optional single token; with it the metric is logit_diff
            (logit[target] - logit[distractor] at the last position), without it logprob.
        mode: "zero", "mean" (mean over the reference set) or "resample" (the activation on
            corrupted_prompt).
        corrupted_prompt: for mode "resample": the prompt to take activations from (same
            number of tokens).
        positions: where each component is ablated: "all", "last" or a list of positions.
        top_k: how many rows to return (None: all).
        metric: force "logit_diff" or "logprob" (default as described for distractor).
        max_batch_tokens: cap on rows x positions per forward pass (bounds memory).
        batch_size: most components per forward pass.
        progress: called with (done, total) after each pass.
        should_stop: polled before each pass; returning True cancels the sweep.

    Returns:
        SweepResult: the metric before ablation, rows (id, kind, layer, index, delta =
        metric(ablated) - metric(clean)) ranked by |delta|, the positions used, the number of
        components swept and the forward passes run.
    """
    if kind not in ("head", "neuron", "attn", "mlp", "sae"):
        raise TdbError(f"unknown kind {kind!r}; sweep kinds: head, neuron, attn, mlp, sae")
    m = make_metric(engine, target, distractor, metric)
    spec = engine.spec
    with engine.lock:
        run = get_run(engine, prompt, cache)
        s = run.n_tokens
        if positions == "last":
            pos_list = [s - 1]
        elif positions == "all":
            pos_list = None
        else:
            pos_list = sorted(set(int(p) for p in positions))
            bad = [p for p in pos_list if not 0 <= p < s]
            if bad or not pos_list:
                raise TdbError(f"positions {bad or positions} out of range; the prompt has {s} tokens (0..{s - 1})")
        last_only = pos_list == [s - 1]
        source = resample_source(engine, run, mode, corrupted_prompt, cache)
        before = m.from_logits(run.logits[None])[0].item()
        if kind == "sae":  # every latent of every attached SAE (engine/sae.py)
            rows, n_all, passes = sae_ops.sweep(engine, run, m, before, mode, source, pos_list, batch_size,
                                                progress, should_stop)
            rows.sort(key=lambda r: -abs(r[3]))
            pos_desc = "last" if last_only else ("all" if pos_list is None else ",".join(map(str, pos_list)))
            return SweepResult(prompt=prompt, kind=kind, mode=mode, positions=pos_desc, metric_name=m.name,
                               before=before, rows=[SweepRow(id=i, kind="sae", layer=l, index=u, delta=d)
                                                    for i, l, u, d in rows[:top_k]], n_components=n_all,
                               forward_passes=passes)
        units = _n_units(engine, kind)
        width = 1 if last_only else s
        rows_per_pass = max(1, min(batch_size, max_batch_tokens // width))
        total = spec.n_layers * units
        done = 0
        passes = 0
        deltas = torch.empty(spec.n_layers, units, device=engine.device)
        means = get_means(engine, [kind_site(kind, l) for l in range(spec.n_layers)], cache) \
            if mode == "mean" else {}
        for layer in range(spec.n_layers):
            site = kind_site(kind, layer)
            value = replacement_value(site, mode, source, means)
            if value is not None and last_only and source is not None:
                value = value[:, -1:]
            resid = run.acts[f"blocks.{layer}.hook_resid_pre"]
            for u0 in range(0, units, rows_per_pass):
                if should_stop is not None and should_stop():
                    raise Cancelled(f"ablation sweep cancelled after {done} of {total} components")
                u1 = min(units, u0 + rows_per_pass)
                b = u1 - u0
                mask = _row_mask(kind, b, u0, units, 1 if last_only else s,
                                 None if (pos_list is None or last_only) else pos_list, engine.device)
                hook = intervention("zero" if mode == "zero" else "set", site, value=value, mask=mask)
                if last_only:
                    out = engine.forward(run.ids[:, -1:].expand(b, -1), hooks={site: hook}, start_layer=layer,
                                         resid=resid[:, -1:].expand(b, -1, -1), position_offset=s - 1,
                                         prefix_kv=run.prefix_kv(layer), logit_ids=m.logit_ids())
                else:
                    out = engine.forward(run.ids.expand(b, -1), hooks={site: hook}, start_layer=layer,
                                         resid=resid.expand(b, -1, -1), logit_ids=m.logit_ids())
                deltas[layer, u0:u1] = m.from_logits(out.logits[:, -1]) - before
                passes += 1
                done += b
                if progress is not None:
                    progress(done, total)
    flat = deltas.flatten()
    order = flat.abs().argsort(descending=True)
    if top_k is not None:
        order = order[:top_k]
    rows_out = []
    for i, d in zip(order.tolist(), flat[order].tolist()):
        layer, u = divmod(i, units)
        cid = {"head": f"L{layer}.H{u}", "neuron": f"L{layer}.N{u}", "attn": f"L{layer}.ATTN",
               "mlp": f"L{layer}.MLP"}[kind]
        rows_out.append(SweepRow(id=cid, kind=kind, layer=layer, index=u if kind in ("head", "neuron") else None,
                                 delta=d))
    pos_desc = "last" if last_only else ("all" if pos_list is None else ",".join(map(str, pos_list)))
    return SweepResult(prompt=prompt, kind=kind, mode=mode, positions=pos_desc, metric_name=m.name, before=before,
                       rows=rows_out, n_components=total, forward_passes=passes)


def _row_mask(kind: SweepKind, b: int, u0: int, units: int, n_pos: int, pos_list: list[int] | None,
              device) -> torch.Tensor:
    """Mask for a batch whose row i ablates unit u0 + i (or the whole block) at pos_list."""
    unit_shape = {"head": (units, 1), "neuron": (units,), "attn": (1,), "mlp": (1,)}[kind]
    mask = torch.zeros((b, n_pos) + unit_shape, dtype=torch.bool, device=device)
    if kind in ("head", "neuron"):
        r = torch.arange(b, device=device)
        mask[r, :, r + u0] = True
    else:
        mask[:] = True
    if pos_list is not None:
        keep = torch.zeros(n_pos, dtype=torch.bool, device=device)
        keep[pos_list] = True
        mask &= keep.view((1, n_pos) + (1,) * len(unit_shape))
    return mask


@torch.no_grad()
def patch(engine: Engine, clean_prompt: str, corrupted_prompt: str, components: Sequence[str], target: str,
          distractor: str | None = None, direction: Literal["denoise", "noise"] = "denoise",
          metric: MetricName | None = None, cache: RunCache | None = None) -> PatchResult:
    """Activation patching of components between a clean and a corrupted prompt.

    Args:
        clean_prompt: the prompt showing the behaviour.
        corrupted_prompt: a prompt of the same number of tokens without it.
        components: component ids to patch (optionally @position; otherwise every position).
        target: the single token whose logit or probability is measured.
        distractor: optional single token; with it the metric is logit_diff
            (logit[target] - logit[distractor] at the last position), without it logprob.
        direction: "denoise": run the corrupted prompt with the components' clean activations
            patched in (how much of the clean behaviour do they restore?); "noise": run the
            clean prompt with their corrupted activations (how much survives?).
        metric: force "logit_diff" or "logprob" (default as described for distractor).

    Returns:
        PatchResult: the metric on the clean, corrupted and patched runs, and fraction_restored
        = (patched - corrupted) / (clean - corrupted) (None when clean equals corrupted).
    """
    m = make_metric(engine, target, distractor, metric)
    with engine.lock:
        clean = get_run(engine, clean_prompt, cache)
        corrupted = get_run(engine, corrupted_prompt, cache)
        _check_same_length(clean, corrupted)
        comps = resolve_components(engine, components, clean.n_tokens)
        receiver, donor = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
        hooks = component_hooks(engine, comps, "resample", donor, cache)
        out = engine.forward(receiver.ids, hooks=hooks, logit_ids=m.logit_ids())
    mc = m.from_logits(clean.logits[None])[0].item()
    mx = m.from_logits(corrupted.logits[None])[0].item()
    mp = m.from_logits(out.logits[:, -1])[0].item()
    gap = mc - mx
    return PatchResult(clean_prompt=clean_prompt, corrupted_prompt=corrupted_prompt, components=[c.id for c in comps],
                       direction=direction, metric_name=m.name, metric_clean=mc, metric_corrupted=mx,
                       metric_patched=mp, fraction_restored=(mp - mx) / gap if abs(gap) > 1e-9 else None)
