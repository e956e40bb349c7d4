"""Supernodes: agglomerative grouping by attribution profile on hand cases."""

from __future__ import annotations

import itertools

import pytest
import torch

from tdb_agent.ops.graph.influence import SquareGraph
from tdb_agent.ops.graph.supernodes import agglomerate, profiles


def test_two_obvious_groups():
    g = torch.Generator().manual_seed(0)
    a, b = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 1.0, 0])
    X = torch.stack([a * 2, b, a + 0.05 * torch.randn(4, generator=g), b * 3, a * 0.5])
    groups = agglomerate(X, threshold=0.8)
    assert sorted(groups) == [[0, 2, 4], [1, 3]]
    assert groups[0] == [1, 3]  # larger total norm first (|b| sqrt2 * 4 > 3.5)
    U = X / X.norm(dim=1, keepdim=True)
    S = U @ U.T
    for ga, gb in itertools.combinations(groups, 2):  # groups stay apart: average similarity < threshold
        assert S[ga][:, gb].mean() < 0.8
    assert agglomerate(X, threshold=1.01) == [[i] for i in [3, 0, 1, 2, 4]]
    assert len(agglomerate(X, threshold=-1.0)) == 1


def test_average_linkage_by_hand():
    # similarities: 0-1 .9, 2 close to 1 (0.6 to the pair on average) -> merged at .6 not at .7
    X = torch.tensor([[1.0, 0.0], [0.9, 0.435889894], [0.3, 0.953939201]])
    U = X / X.norm(dim=1, keepdim=True)
    S = U @ U.T
    avg = float((S[2, 0] + S[2, 1]) / 2)
    assert len(agglomerate(X, avg + 1e-4)) == 2 and len(agglomerate(X, avg - 1e-4)) == 1


def test_profiles_group_features_feeding_the_same_nodes():
    """f0, f1 feed f4 only; f2, f3 feed the target only; f4 feeds the target."""
    N = 5 + 1 + 1 + 1  # 5 features, 1 error, 1 embedding, target
    A = torch.zeros(N, N)
    A[4, 0], A[4, 1] = 1.0, 2.0
    A[7, 2], A[7, 3], A[7, 4] = 1.0, 0.5, 1.0
    for f in range(4):
        A[f, 6] = 1.0
    w = torch.zeros(N)
    w[7] = 1.0
    sq = SquareGraph(A, torch.arange(N - 1), n_feat=5, n_err=1, n_emb=1, n_logit=1, weights=w)
    P = profiles(sq, torch.arange(4))
    # f1's share of f4's inputs is 2/3 and f4 has influence 0.4: its profile is 2/3 * 0.4 at f4
    assert float(P[1, 4]) == pytest.approx(2 / 3 * 0.4)
    assert float(P[2, 7]) == pytest.approx(1 / 2.5)
    assert sorted(agglomerate(P, 0.9)) == [[0, 1], [2, 3]]
    A[7, 3] = -0.5  # f3 now pulls the target down: it leaves f2's group
    P = profiles(sq, torch.arange(4))
    assert float(P[3, 7]) == pytest.approx(-0.5 / 2.5)
    assert sorted(agglomerate(P, 0.9)) == [[0, 1], [2], [3]]
