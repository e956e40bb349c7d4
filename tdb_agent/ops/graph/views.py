"""Cached views of a built attribution graph: its square form, its two scores and its
prunings, each computed once per graph (a pruning once per setting) and kept on the graph.

Every query tool (paths, node, supernodes, export, graph_to_circuit, ...) needs the pruned
graph; pruning runs the influence power series twice over an N x N matrix, which is the
expensive part of a query. A graph does not change once built, so its views never go stale;
they are read-only (callers must not write into the returned tensors). The last
`MAX_PRUNINGS` settings are kept (each holds an N x N edge mask).
"""

from __future__ import annotations

from collections import OrderedDict

from tdb_agent.ops.graph import influence
from tdb_agent.ops.graph.influence import Pruned, SquareGraph

MAX_PRUNINGS = 4
_ATTR = "_views"


def _views(graph) -> dict:
    v = graph.__dict__.get(_ATTR)
    if v is None:
        v = {"prunings": OrderedDict()}
        setattr(graph, _ATTR, v)
    return v


def square_of(graph) -> SquareGraph:
    v = _views(graph)
    if "square" not in v:
        v["square"] = influence.square(graph)
    return v["square"]


def scores_of(graph) -> tuple[float, float]:
    """(replacement score, completeness score) of the whole graph."""
    v = _views(graph)
    if "scores" not in v:
        v["scores"] = influence.scores(square_of(graph))
    return v["scores"]


def pruned_of(graph, node_threshold: float = 0.8, edge_threshold: float = 0.98,
              max_feature_nodes: int | None = None) -> Pruned:
    """The graph pruned with these settings (computed on the first request for them)."""
    cache = _views(graph)["prunings"]
    key = (float(node_threshold), float(edge_threshold), None if max_feature_nodes is None else int(max_feature_nodes))
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    p = influence.prune(square_of(graph), *key)
    cache[key] = p
    while len(cache) > MAX_PRUNINGS:
        cache.popitem(last=False)
    return p
