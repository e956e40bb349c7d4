"""Pruning: a small subset of a circuit that keeps faithfulness above a threshold.

Greedy backward elimination: at each step every remaining node is tried out (all candidates
share batched forward passes) and the one whose removal leaves the highest faithfulness is
dropped, as long as that faithfulness stays >= the threshold. The result is minimal in the
sense that removing any single kept node would fall below the threshold; it is not
guaranteed to be the smallest such subset (that search is exponential).

With several ablation modes (`modes=["mean", "resample"]`) a node set counts as faithful only
when it is >= the threshold under every mode: the criterion is the minimum over the modes (a
circuit chosen under one ablation can fall apart under the other). Each mode has its own
`Evaluator`; every step's candidates share that mode's batched passes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence

import networkx as nx
from pydantic import BaseModel, Field

from tdb_agent.circuits.evaluate import AblationMode, Progress
from tdb_agent.circuits.model import SINK, components
from tdb_agent.circuits.pairs import Behaviour, PromptPair
from tdb_agent.circuits.universe import POSITIONS
from tdb_agent.circuits.features import is_feature_circuit
from tdb_agent.circuits.validate import NEVER_ABLATED, keeps_of, make_evaluator, resolve_pairs
from tdb_agent.engine import Engine
from tdb_agent.errors import TdbError
from tdb_agent.ops.runs import RunCache
from tdb_agent.service.limits import LimitExceeded, flag

METHOD = ("greedy backward elimination: repeatedly drop the node whose removal keeps faithfulness highest, "
          "while it stays >= threshold (locally minimal, not guaranteed smallest); with several ablation modes, "
          "faithfulness is the minimum over the modes")


class PruneStep(BaseModel):
    removed: str
    faithfulness: float = Field(description="faithfulness after this removal (the minimum over the modes)")
    by_mode: dict[str, float] = Field(default_factory=dict, description="faithfulness after it, per mode")


class PruneResult(BaseModel):
    threshold: float
    mode: AblationMode = Field(description="the first (primary) ablation mode")
    modes: list[AblationMode] = Field(default_factory=list, description="every mode the threshold had to hold "
                                      "under (just `mode` for single-mode pruning)")
    positions: str = POSITIONS
    method: str = METHOD
    behaviour: str
    start_faithfulness: float
    faithfulness: float = Field(description="faithfulness of the kept nodes (the minimum over the modes)")
    faithfulness_by_mode: dict[str, float] = Field(default_factory=dict, description="the kept nodes' "
                                                   "faithfulness under each mode")
    reached: bool = Field(description="whether the kept circuit is at or above the threshold (False when the "
                          "starting circuit was already below it: then nothing is removed)")
    kept: list[str]
    removed: list[PruneStep]
    forward_passes: int


def prunable(g: nx.DiGraph, protect: Iterable[str] = ()) -> list[str]:
    """The nodes pruning may remove (not protected, not EMB or LOGITS)."""
    protected = set(protect)
    return [n for n in components(g) if n not in protected and n.split("@")[0] not in NEVER_ABLATED]


def prune_rows(n_prunable: int, n_pairs: int, n_modes: int = 1) -> int:
    """Worst-case prompt rows of a pruning: the full model, the empty circuit and the start,
    then step k tries the n - k + 1 nodes left."""
    return n_modes * n_pairs * (3 + n_prunable * (n_prunable + 1) // 2)


def prune(engine: Engine, g: nx.DiGraph, threshold: float = 0.8, pairs: list[PromptPair] | Behaviour | None = None,
          mode: AblationMode = "mean", protect: Iterable[str] = (), cache: RunCache | None = None,
          batch_size: int = 64, should_stop: Callable[[], bool] | None = None,
          modes: Sequence[AblationMode] | None = None, max_rows: int | None = None,
          progress: Progress | None = None) -> PruneResult:
    """Greedy backward elimination of the circuit's nodes (`protect`ed ones, EMB and LOGITS stay).

    `modes` (default: just `mode`) are the ablations the threshold must hold under; its
    first is the primary mode reported as `mode`. `max_rows` bounds the worst-case work
    (`prune_rows`), refused before it starts; `progress(rows_done, worst_case_rows)`."""
    if not 0 < threshold <= 1.5:
        raise TdbError(f"threshold must be a faithfulness in (0, 1.5], typically 0.8; got {threshold}")
    modes = list(dict.fromkeys(modes or [mode]))
    nodes = components(g)
    protected = set(protect)
    unknown = protected - set(nodes)
    if unknown:
        raise TdbError(f"protected nodes not in the circuit: {sorted(unknown)}")
    n_pairs = len(resolve_pairs(g, pairs)[0])
    worst = prune_rows(len(prunable(g, protected)), n_pairs, len(modes))
    if max_rows is not None and worst > max_rows:
        raise LimitExceeded(
            f"pruning {len(prunable(g, protected))} prunable nodes over {n_pairs} pairs and {len(modes)} mode(s) may "
            f"run up to {worst:,} prompt rows (modes x pairs x (3 + n(n+1)/2)), over the limit "
            f"max_prune_rows={max_rows:,} (set by `tdb-agent serve {flag('max_prune_rows')}`): protect nodes you "
            "keep anyway, remove ones validation shows unneeded, or use fewer pairs")
    feature = is_feature_circuit(nodes)
    keeps_of(engine, nodes, feature)  # a node the universe cannot ablate is refused before any pass
    evs = {}
    for m in modes:
        evs[m], desc = make_evaluator(engine, g, pairs, m, cache, batch_size)
    done = 0

    def f_of(sets: list[list[str]]) -> list[dict[str, float]]:
        """Each set's faithfulness per mode (one batched evaluation per mode)."""
        nonlocal done
        keeps = [keeps_of(engine, s, feature) for s in sets]
        per_mode = {}
        for m, ev in evs.items():
            step = None if progress is None else (lambda d, t, base=done: progress(min(base + d, worst), worst))
            per_mode[m] = [ev.faithfulness(r) for r in ev.metric_rows(keeps, progress=step, should_stop=should_stop)]
            done += len(sets) * n_pairs
        return [{m: per_mode[m][i] for m in modes} for i in range(len(sets))]

    start = f_of([nodes])[0]
    current, f_now, steps = list(nodes), start, []
    while min(start.values()) >= threshold:
        cands = [n for n in current if n not in protected and n.split("@")[0] not in NEVER_ABLATED]
        if not cands:
            break
        by = f_of([[m for m in current if m != n] for n in cands])
        fs = [min(d.values()) for d in by]
        best = max(range(len(cands)), key=lambda i: (fs[i], -i))
        if fs[best] < threshold:
            break
        current.remove(cands[best])
        f_now = by[best]
        steps.append(PruneStep(removed=cands[best], faithfulness=fs[best], by_mode=f_now))
    return PruneResult(threshold=threshold, mode=modes[0], modes=modes, behaviour=desc,
                       start_faithfulness=min(start.values()), faithfulness=min(f_now.values()),
                       faithfulness_by_mode=f_now, reached=min(f_now.values()) >= threshold, kept=current,
                       removed=steps, forward_passes=sum(ev.forward_passes for ev in evs.values()))


def pruned_circuit(g: nx.DiGraph, result: PruneResult, name: str | None = None) -> nx.DiGraph:
    """A copy of the circuit with only the kept nodes (and the edges among them); the old
    validation no longer applies and is cleared."""
    keep = set(result.kept) | {SINK}
    h = copy.deepcopy(g)
    h.remove_nodes_from([n for n in g.nodes if n not in keep])
    h.graph.update(validation=None, faithfulness=None, name=name or g.graph.get("name"),
                   pruned_from=g.graph.get("name"), prune=result.model_dump(mode="json"))
    for n in h.nodes:
        h.nodes[n]["necessity"] = None
    return h
