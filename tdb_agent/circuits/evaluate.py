"""Batched metric of the model with everything outside a set of circuits ablated.

An `Evaluator` prepares a behaviour's prompt pairs once (tokens, metric ids, grouped by
length, the ablation values: reference means or the corrupted prompts' activations) and then
evaluates any number of keep-sets. Rows of a forward pass are (keep-set, pair) combinations
of one length group, so evaluating one circuit costs one forward pass per length group (at
most one per pair), and the candidates of a pruning step share their passes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from tdb_agent.circuits.pairs import PromptPair
from tdb_agent.circuits.universe import KeepSet, ablation_masks, check_positions, full_set, neuron_layers
from tdb_agent.engine import Engine
from tdb_agent.engine.interventions import intervention
from tdb_agent.engine.component_sites import kind_site
from tdb_agent.errors import Cancelled, TdbError
from tdb_agent.ops.metrics import Metric, MetricName, make_metric
from tdb_agent.ops.runs import RunCache, reference_means

AblationMode = Literal["mean", "resample"]
Progress = Callable[[int, int], None]


@dataclass
class _Group:
    """Pairs of one token length, batched together."""

    pair_index: list[int]
    ids: torch.Tensor  # [n, s]
    source: dict[str, torch.Tensor] | None  # resample: corrupted activations per site [n, s, ...]


def _sites(engine: Engine) -> list[str]:
    out = []
    for l in range(engine.spec.n_layers):
        out += [kind_site("head", l), kind_site("mlp", l), kind_site("neuron", l)]
    return out


def reference_means_for(engine: Engine, sites: list[str], cache: RunCache | None) -> dict[str, torch.Tensor]:
    """The mean-ablation values of many sites from one pass over the reference corpus."""
    return cache.means(sites) if cache is not None else reference_means(engine, sites)


class Evaluator:
    def __init__(self, engine: Engine, pairs: list[PromptPair], mode: AblationMode = "mean",
                 metric: MetricName | None = None, cache: RunCache | None = None, batch_size: int = 64):
        if mode not in ("mean", "resample"):
            raise TdbError(f"ablation mode must be 'mean' or 'resample', not {mode!r}")
        if not pairs:
            raise TdbError("validation needs at least one prompt pair")
        self.engine, self.mode, self.batch_size = engine, mode, max(1, batch_size)
        self.pairs = pairs
        if metric is None:
            metric = "logit_diff" if all(p.distractor for p in pairs) else "logprob"
        self.metrics: list[Metric] = [make_metric(engine, p.target, p.distractor, metric) for p in pairs]
        self.metric_name: MetricName = metric
        self.forward_passes = 0
        self._memo: dict[frozenset, torch.Tensor] = {}
        with engine.lock:
            self._means = self._reference_values(cache) if mode == "mean" else None
            self.groups = self._group(pairs)
            full, empty = self.metric_rows([self.full_set(), {}])
        self.m_full, self.m_empty = full, empty  # per pair [n_pairs]

    # ---- what a subclass with another universe replaces (circuits/features.py)
    def full_set(self) -> KeepSet:
        """The keep-set of the whole universe (nothing ablated)."""
        return full_set(self.engine.spec)

    def _reference_values(self, cache: RunCache | None) -> dict[str, torch.Tensor]:
        """Mean-ablation values, one pass over the reference corpus."""
        return reference_means_for(self.engine, _sites(self.engine), cache)

    def _source(self, cids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Resample-ablation values: the activations of the corrupted prompts [n, s, ...]."""
        _, acts = self.engine.run_with_cache(cids, _sites(self.engine), logit_ids=[0])
        return {k: v.detach() for k, v in acts.items()}

    def _hooks(self, g: "_Group", ks: list[KeepSet], js: torch.Tensor, s: int, all_keeps: list[KeepSet]) -> dict:
        """Engine hooks for a batch whose row r keeps ks[r] of pair js[r] of group g."""
        masks = ablation_masks(ks, self.engine.spec, s, set().union(*(neuron_layers(k) for k in all_keeps)))
        return {site: [intervention("set", site, value=self._value(g, site, js), mask=m.to(self.engine.device))]
                for site, m in masks.items() if m.any()}

    def _group(self, pairs: list[PromptPair]) -> list[_Group]:
        by_len: dict[int, list[tuple[int, torch.Tensor, torch.Tensor | None]]] = {}
        for i, p in enumerate(pairs):
            ids = self.engine.to_tokens(p.prompt)
            cids = None
            if self.mode == "resample":
                if not p.corrupted_prompt:
                    raise TdbError(f"pair {i} has no corrupted_prompt; resample ablation needs one for every pair "
                                   "(or use mode='mean')")
                cids = self.engine.to_tokens(p.corrupted_prompt)
                if cids.shape[1] != ids.shape[1]:
                    raise TdbError(f"pair {i}: the corrupted prompt has {cids.shape[1]} tokens but the prompt has "
                                   f"{ids.shape[1]}; resampling needs prompts of the same length")
            by_len.setdefault(ids.shape[1], []).append((i, ids, cids))
        groups = []
        for rows in by_len.values():
            ids = torch.cat([r[1] for r in rows])
            source = None
            if self.mode == "resample":
                source = self._source(torch.cat([r[2] for r in rows]))
                self.forward_passes += 1
            groups.append(_Group(pair_index=[r[0] for r in rows], ids=ids, source=source))
        return groups

    def metric_rows(self, keeps: list[KeepSet], progress: Progress | None = None,
                    should_stop: Callable[[], bool] | None = None) -> list[torch.Tensor]:
        """The metric of each pair [n_pairs] with everything outside each keep-set ablated.

        Results are memoised by keep-set, so a set evaluated before (the full model, the
        empty circuit, a pruning candidate seen again) gives exactly the same numbers."""
        keys = [frozenset(k.items()) for k in keeps]
        todo = list({key: k for key, k in zip(keys, keeps) if key not in self._memo}.items())
        if todo:
            for (key, _), row in zip(todo, self._compute([k for _, k in todo], progress, should_stop)):
                self._memo[key] = row
        return [self._memo[key] for key in keys]

    @torch.no_grad()
    def _compute(self, keeps: list[KeepSet], progress: Progress | None,
                 should_stop: Callable[[], bool] | None) -> list[torch.Tensor]:
        out = torch.empty(len(keeps), len(self.pairs))
        total, done = len(keeps) * len(self.pairs), 0
        with self.engine.lock:
            for g in self.groups:
                n, s = g.ids.shape
                for k in keeps:
                    check_positions(k, s, f"prompt {g.pair_index[0]}")
                rows = [(ki, j) for ki in range(len(keeps)) for j in range(n)]
                for r0 in range(0, len(rows), self.batch_size):
                    if should_stop is not None and should_stop():
                        raise Cancelled("validation was cancelled")
                    chunk = rows[r0:r0 + self.batch_size]
                    ks = [keeps[ki] for ki, _ in chunk]
                    js = torch.tensor([j for _, j in chunk])
                    hooks = self._hooks(g, ks, js, s, keeps)
                    logits = self.engine.forward(g.ids[js.to(g.ids.device)], hooks=hooks).logits[:, -1]
                    self.forward_passes += 1
                    for row, (ki, j) in enumerate(chunk):
                        p = g.pair_index[j]
                        out[ki, p] = self.metrics[p].from_logits(logits[row:row + 1].float())[0].item()
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
        return list(out)

    def _value(self, g: _Group, site: str, js: torch.Tensor) -> torch.Tensor:
        if self.mode == "mean":
            return self._means[site]
        return g.source[site][js.to(g.source[site].device)]

    @property
    def gap(self) -> float:
        return float(self.m_full.mean() - self.m_empty.mean())

    def faithfulness(self, metric: torch.Tensor) -> float:
        """(m(C) − m(∅)) / (m(full) − m(∅)) with each m averaged over the pairs."""
        gap = self.gap
        if abs(gap) < 1e-6:
            raise TdbError(f"the full model and the fully ablated model give the same mean {self.metric_name} "
                           f"({self.m_full.mean():.4g}) on these pairs, so faithfulness is undefined; use other "
                           "pairs or another ablation mode")
        return float((metric.mean() - self.m_empty.mean()) / gap)
