"""Edge circuits: circuit hypotheses whose unit is an edge of the EAP/ACDC/MIB edge graph
(ops/edges/graph.py), not a node. The nodes are implied by the edges.

The graph stays a normal circuit (model.py): each kept edge "SENDER->RECEIVER" becomes the
networkx edge sender -> receiver's node (a head for its q, k or v input; every query head of
the group for a shared key/value input), with via q/k/v/direct, its score as weight and the
measurement as evidence. A head that feeds another through several inputs keeps one networkx
edge (the strongest input's via, the scores summed) with one evidence entry per input. The
exact edge list, which validation needs, is the graph attribute `edges`:

    graph["granularity"] = "edge"
    graph["edges"] = [{"edge": "L0.H1->L1.H3.k", "score": 0.12}, ...]   (ranked)
    graph["edge_method"] = {"method": "eap-ig", "reference": "corrupted", "steps": 5, ...}
"""

from __future__ import annotations

from typing import Any

import networkx as nx
import torch

from tdb_agent.circuits.model import Evidence, add_edge, get_edge, new_circuit
from tdb_agent.circuits.pairs import Behaviour
from tdb_agent.engine import Engine
from tdb_agent.errors import TdbError
from tdb_agent.ops.edges.graph import EdgeGraph
from tdb_agent.ops.metrics import MetricName


def edge_circuit(engine: Engine, name: str, edges: list[tuple[str, float]], *, behaviour: Behaviour | None,
                 metric: MetricName | None, method: dict[str, Any], tool: str = "edge_circuit",
                 description: str | None = None) -> nx.DiGraph:
    """A circuit hypothesis holding exactly `edges` ([("SENDER->RECEIVER", score)], ranked)."""
    graph = EdgeGraph(engine.spec)
    g = new_circuit(name, behaviour=behaviour, metric=metric, model=engine.name, description=description)
    g.graph["granularity"] = "edge"
    g.graph["edges"] = [{"edge": e, "score": float(s)} for e, s in edges]
    g.graph["edge_method"] = method
    for e, score in edges:
        s_idx, r_idx = graph.parse_edge(e)
        src, recv = graph.senders[s_idx], graph.receivers[r_idx]
        ev = Evidence(tool=tool, args={"edge": e, **method}, value=round(float(score), 6))
        for head in recv.heads:
            via = recv.via
            if g.has_edge(src, head):
                old = get_edge(g, src, head)
                add_edge(g, src, head, via=old.via, weight=(old.weight or 0.0) + float(score), evidence=[ev],
                         engine=engine)
            else:
                add_edge(g, src, head, via=via, weight=float(score), evidence=[ev], engine=engine)
    return g


def circuit_edges(g: nx.DiGraph) -> list[str]:
    """The exact edges of an edge circuit."""
    if g.graph.get("granularity") != "edge":
        raise TdbError(f"circuit {g.graph.get('name')!r} is a node circuit; edge validation needs an edge circuit "
                       "(made by edge_circuit)")
    return [row["edge"] for row in g.graph.get("edges", [])]


def keep_mask(engine: Engine, edges: list[str]) -> torch.Tensor:
    """[1, n_senders, n_receivers] mask keeping exactly these edges."""
    graph = EdgeGraph(engine.spec)
    keep = torch.zeros(1, graph.n_senders, graph.n_receivers, dtype=torch.bool)
    for e in edges:
        keep[(0,) + graph.parse_edge(e)] = True
    return keep
