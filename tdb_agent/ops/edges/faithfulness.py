"""Faithfulness curves over edge budgets, scored as in the MIB circuit track.

For a ranking of edges, the circuit at budget p keeps the top ⌊p · n_edges⌋ edges, cleaned
to the part connected to the embeddings and the logits, and removes every other edge (exact
edge patching, patch.py). Its faithfulness is

    f(C) = (m(C) − m(∅)) / (m(full) − m(∅))

with each m averaged over the prompt pairs; m(full) keeps every edge (the clean run) and
m(∅) none (the reference run), both computed by the same patched pass, so f(100 %) = 1 and
f(0 edges) = 0 by construction. As in MIB, CPR is the area under the curve of the edges
ranked by signed support (higher is better) and CMD the area of |1 − f| on the curve of the
edges ranked by |score| (0 is best), trapezoids over the budgets (selection.py). Both curves
are one batched set of passes: every budget's edge set is a row of the same forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel, Field

from tdb_agent.engine import Engine
from tdb_agent.errors import TdbError
from tdb_agent.ops.edges.capture import Pair, corrupted_senders, group_pairs, mean_senders, shared_positions
from tdb_agent.ops.edges.eap import Reference
from tdb_agent.ops.edges.graph import EdgeGraph
from tdb_agent.ops.edges.patch import patched_metrics
from tdb_agent.ops.edges.selection import budget_counts, mib_areas, prune_dangling, support, top_masks
from tdb_agent.ops.metrics import MetricName
from tdb_agent.ops.runs import RunCache

MIB_BUDGETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


class CurvePoint(BaseModel):
    budget: float = Field(description="fraction of the graph's edges ranked in (⌊budget · n_edges⌋ of them)")
    n_edges: int = Field(description="edges kept after the dangling ones are cleaned away")
    metric: float = Field(description="mean metric with only these edges kept")
    faithfulness: float


class FaithfulnessCurve(BaseModel):
    points: list[CurvePoint] = Field(description="edges ranked by |score| (CMD's curve)")
    signed_points: list[CurvePoint] = Field(description="edges ranked by signed support for the behaviour, "
                                            "edges that hurt it last (CPR's curve)")
    cpr: float = Field(description="area under the signed ranking's curve over edge fractions (higher is better)")
    cmd: float = Field(description="area between the |score| ranking's curve and 1, |1 − f| (0 is best)")
    metric_full: float
    metric_empty: float
    n_edges_total: int
    reference: Reference
    metric_name: MetricName
    n_pairs: int
    forward_passes: int


def keep_masks(graph: EdgeGraph, scores: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """[len(counts), (s,) U, R] masks keeping the top `count` edges by |score| (invalid pairs never)."""
    return top_masks(graph, scores.abs(), counts)


class EdgeEvaluator:
    """A behaviour's prompt pairs prepared once (tokens, groups by length, the reference:
    corrupted sender outputs or corpus means) and the full and empty graphs' metrics; then
    any number of edge sets, each a row of batched patched passes. reuse_prefix (corrupted
    reference): the leading positions a group's pairs share are run by the corrupted run only
    and every patched run continues its keys/values there (capture.Prefix: no edge changes
    those positions), so the patched passes cover the positions after them."""

    def __init__(self, engine: Engine, pairs: Sequence[Pair], reference: Reference = "corrupted",
                 metric: MetricName | None = None, batch_size: int = 64, cache: RunCache | None = None,
                 reuse_prefix: bool = True):
        self.engine, self.reference, self.batch_size = engine, reference, batch_size
        self.graph = EdgeGraph(engine.spec)
        self.n_pairs = len(pairs)
        self.forward_passes = 0
        with engine.lock:
            self.groups, self.metric_name = group_pairs(engine, pairs, reference == "corrupted", metric)
            mean_ref = mean_senders(engine, cache) if reference == "mean" else None
            self.refs, self.prefixes = [], []  # per group: its reference, its shared prefix (capture.Prefix)
            for g in self.groups:
                if mean_ref is not None:
                    ref, prefix = mean_ref, None
                else:
                    ref, prefix = corrupted_senders(engine, g.corrupted,
                                                    shared_positions(g.ids, g.corrupted) if reuse_prefix else 0)
                    self.forward_passes += 1
                self.refs.append(ref)
                self.prefixes.append(prefix)
            shape = (1, self.graph.n_senders, self.graph.n_receivers)
            ends = self.means(torch.cat([torch.ones(shape, dtype=torch.bool), torch.zeros(shape, dtype=torch.bool)]))
        self.m_full, self.m_empty = float(ends[0]), float(ends[1])

    def means(self, keeps: torch.Tensor) -> torch.Tensor:
        """Mean metric over the pairs of each edge set in `keeps` [n, (s,) U, R]."""
        g = self.graph
        if tuple(keeps.shape[-2:]) != (g.n_senders, g.n_receivers):
            raise TdbError(f"edge masks must be [.., {g.n_senders}, {g.n_receivers}]")
        if keeps.dim() == 4 and len(self.groups) > 1:
            raise TdbError("position-aware edge sets need prompts of one token length")
        sums = torch.zeros(keeps.shape[0], device=self.engine.device)
        with self.engine.lock:
            for grp, ref, prefix in zip(self.groups, self.refs, self.prefixes):
                m, p = patched_metrics(self.engine, g, grp, ref, keeps.to(torch.bool), self.batch_size, prefix)
                sums += m.sum(1)
                self.forward_passes += p
        return sums / self.n_pairs

    def faithfulness(self, keeps: torch.Tensor) -> list[float]:
        gap = self.m_full - self.m_empty
        if abs(gap) < 1e-6:
            raise TdbError(f"the full and the fully patched model give the same mean {self.metric_name} "
                           f"({self.m_full:.4g}); faithfulness is undefined on these pairs")
        return [(float(m) - self.m_empty) / gap for m in self.means(keeps)]


def evaluate_keeps(engine: Engine, pairs: Sequence[Pair], keeps: torch.Tensor, reference: Reference = "corrupted",
                   metric: MetricName | None = None, batch_size: int = 64, cache: RunCache | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, MetricName, int]:
    """Mean metric of each edge set in `keeps` [n, (s,) U, R], and of the full and empty graphs.

    Returns (metric per set [n], m_full, m_empty, metric name, forward passes)."""
    ev = EdgeEvaluator(engine, pairs, reference, metric, batch_size, cache)
    ms = ev.means(keeps)
    return ms, torch.tensor(ev.m_full), torch.tensor(ev.m_empty), ev.metric_name, ev.forward_passes


def faithfulness_curve(engine: Engine, pairs: Sequence[Pair], scores: torch.Tensor,
                       budgets: Sequence[float] = MIB_BUDGETS, reference: Reference = "corrupted",
                       metric: MetricName | None = None, batch_size: int = 64,
                       cache: RunCache | None = None, evaluator: EdgeEvaluator | None = None,
                       keys: tuple[torch.Tensor, torch.Tensor] | None = None) -> FaithfulnessCurve:
    """Faithfulness at each edge budget (MIB: 0.1 % … 100 % of the edges) of the edges ranked
    by signed support (CPR's curve) and by |score| (CMD's curve), each circuit cleaned to its
    part connected to both ends, by exact edge patching in one batched set of passes; CPR
    (area under the first) and CMD (area between the second and 1), as MIB computes them.
    `keys` (signed, absolute) [(s,) U, R] replace the rankings derived from `scores`
    (a node ranking's edge order, say); higher keys enter first."""
    ev = evaluator or EdgeEvaluator(engine, pairs, reference, metric, batch_size, cache)
    graph = ev.graph
    if any(not 0 < b <= 1 for b in budgets):
        raise TdbError("budgets are fractions of the edges in (0, 1]")
    budgets = sorted(budgets)
    if len(budgets) < 2:
        raise TdbError("a faithfulness curve needs at least two budgets")
    n_total = graph.n_edges * (scores.shape[0] if scores.dim() == 3 else 1)
    counts = budget_counts(n_total, budgets)
    before = ev.forward_passes
    k_signed, k_abs = keys if keys is not None else (support(scores, ev.m_full - ev.m_empty), scores.abs())
    keeps = prune_dangling(graph, torch.cat([top_masks(graph, k_signed, counts), top_masks(graph, k_abs, counts)]))
    faith = ev.faithfulness(keeps)
    n = len(budgets)

    def points(fs: list[float], ks: torch.Tensor) -> list[CurvePoint]:
        kept = ks.flatten(1).sum(1).tolist()
        return [CurvePoint(budget=b, n_edges=int(c), metric=ev.m_empty + f * (ev.m_full - ev.m_empty), faithfulness=f)
                for b, c, f in zip(budgets, kept, fs)]

    cpr, cmd = mib_areas(budgets, faith[:n], faith[n:])
    passes = ev.forward_passes if evaluator is None else ev.forward_passes - before
    return FaithfulnessCurve(points=points(faith[n:], keeps[n:]), signed_points=points(faith[:n], keeps[:n]),
                             cpr=cpr, cmd=cmd, metric_full=ev.m_full, metric_empty=ev.m_empty,
                             n_edges_total=n_total, reference=ev.reference, metric_name=ev.metric_name,
                             n_pairs=ev.n_pairs, forward_passes=passes)


def smallest_circuit(engine: Engine, pairs: Sequence[Pair], scores: torch.Tensor, threshold: float,
                     reference: Reference = "corrupted", metric: MetricName | None = None, batch_size: int = 64,
                     cache: RunCache | None = None, candidates: int = 16,
                     evaluator: EdgeEvaluator | None = None) -> tuple[int, float, int]:
    """The fewest top edges whose faithfulness reaches `threshold`: (n_edges, faithfulness, passes).

    Candidate sizes are spaced geometrically (evaluated in one batched set of passes), then
    the gap below the first size that reaches the threshold is searched by bisection (the
    curve need not be monotone: this is the first crossing the search finds)."""
    ev = evaluator or EdgeEvaluator(engine, pairs, reference, metric, batch_size, cache)
    before = 0 if evaluator is None else ev.forward_passes
    graph = ev.graph
    n_total = graph.n_edges * (scores.shape[0] if scores.dim() == 3 else 1)
    sizes = sorted({max(1, round(n_total ** (i / (candidates - 1)))) for i in range(candidates)} | {n_total})
    fs = ev.faithfulness(keep_masks(graph, scores, sizes))
    hit = next((i for i, f in enumerate(fs) if f >= threshold), None)
    if hit is None:
        return n_total, fs[-1], ev.forward_passes - before
    lo, hi, f_hi = (sizes[hit - 1] if hit else 0), sizes[hit], fs[hit]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        (f,) = ev.faithfulness(keep_masks(graph, scores, [mid]))
        if f >= threshold:
            hi, f_hi = mid, f
        else:
            lo = mid
    return hi, f_hi, ev.forward_passes - before


#: the change of faithfulness under which an edge is unneeded: the bundled reference circuits'
#: bar for an edge that matters (path patching ≥ 0.05 of the gap, evals/reference.py)
PRUNE_EPS = 0.05


def prune_unneeded(ev: EdgeEvaluator, keep: torch.Tensor, eps: float = PRUNE_EPS) -> tuple[torch.Tensor, float, int]:
    """Drop the edges of a circuit that are jointly unneeded: Z = the edges whose single
    removal moves faithfulness by less than `eps`; Z goes only if removing all of Z together
    also moves it by less than `eps` (else Z's edges back each other up, as redundant heads
    do, and all stay). Exact edge patching, one batched set of passes for the singles and one
    for Z. keep [(s,) U, R] bool; returns (pruned keep, its faithfulness, edges dropped)."""
    idx = keep.nonzero()
    rows = keep.unsqueeze(0).repeat(len(idx) + 1, *([1] * keep.dim()))
    for i, e in enumerate(idx):
        rows[(i + 1,) + tuple(e.tolist())] = False
    fs = ev.faithfulness(rows)
    base = fs[0]
    weak = [i for i in range(len(idx)) if abs(fs[i + 1] - base) < eps]
    if not weak:
        return keep, base, 0
    trial = keep.clone()
    for i in weak:
        trial[tuple(idx[i].tolist())] = False
    (f,) = ev.faithfulness(trial.unsqueeze(0))
    if abs(f - base) < eps:
        return trial, f, len(weak)
    return keep, base, 0


def close_ties(graph: EdgeGraph, scores: torch.Tensor, n: int, rel: float = 1e-5) -> int:
    """n grown to include every edge whose |score| ties the n-th's (within `rel`): a cut
    inside a group of equal scores would pick among them by index (symmetric mechanisms,
    such as two identical backup heads, score exactly alike)."""
    valid = graph.valid.to(scores.device).expand_as(scores)
    flat = torch.where(valid, scores.abs().float(), torch.full_like(scores, -1.0, dtype=torch.float32)).flatten()
    vals = flat.sort(descending=True, stable=True).values
    if n <= 0 or n >= int(valid.sum()):
        return n
    last = float(vals[n - 1])
    return int((vals >= last - rel * abs(last)).sum().clamp(min=n))
