"""Batched metric of the model with everything outside a set of circuits ablated.

An `Evaluator` prepares a behaviour's prompt pairs once (tokens, metric ids, grouped by
length, the ablation values: reference means or the corrupted prompts' activations) and then
evaluates any number of keep-sets. Rows of a forward pass are (keep-set, pair) combinations
of one length group, so evaluating one circuit costs one forward pass per length group (at
most one per pair), and the candidates of a pruning step share their passes.

The passes run a block at a time (`Evaluator.layerwise`): two rows of one pair whose keep-sets
agree on blocks 0..l have the same residual stream up to block l, so that part is run once for
both. A pruning step's candidates (the circuit less one node each) then run each block only
for the candidates whose removed node is at or below it: about (L + 1) / 2L of the work of
whole passes. `forward_passes` counts the batches that reach the logits.
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
from tdb_agent.ops.edges.capture import Prefix, run_keeping_prefix, shared_positions
from tdb_agent.ops.metrics import Metric, MetricName, make_metric
from tdb_agent.ops.runs import RunCache, reference_means

AblationMode = Literal["mean", "resample"]
Progress = Callable[[int, int], None]


@dataclass
class _Group:
    """Pairs of one token length, batched together."""

    pair_index: list[int]
    ids: torch.Tensor  # [n, s]
    source: dict[str, torch.Tensor] | None  # resample: corrupted activations per site [n, s - shared, ...]
    prefix: Prefix | None = None  # resample: the keys/values of the leading positions every pair shares


def _sites(engine: Engine) -> list[str]:
    out = []
    for l in range(engine.spec.n_layers):
        out += [kind_site("head", l), kind_site("mlp", l), kind_site("neuron", l)]
    return out


def _after(pos: frozenset[int] | None, p: int) -> frozenset[int] | None:
    """A unit's kept positions counted from position p (those before p dropped: the passes
    run from p)."""
    return pos if pos is None or p == 0 else frozenset(t - p for t in pos if t >= p)


def reference_means_for(engine: Engine, sites: list[str], cache: RunCache | None) -> dict[str, torch.Tensor]:
    """The mean-ablation values of many sites from one pass over the reference corpus."""
    return cache.means(sites) if cache is not None else reference_means(engine, sites)


class Evaluator:
    #: run the passes a block at a time, rows sharing the blocks where their keep-sets agree
    #: (a universe whose interventions span blocks, like cross-layer transcoders, runs whole passes)
    layerwise = True
    #: residual streams one level of the block-at-a-time evaluation holds (keep-sets are taken
    #: in parts that fit; two levels are alive at once)
    STATE_BYTES = 1 << 28

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

    def _source(self, cids: torch.Tensor, shared: int = 0) -> tuple[dict[str, torch.Tensor], Prefix | None]:
        """Resample-ablation values: the activations of the corrupted prompts [n, s - shared, ...]
        and the keys/values of their first `shared` positions (capture.Prefix)."""
        return run_keeping_prefix(self.engine, cids, _sites(self.engine), shared)

    def _hooks(self, g: "_Group", ks: list[KeepSet], js: torch.Tensor, s: int, post_layers: set[int],
               layers: list[int] | None = None) -> dict:
        """Engine hooks for a batch whose row r keeps ks[r] of pair js[r] of group g (at the sites
        of `layers` only, default all); post_layers: where some keep-set names neurons."""
        masks = ablation_masks(ks, self.engine.spec, s, post_layers, layers)
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
            source = prefix = None
            if self.mode == "resample":
                # positions every pair shares with its corrupted prompt: resample ablation
                # changes nothing there (the corrupted run's values are the clean ones), so
                # the block-at-a-time passes continue their keys/values
                cids = torch.cat([r[2] for r in rows])
                source, prefix = self._source(cids, shared_positions(ids, cids) if self.layerwise else 0)
                self.forward_passes += 1
            groups.append(_Group(pair_index=[r[0] for r in rows], ids=ids, source=source, prefix=prefix))
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
        post_layers = set().union(*(neuron_layers(k) for k in keeps))
        with self.engine.lock:
            for g in self.groups:
                for k in keeps:
                    check_positions(k, g.ids.shape[1], f"prompt {g.pair_index[0]}")
                for chunk, logits in self._batches(g, keeps, post_layers, should_stop):
                    for row, (ki, j) in enumerate(chunk):
                        p = g.pair_index[j]
                        out[ki, p] = self.metrics[p].from_logits(logits[row:row + 1].float())[0].item()
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
        return list(out)

    def _batches(self, g: _Group, keeps: list[KeepSet], post_layers: set[int],
                 should_stop: Callable[[], bool] | None):
        """Yield (rows [(keep-set index, pair index)], their last-position logits [rows, vocab]):
        whole keep-sets a part at a time run block by block, or batch_size rows a whole pass."""
        n = g.ids.shape[0]
        if self.layerwise:
            per = max(1, self.STATE_BYTES // (n * g.ids.shape[1] * self.engine.spec.d_model * 4))
            for k0 in range(0, len(keeps), per):
                part = range(k0, min(len(keeps), k0 + per))
                logits = self._blockwise(g, [keeps[i] for i in part], post_layers, should_stop)
                yield [(ki, j) for ki in part for j in range(n)], logits
        else:
            rows = [(ki, j) for ki in range(len(keeps)) for j in range(n)]
            for r0 in range(0, len(rows), self.batch_size):
                chunk = rows[r0:r0 + self.batch_size]
                yield chunk, self._whole(g, [keeps[ki] for ki, _ in chunk], [j for _, j in chunk], post_layers,
                                         should_stop)

    def _whole(self, g: _Group, ks: list[KeepSet], js: list[int], post_layers: set[int],
               should_stop: Callable[[], bool] | None) -> torch.Tensor:
        """Last-position logits [rows, vocab] of rows keeping ks[r] on pair js[r], one whole pass."""
        if should_stop is not None and should_stop():
            raise Cancelled("validation was cancelled")
        jt = torch.tensor(js)
        hooks = self._hooks(g, ks, jt, g.ids.shape[1], post_layers)
        self.forward_passes += 1
        return self.engine.forward(g.ids[jt.to(g.ids.device)], hooks=hooks).logits[:, -1]

    def _blockwise(self, g: _Group, ks: list[KeepSet], post_layers: set[int],
                   should_stop: Callable[[], bool] | None) -> torch.Tensor:
        """Last-position logits [len(ks) · n, vocab] of every (keep-set, pair) row, keep-set
        major, run a block at a time. A state is a distinct residual stream after the blocks
        so far: (its parent state, the units block l keeps); rows share a state while their
        keep-sets agree, and each block runs once per state, batch_size states a batch."""
        e, L = self.engine, self.engine.spec.n_layers
        n = g.ids.shape[0]
        p = 0 if g.prefix is None else g.prefix.offset  # the passes run positions p.. (resample)
        ids = g.ids[:, p:]
        s = ids.shape[1]
        x = e.forward(ids, stop_layer=0, position_offset=p).resid_final  # [n, s, d]: state j, pair j's embeddings
        state_pair = list(range(n))
        row_state = [j for _ in ks for j in range(n)]
        for l in range(L):
            kept_here = [frozenset((u, _after(pos, p)) for u, pos in k.items() if u[1] == l) for k in ks]
            index: dict[tuple[int, frozenset], int] = {}
            row_state = [index.setdefault((st, kept_here[r // n]), len(index)) for r, st in enumerate(row_state)]
            states = list(index)
            last = l == L - 1
            outs = []
            for b0 in range(0, len(states), self.batch_size):
                if should_stop is not None and should_stop():
                    raise Cancelled("validation was cancelled")
                part = states[b0:b0 + self.batch_size]
                js = torch.tensor([state_pair[st] for st, _ in part])
                parents = torch.tensor([st for st, _ in part], device=x.device)
                hooks = self._hooks(g, [dict(units) for _, units in part], js, s, post_layers, layers=[l])
                kv = None if g.prefix is None else {l: tuple(t[js.to(t.device)] for t in g.prefix.kv[l])}
                out = e.forward(ids[js.to(ids.device)], start_layer=l, resid=x[parents],
                                stop_layer=None if last else l + 1, hooks=hooks, position_offset=p, prefix_kv=kv)
                outs.append(out.logits[:, -1] if last else out.resid_final)
                self.forward_passes += last
            state_pair = [state_pair[st] for st, _ in states]
            x = torch.cat(outs)  # [states, s, d]; after the last block [states, vocab]
        return x[torch.tensor(row_state, device=x.device)]

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
