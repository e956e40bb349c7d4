"""The k strongest embedding-to-target paths against brute-force enumeration of every path."""

from __future__ import annotations

import pytest
import torch

from tdb_agent.errors import TdbError
from tdb_agent.ops.graph import paths
from tdb_agent.ops.graph.influence import SquareGraph, normalise
from tdb_agent.ops.graph.paths import strongest_paths_k


def random_dag(seed: int) -> SquareGraph:
    """Features 0..5 (feature j may read features < j), 2 errors, 3 embeddings, 1 target; sparse."""
    g = torch.Generator().manual_seed(seed)
    nf, ne, nemb = 6, 2, 3
    N = nf + ne + nemb + 1
    A = torch.zeros(N, N)
    for t in list(range(nf)) + [N - 1]:
        for s in range(nf + ne + nemb):
            if (s < nf and s >= t) or torch.rand(1, generator=g) < 0.35:
                continue
            A[t, s] = torch.randn(1, generator=g)
    w = torch.zeros(N)
    w[-1] = 1
    return SquareGraph(A, torch.arange(N - 1), nf, ne, nemb, 1, w)


def brute_force(sq: SquareGraph, target: int) -> list[tuple[float, list[int]]]:
    An = normalise(sq.A)
    emb = range(sq.n_feat + sq.n_err, sq.n_feat + sq.n_err + sq.n_emb)
    out = []

    def walk(v, path, score):  # backwards from the target
        if v in emb:
            out.append((score, path[::-1]))
            return
        for s in range(sq.A.shape[1]):
            if An[v, s] > 0:
                walk(s, path + [s], score * float(An[v, s]))

    walk(target, [target], 1.0)
    return sorted(out, key=lambda x: -x[0])


@pytest.mark.parametrize("seed", range(6))
def test_strongest_paths_match_brute_force(seed):
    sq = random_dag(seed)
    target = sq.A.shape[0] - 1
    every = brute_force(sq, target)
    assert len(every) > 5
    got = strongest_paths_k(sq, target, k=5)
    assert [s for s, _ in got] == pytest.approx([s for s, _ in every[:5]], rel=1e-6)
    assert [p for _, p in got][0] == every[0][1]
    for s, p in got:  # each path's strength is the product along it, and starts at an embedding
        assert p[0] >= sq.n_feat + sq.n_err and p[-1] == target
        An = normalise(sq.A)
        assert s == pytest.approx(torch.tensor([float(An[b, a]) for a, b in zip(p, p[1:])]).prod().item())


def test_edge_mask_restricts_paths():
    sq = random_dag(0)
    target = sq.A.shape[0] - 1
    mask = torch.zeros_like(sq.A, dtype=torch.bool)
    first = strongest_paths_k(sq, target, k=1)[0][1]
    for a, b in zip(first, first[1:]):
        mask[b, a] = True
    only = strongest_paths_k(sq, target, k=3, edge_mask=mask)
    assert [p for _, p in only] == [first] and only[0][0] == pytest.approx(1.0)


def test_too_many_edges_refused(monkeypatch):
    sq = random_dag(1)
    monkeypatch.setattr(paths, "MAX_EDGES", 3)
    with pytest.raises(TdbError, match="prune the graph first"):
        strongest_paths_k(sq, sq.A.shape[0] - 1)
