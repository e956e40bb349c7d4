"""Pruning: a small subset of a circuit that keeps faithfulness above a threshold.

Greedy backward elimination: at each step every remaining node is tried out (all candidates
share batched forward passes) and the one whose removal leaves the highest faithfulness is
dropped, as long as that faithfulness stays >= the threshold. The result is minimal in the
sense that removing any single kept node would fall below the threshold; it is not
guaranteed to be the smallest such subset (that search is exponential).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import networkx as nx
from pydantic import BaseModel, Field

from tdb_agent.circuits.evaluate import AblationMode
from tdb_agent.circuits.model import SINK, components
from tdb_agent.circuits.pairs import Behaviour, PromptPair
from tdb_agent.circuits.universe import POSITIONS, keep_set
from tdb_agent.circuits.validate import NEVER_ABLATED, make_evaluator
from tdb_agent.engine import Engine
from tdb_agent.errors import TdbError
from tdb_agent.ops.runs import RunCache

METHOD = ("greedy backward elimination: repeatedly drop the node whose removal keeps faithfulness highest, "
          "while it stays >= threshold (locally minimal, not guaranteed smallest)")


class PruneStep(BaseModel):
    removed: str
    faithfulness: float = Field(description="faithfulness after this removal")


class PruneResult(BaseModel):
    threshold: float
    mode: AblationMode
    positions: str = POSITIONS
    method: str = METHOD
    behaviour: str
    start_faithfulness: float
    faithfulness: float = Field(description="faithfulness of the kept nodes")
    reached: bool = Field(description="whether the kept circuit is at or above the threshold (False when the "
                          "starting circuit was already below it: then nothing is removed)")
    kept: list[str]
    removed: list[PruneStep]
    forward_passes: int


def prune(engine: Engine, g: nx.DiGraph, threshold: float = 0.8, pairs: list[PromptPair] | Behaviour | None = None,
          mode: AblationMode = "mean", protect: Iterable[str] = (), cache: RunCache | None = None,
          batch_size: int = 64, should_stop: Callable[[], bool] | None = None) -> PruneResult:
    """Greedy backward elimination of the circuit's nodes (`protect`ed ones, EMB and LOGITS stay)."""
    if not 0 < threshold <= 1.5:
        raise TdbError(f"threshold must be a faithfulness in (0, 1.5], typically 0.8; got {threshold}")
    ev, desc = make_evaluator(engine, g, pairs, mode, cache, batch_size)
    nodes = components(g)
    protected = set(protect)
    unknown = protected - set(nodes)
    if unknown:
        raise TdbError(f"protected nodes not in the circuit: {sorted(unknown)}")
    spec = engine.spec

    def f_of(sets: list[list[str]]) -> list[float]:
        rows = ev.metric_rows([keep_set(s, spec) for s in sets], should_stop=should_stop)
        return [ev.faithfulness(r) for r in rows]

    start = f_of([nodes])[0]
    current, f_now, steps = list(nodes), start, []
    while start >= threshold:
        cands = [n for n in current if n not in protected and n.split("@")[0] not in NEVER_ABLATED]
        if not cands:
            break
        fs = f_of([[m for m in current if m != n] for n in cands])
        best = max(range(len(cands)), key=lambda i: (fs[i], -i))
        if fs[best] < threshold:
            break
        current.remove(cands[best])
        f_now = fs[best]
        steps.append(PruneStep(removed=cands[best], faithfulness=f_now))
    return PruneResult(threshold=threshold, mode=mode, behaviour=desc, start_faithfulness=start, faithfulness=f_now,
                       reached=f_now >= threshold, kept=current, removed=steps, forward_passes=ev.forward_passes)


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
