"""Faithfulness curves over edge budgets, scored as in the MIB circuit track.

For a ranking of edges (by |score|), the circuit at budget p keeps the top round(p · n_edges)
edges and removes every other edge (exact edge patching, patch.py). Its faithfulness is

    f(C) = (m(C) − m(∅)) / (m(full) − m(∅))

with each m averaged over the prompt pairs; m(full) keeps every edge (the clean run) and
m(∅) none (the reference run), both computed by the same patched pass, so f(100 %) = 1 and
f(0 edges) = 0 by construction. CPR is the area under f over the budget fractions
(trapezoids; higher is better), CMD the area of |1 − f| (0 is best). The whole curve is one
batched set of passes: every budget's edge set is a row of the same forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel, Field

from tdb_agent.engine import Engine
from tdb_agent.errors import TdbError
from tdb_agent.ops.edges.capture import Pair, group_pairs, mean_senders, run_senders
from tdb_agent.ops.edges.eap import Reference
from tdb_agent.ops.edges.graph import EdgeGraph
from tdb_agent.ops.edges.patch import patched_metrics
from tdb_agent.ops.metrics import MetricName
from tdb_agent.ops.runs import RunCache

MIB_BUDGETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


class CurvePoint(BaseModel):
    budget: float = Field(description="fraction of the graph's edges kept")
    n_edges: int
    metric: float = Field(description="mean metric with only these edges kept")
    faithfulness: float


class FaithfulnessCurve(BaseModel):
    points: list[CurvePoint]
    cpr: float = Field(description="area under the faithfulness curve over edge fractions (higher is better)")
    cmd: float = Field(description="area between the curve and 1, |1 − f| (0 is best)")
    metric_full: float
    metric_empty: float
    n_edges_total: int
    reference: Reference
    metric_name: MetricName
    n_pairs: int
    forward_passes: int


def area(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Trapezoidal area under (xs, ys)."""
    return float(sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(xs) - 1)))


def cpr_cmd(budgets: Sequence[float], faith: Sequence[float]) -> tuple[float, float]:
    return area(budgets, faith), area(budgets, [abs(1 - f) for f in faith])


def keep_masks(graph: EdgeGraph, scores: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """[len(counts), (s,) U, R] masks keeping the top `count` edges by |score| (invalid pairs never)."""
    valid = graph.valid.to(scores.device).expand_as(scores)
    flat = torch.where(valid, scores.abs().float(), torch.full_like(scores, -1.0, dtype=torch.float32)).flatten()
    order = flat.argsort(descending=True, stable=True)
    masks = torch.zeros((len(counts),) + tuple(scores.shape), dtype=torch.bool, device=scores.device)
    for i, c in enumerate(counts):
        masks[i].view(-1)[order[:c]] = True
    return masks


class EdgeEvaluator:
    """A behaviour's prompt pairs prepared once (tokens, groups by length, the reference:
    corrupted sender outputs or corpus means) and the full and empty graphs' metrics; then
    any number of edge sets, each a row of batched patched passes."""

    def __init__(self, engine: Engine, pairs: Sequence[Pair], reference: Reference = "corrupted",
                 metric: MetricName | None = None, batch_size: int = 64, cache: RunCache | None = None):
        self.engine, self.reference, self.batch_size = engine, reference, batch_size
        self.graph = EdgeGraph(engine.spec)
        self.n_pairs = len(pairs)
        self.forward_passes = 0
        with engine.lock:
            self.groups, self.metric_name = group_pairs(engine, pairs, reference == "corrupted", metric)
            mean_ref = mean_senders(engine, cache) if reference == "mean" else None
            self.refs = []
            for g in self.groups:
                self.refs.append(mean_ref if mean_ref is not None else run_senders(engine, g.corrupted))
                self.forward_passes += mean_ref is None
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
            for grp, ref in zip(self.groups, self.refs):
                m, p = patched_metrics(self.engine, g, grp, ref, keeps.to(torch.bool), self.batch_size)
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
                       cache: RunCache | None = None, evaluator: EdgeEvaluator | None = None) -> FaithfulnessCurve:
    """Faithfulness of the top-|score| edges at each edge budget (MIB: 0.1 % … 100 % of the
    edges), each by exact edge patching in one batched set of passes, with CPR (area under
    the curve) and CMD (area between the curve and 1)."""
    ev = evaluator or EdgeEvaluator(engine, pairs, reference, metric, batch_size, cache)
    graph = ev.graph
    if any(not 0 < b <= 1 for b in budgets):
        raise TdbError("budgets are fractions of the edges in (0, 1]")
    budgets = sorted(budgets)
    n_total = graph.n_edges * (scores.shape[0] if scores.dim() == 3 else 1)
    counts = [min(n_total, max(0, round(b * n_total))) for b in budgets]
    before = ev.forward_passes
    keeps = keep_masks(graph, scores, counts)
    faith = ev.faithfulness(keeps)
    ms = [ev.m_empty + f * (ev.m_full - ev.m_empty) for f in faith]
    points = [CurvePoint(budget=b, n_edges=c, metric=m, faithfulness=f)
              for b, c, m, f in zip(budgets, counts, ms, faith)]
    cpr, cmd = cpr_cmd([0.0] + list(budgets), [0.0] + faith)
    passes = ev.forward_passes if evaluator is None else ev.forward_passes - before
    return FaithfulnessCurve(points=points, cpr=cpr, cmd=cmd, metric_full=ev.m_full, metric_empty=ev.m_empty,
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
