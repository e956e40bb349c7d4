"""The k strongest paths from the embeddings to a target of an attribution graph, and where
each node sits (layer, position) for neighbourhood filters.

A path's strength is the product of its normalised edge weights Â = |A| / row sum (each
edge's share of its target's inputs), so paths through many weak hops rank low. Exact:
every node keeps its k best paths from an embedding, best-first in a DAG, so the k best at
the target are the k best overall (any prefix of a top-k path is top-k at its node)."""

from __future__ import annotations

import heapq
from functools import lru_cache

import torch

from tdb_agent.errors import TdbError
from tdb_agent.ops.graph.influence import SquareGraph, normalise

MAX_EDGES = 2_000_000  # the search walks edges in Python (a few seconds at this size)


def strongest_paths_k(sq: SquareGraph, target: int, k: int = 5, edge_mask: torch.Tensor | None = None
                      ) -> list[tuple[float, list[int]]]:
    """(strength, square indices start..target) of the k strongest embedding-to-target paths.
    edge_mask: kept edges, as Pruned.edge_rows (rows of sq.R) or a dense N x N mask."""
    if edge_mask is not None and edge_mask.shape[0] == sq.N and sq.N != sq.R.shape[0]:
        edge_mask = edge_mask[sq.row_nodes.to(edge_mask.device)]
    R = sq.R if edge_mask is None else sq.R * edge_mask
    An = normalise(R)
    n_edges = int((An != 0).sum())
    if n_edges > MAX_EDGES:
        raise TdbError(f"{n_edges:,} edges are too many to search for paths (at most {MAX_EDGES:,}); prune the "
                       "graph first (graph_prune) and search the pruned graph")
    r_idx, s_idx = An.nonzero(as_tuple=True)
    w = An[r_idx, s_idx].tolist()
    t_idx = sq.row_nodes.to(r_idx.device)[r_idx]
    incoming: dict[int, list[tuple[int, float]]] = {}
    for t, s, x in zip(t_idx.tolist(), s_idx.tolist(), w):
        incoming.setdefault(t, []).append((s, x))
    emb0 = sq.n_feat + sq.n_err
    embeddings = range(emb0, emb0 + sq.n_emb)

    @lru_cache(maxsize=None)
    def best(v: int) -> tuple[tuple[float, tuple[int, ...]], ...]:
        if v in embeddings:
            return ((1.0, (v,)),)
        cands = ((sc * x, path + (v,)) for s, x in incoming.get(v, []) for sc, path in best(s))
        return tuple(heapq.nlargest(k, cands, key=lambda c: c[0]))

    return [(sc, list(path)) for sc, path in best(target)]


def layer_position(graph) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer and position of every source column: features at their layer, errors at the
    layer whose output they are part of, embeddings at layer -1."""
    src = graph.src
    n_err_blocks = len(src.err_keys)
    dev = src.feat.device
    pos = torch.arange(src.n_pos, device=dev)
    err_layers = torch.tensor([l for _, l in src.err_keys], device=dev, dtype=torch.long)
    layer = torch.cat([src.feat[:, 0], err_layers.repeat_interleave(src.n_pos),
                       torch.full((src.n_pos,), -1, device=dev, dtype=torch.long)])
    position = torch.cat([src.feat[:, 1], pos.repeat(n_err_blocks), pos])
    return layer, position
