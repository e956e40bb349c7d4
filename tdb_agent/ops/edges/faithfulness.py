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


def evaluate_keeps(engine: Engine, pairs: Sequence[Pair], keeps: torch.Tensor, reference: Reference = "corrupted",
                   metric: MetricName | None = None, batch_size: int = 64, cache: RunCache | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, MetricName, int]:
    """Mean metric of each edge set in `keeps` [n, (s,) U, R], and of the full and empty graphs.

    Returns (metric per set [n], m_full, m_empty, metric name, forward passes)."""
    graph = EdgeGraph(engine.spec)
    if tuple(keeps.shape[-2:]) != (graph.n_senders, graph.n_receivers):
        raise TdbError(f"edge masks must be [.., {graph.n_senders}, {graph.n_receivers}]")
    with engine.lock:
        groups, name = group_pairs(engine, pairs, reference == "corrupted", metric)
        if keeps.dim() == 4 and len(groups) > 1:
            raise TdbError("position-aware edge sets need prompts of one token length")
        full = torch.ones((1,) + tuple(keeps.shape[1:]), dtype=torch.bool, device=keeps.device)
        allk = torch.cat([full, torch.zeros_like(full), keeps.to(torch.bool)])
        sums = torch.zeros(allk.shape[0], device=engine.device)
        passes = 0
        mean_ref = mean_senders(engine, cache) if reference == "mean" else None
        for g in groups:
            ref = mean_ref if mean_ref is not None else run_senders(engine, g.corrupted)
            passes += mean_ref is None
            m, p = patched_metrics(engine, graph, g, ref, allk, batch_size)
            sums += m.sum(1)
            passes += p
        means = sums / len(pairs)
    return means[2:], means[0], means[1], name, passes


def faithfulness_curve(engine: Engine, pairs: Sequence[Pair], scores: torch.Tensor,
                       budgets: Sequence[float] = MIB_BUDGETS, reference: Reference = "corrupted",
                       metric: MetricName | None = None, batch_size: int = 64,
                       cache: RunCache | None = None) -> FaithfulnessCurve:
    """Faithfulness of the top-|score| edges at each edge budget (MIB: 0.1 % … 100 % of the
    edges), each by exact edge patching in one batched set of passes, with CPR (area under
    the curve) and CMD (area between the curve and 1)."""
    graph = EdgeGraph(engine.spec)
    if any(not 0 < b <= 1 for b in budgets):
        raise TdbError("budgets are fractions of the edges in (0, 1]")
    budgets = sorted(budgets)
    n_total = graph.n_edges * (scores.shape[0] if scores.dim() == 3 else 1)
    counts = [min(n_total, max(0, round(b * n_total))) for b in budgets]
    keeps = keep_masks(graph, scores, counts)
    ms, m_full, m_empty, name, passes = evaluate_keeps(engine, pairs, keeps, reference, metric, batch_size, cache)
    gap = float(m_full - m_empty)
    if abs(gap) < 1e-6:
        raise TdbError(f"the full and the fully patched model give the same mean {name} ({float(m_full):.4g}); "
                       "faithfulness is undefined on these pairs")
    faith = [float(m - m_empty) / gap for m in ms]
    points = [CurvePoint(budget=b, n_edges=c, metric=float(m), faithfulness=f)
              for b, c, m, f in zip(budgets, counts, ms, faith)]
    xs, ys = [0.0] + list(budgets), [0.0] + faith
    cpr, cmd = cpr_cmd(xs, ys)
    return FaithfulnessCurve(points=points, cpr=cpr, cmd=cmd, metric_full=float(m_full), metric_empty=float(m_empty),
                             n_edges_total=n_total, reference=reference, metric_name=name, n_pairs=len(pairs),
                             forward_passes=passes)


def smallest_circuit(engine: Engine, pairs: Sequence[Pair], scores: torch.Tensor, threshold: float,
                     reference: Reference = "corrupted", metric: MetricName | None = None, batch_size: int = 64,
                     cache: RunCache | None = None, candidates: int = 24) -> tuple[int, float, int]:
    """The fewest top edges whose faithfulness reaches `threshold`: (n_edges, faithfulness, passes).

    Candidate sizes are spaced geometrically (evaluated in one batched set of passes), then
    the gap below the first size that reaches the threshold is searched by bisection."""
    graph = EdgeGraph(engine.spec)
    n_total = graph.n_edges * (scores.shape[0] if scores.dim() == 3 else 1)
    sizes = sorted({max(1, round(n_total ** (i / (candidates - 1)))) for i in range(candidates)} | {n_total})

    def faith(counts):
        ms, mf, me, _, p = evaluate_keeps(engine, pairs, keep_masks(graph, scores, counts), reference, metric,
                                          batch_size, cache)
        gap = float(mf - me)
        if abs(gap) < 1e-6:
            raise TdbError("the full and the fully patched model give the same metric; faithfulness is undefined")
        return [float(m - me) / gap for m in ms], p

    fs, passes = faith(sizes)
    hit = next((i for i, f in enumerate(fs) if f >= threshold), None)
    if hit is None:
        return n_total, fs[-1], passes
    lo, hi, f_hi = (sizes[hit - 1] if hit else 0), sizes[hit], fs[hit]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        (f,), p = faith([mid])
        passes += p
        if f >= threshold:
            hi, f_hi = mid, f
        else:
            lo = mid
    return hi, f_hi, passes
