"""Supernodes: feature nodes grouped by their attribution profiles.

A feature's profile is its signed outgoing influence: column i of the normalised adjacency
Â (its share in each node's inputs), with the sign of the edge, times the influence +
target weight of each of those nodes, i.e. how much of the target's attribution flows out
of i, to whom, and whether it pushes or pulls (a feature for the answer and one against
it do not share a supernode). Features
whose profiles point the same way (cosine similarity) play the same part in the graph;
average-linkage agglomerative clustering merges them while the average similarity between
two groups is at least the threshold."""

from __future__ import annotations

import torch

from tdb_agent.ops.graph.influence import SquareGraph, influence_rows, normalise


def profiles(sq: SquareGraph, nodes: torch.Tensor) -> torch.Tensor:
    """[len(nodes), N] outgoing-influence vectors of the given square-graph nodes (zero at
    error and embedding nodes, which have no inputs)."""
    Rn = normalise(sq.R)
    out = influence_rows(Rn, sq) + sq.weights
    rn = sq.row_nodes.to(Rn.device)
    P = torch.zeros(len(nodes), sq.N, device=Rn.device)
    P[:, rn] = (Rn[:, nodes] * sq.R[:, nodes].sign() * out[rn][:, None]).T
    return P


def agglomerate(X: torch.Tensor, threshold: float) -> list[list[int]]:
    """Average-linkage clusters of the rows of X by cosine similarity: merge the two most
    similar groups while their average pairwise similarity >= threshold. Groups are listed
    largest total norm first, members in row order."""
    n = X.shape[0]
    if n == 0:
        return []
    U = X.float() / X.float().norm(dim=1, keepdim=True).clamp(min=1e-12)
    S = U @ U.T
    S.fill_diagonal_(-float("inf"))
    size = torch.ones(n, device=X.device)
    members = [[i] for i in range(n)]
    alive = torch.ones(n, dtype=torch.bool, device=X.device)
    for _ in range(n - 1):
        flat = int(S.argmax())
        a, b = divmod(flat, n)
        if not float(S[a, b]) >= threshold:
            break
        a, b = min(a, b), max(a, b)
        row = (size[a] * S[a] + size[b] * S[b]) / (size[a] + size[b])  # Lance-Williams, average linkage
        S[a], S[:, a] = row, row
        S[a, a] = -float("inf")
        S[b], S[:, b] = -float("inf"), -float("inf")
        size[a] += size[b]
        alive[b] = False
        members[a] += members[b]
    mass = X.float().norm(dim=1)
    groups = [sorted(members[i]) for i in alive.nonzero(as_tuple=True)[0].tolist()]
    return sorted(groups, key=lambda g: -float(mass[g].sum()))
