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

A position-aware edge circuit pins each edge to a token position: "L0.H1->L1.H3.k@4" is the
edge read by the receiver at position 4 only (the prompts then share one token length, kept
as graph["positions"]); its evidence names the position.
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


def split_position(edge: str, positions: int | None) -> tuple[str, int | None]:
    """("SENDER->RECEIVER", t) of "SENDER->RECEIVER@t" (t None without a position)."""
    base, at, pos = edge.partition("@")
    if not at:
        if positions is not None:
            raise TdbError(f"edge {edge!r} has no position; a position-aware circuit's edges are SENDER->RECEIVER@t")
        return base, None
    if positions is None:
        raise TdbError(f"edge {edge!r} is pinned to a position, but the circuit is not position-aware")
    if not (pos.isascii() and pos.isdigit()) or int(pos) >= positions:
        raise TdbError(f"edge {edge!r}: the position must be 0..{positions - 1}")
    return base, int(pos)


def edge_circuit(engine: Engine, name: str, edges: list[tuple[str, float]], *, behaviour: Behaviour | None,
                 metric: MetricName | None, method: dict[str, Any], tool: str = "edge_circuit",
                 description: str | None = None, positions: int | None = None) -> nx.DiGraph:
    """A circuit hypothesis holding exactly `edges` ([("SENDER->RECEIVER[@t]", score)], ranked);
    `positions`: the prompts' token length of a position-aware circuit (edges "...@t")."""
    graph = EdgeGraph(engine.spec)
    g = new_circuit(name, behaviour=behaviour, metric=metric, model=engine.name, description=description)
    g.graph["granularity"] = "edge"
    g.graph["edges"] = [{"edge": e, "score": float(s)} for e, s in edges]
    g.graph["edge_method"] = method
    if positions is not None:
        g.graph["positions"] = int(positions)
    for e, score in edges:
        base, pos = split_position(e, positions)
        s_idx, r_idx = graph.parse_edge(base)
        src, recv = graph.senders[s_idx], graph.receivers[r_idx]
        where = {} if pos is None else {"position": pos}
        ev = Evidence(tool=tool, args={"edge": e, **where, **method}, value=round(float(score), 6))
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


def circuit_positions(g: nx.DiGraph) -> int | None:
    """The token length a position-aware edge circuit is pinned to (None: edges over all positions)."""
    p = g.graph.get("positions")
    return None if p is None else int(p)


def keep_mask(engine: Engine, edges: list[str], positions: int | None = None) -> torch.Tensor:
    """[1, (positions,) n_senders, n_receivers] mask keeping exactly these edges ("...@t" when
    position-aware)."""
    graph = EdgeGraph(engine.spec)
    lead = (1,) if positions is None else (1, positions)
    keep = torch.zeros(lead + (graph.n_senders, graph.n_receivers), dtype=torch.bool)
    for e in edges:
        base, pos = split_position(e, positions)
        keep[(0,) + (() if pos is None else (pos,)) + graph.parse_edge(base)] = True
    return keep
