"""Faithfulness (docs/DESIGN.md §4) of a circuit and the necessity of each of its nodes.

faithfulness f(C) = (m(C) − m(∅)) / (m(full) − m(∅)), each m the metric averaged over the
behaviour's prompt pairs; m(C) ablates every component of the universe (see `universe`)
that C does not keep, by its reference mean or by its activation on the pair's corrupted
prompt (resample). f(full) = 1 and f(∅) = 0 by construction.

Circuits of transcoder features are evaluated over their own universe (features and MLP
error terms, attention live: circuits/features.py), with the same ratio.

necessity of a node v = f(C) − f(C \\ {v}): how much faithfulness is lost without it. EMB and
LOGITS are never ablated, so they have no necessity (None).
"""

from __future__ import annotations

from collections.abc import Callable

import networkx as nx
import torch
from pydantic import BaseModel, Field

from tdb_agent.circuits.evaluate import AblationMode, Evaluator
from tdb_agent.circuits.model import behaviour, components
from tdb_agent.circuits.pairs import Behaviour, PromptPair
from tdb_agent.circuits.features import UNIVERSE as FEATURE_UNIVERSE
from tdb_agent.circuits.features import FeatureEvaluator, feature_keep_set, is_feature_circuit, universe_units
from tdb_agent.circuits.universe import POSITIONS, UNIVERSE, KeepSet, keep_set, universe_size
from tdb_agent.engine import Engine
from tdb_agent.errors import TdbError
from tdb_agent.ops.metrics import MetricName
from tdb_agent.ops.runs import RunCache

Progress = Callable[[int, int], None]
NEVER_ABLATED = ("EMB", "LOGITS")


class NodeNecessity(BaseModel):
    id: str
    faithfulness_without: float = Field(description="faithfulness of the circuit without this node")
    drop: float = Field(description="faithfulness − faithfulness_without: how much the circuit needs the node")


class Validation(BaseModel):
    faithfulness: float = Field(description="(m(C) − m(∅)) / (m(full) − m(∅)); 1 = the circuit alone recovers "
                                "the full model's metric, 0 = no better than ablating everything")
    mode: AblationMode = Field(description="how components outside the circuit are ablated")
    positions: str = Field(POSITIONS, description="where they are ablated")
    universe: str = Field(UNIVERSE, description="which components can be ablated")
    metric_name: MetricName
    behaviour: str = Field(description="the prompt pairs the metric is averaged over")
    n_pairs: int
    metric_full: float = Field(description="mean metric of the unablated model")
    metric_empty: float = Field(description="mean metric with the whole universe ablated")
    metric_circuit: float = Field(description="mean metric with everything outside the circuit ablated")
    nodes: list[str] = Field(description="the circuit's components")
    n_kept: int = Field(description="universe components (heads + MLP blocks) the circuit keeps, fully or partly")
    n_universe: int
    necessity: list[NodeNecessity] | None = Field(None, description="per node, largest drop first")
    forward_passes: int


def resolve_pairs(g: nx.DiGraph, pairs: list[PromptPair] | Behaviour | None) -> tuple[list[PromptPair], str]:
    if isinstance(pairs, Behaviour):
        return pairs.resolve(), pairs.describe()
    if pairs is not None:
        return list(pairs), f"{len(pairs)} prompt pairs"
    b = behaviour(g)
    if b is None:
        raise TdbError("the circuit has no behaviour (task or prompt pairs) to validate on; give pairs")
    return b.resolve(), b.describe()


def make_evaluator(engine: Engine, g: nx.DiGraph, pairs: list[PromptPair] | Behaviour | None = None,
                   mode: AblationMode = "mean", cache: RunCache | None = None,
                   batch_size: int = 64) -> tuple[Evaluator, str]:
    """The circuit's evaluator: over heads and MLPs, or over transcoder features and MLP
    error terms for a circuit that names features (circuits/features.py)."""
    ps, desc = resolve_pairs(g, pairs)
    cls = FeatureEvaluator if is_feature_circuit(components(g)) else Evaluator
    return cls(engine, ps, mode=mode, metric=g.graph.get("metric"), cache=cache, batch_size=batch_size), desc


def keeps_of(engine: Engine, nodes: list[str], feature: bool) -> KeepSet:
    return feature_keep_set(nodes, engine) if feature else keep_set(nodes, engine.spec)


def faithfulness(engine: Engine, nodes: list[str], pairs: list[PromptPair] | Behaviour,
                 mode: AblationMode = "mean", metric: MetricName | None = None,
                 cache: RunCache | None = None) -> float:
    """Faithfulness of a bare list of components (no graph needed)."""
    ps = pairs.resolve() if isinstance(pairs, Behaviour) else list(pairs)
    feature = is_feature_circuit(nodes)
    keep = keeps_of(engine, nodes, feature)
    ev = (FeatureEvaluator if feature else Evaluator)(engine, ps, mode=mode, metric=metric, cache=cache)
    return ev.faithfulness(ev.metric_rows([keep])[0])


def validate(engine: Engine, g: nx.DiGraph, pairs: list[PromptPair] | Behaviour | None = None,
             mode: AblationMode = "mean", necessity: bool = True, record: bool = True,
             cache: RunCache | None = None, batch_size: int = 64, progress: Progress | None = None,
             should_stop: Callable[[], bool] | None = None) -> Validation:
    """Faithfulness of the circuit (and each node's necessity) on its behaviour or on `pairs`.

    With `record`, the result becomes the graph's latest validation (`faithfulness` at the
    top level of the graph attributes) and each node gets its `necessity`.
    """
    nodes = components(g)
    feature = is_feature_circuit(nodes)
    keep = keeps_of(engine, nodes, feature)  # refuses a bad node before any forward pass
    ev, desc = make_evaluator(engine, g, pairs, mode, cache, batch_size)
    tested = [n for n in nodes if n.split("@")[0] not in NEVER_ABLATED] if necessity else []
    keeps = [keep] + [keeps_of(engine, [m for m in nodes if m != n], feature) for n in tested]
    rows = ev.metric_rows(keeps, progress=progress, should_stop=should_stop)
    f = ev.faithfulness(rows[0])
    nec = None
    if necessity:
        nec = [NodeNecessity(id=n, faithfulness_without=(fw := ev.faithfulness(r)), drop=f - fw)
               for n, r in zip(tested, rows[1:])]
        nec.sort(key=lambda x: -x.drop)
    n_kept = len(keep) if feature else len({u if u[0] != "neuron" else ("mlp", u[1]) for u in keep})
    result = Validation(faithfulness=f, mode=mode, metric_name=ev.metric_name, behaviour=desc, n_pairs=len(ev.pairs),
                        universe=FEATURE_UNIVERSE if feature else UNIVERSE,
                        metric_full=_mean(ev.m_full), metric_empty=_mean(ev.m_empty), metric_circuit=_mean(rows[0]),
                        nodes=nodes, n_kept=n_kept, n_universe=universe_units(engine) if feature else universe_size(
                            engine.spec), necessity=nec, forward_passes=ev.forward_passes)
    if record:
        record_validation(g, result)
    return result


def record_validation(g: nx.DiGraph, v: Validation) -> None:
    g.graph["validation"] = v.model_dump(mode="json")
    g.graph["faithfulness"] = v.faithfulness
    drops = {n.id: n.drop for n in v.necessity or []}
    for n in g.nodes:
        g.nodes[n]["necessity"] = drops.get(n)


def _mean(t: torch.Tensor) -> float:
    return float(t.mean())
