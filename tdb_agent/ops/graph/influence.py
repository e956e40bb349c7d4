"""Influence, pruning and the two quality scores of an attribution graph.

Definitions (as circuit-tracer defines them, written from its description):
* Â = |A| with each row divided by its sum (the share of each input in a node's inputs);
* influence of the targets, weighted by w (their probabilities), on every node:
  w Â + w Â² + ... (the series ends: the graph is a DAG, Â is nilpotent);
* node pruning keeps the nodes of highest influence covering `node_threshold` of the total
  (embeddings and targets always kept); edge pruning scores an edge by Â[t, s] times the
  influence of t (plus w) and keeps `edge_threshold` of the total; then features without
  incoming edges and features/errors without outgoing edges are dropped until stable;
* replacement score = influence of the embeddings / (influence of embeddings + errors);
* completeness score = sum over nodes of (1 - share of error inputs) weighted by
  (influence + w), over the sum of (influence + w).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_DEPTH = 10_000


def normalise(A: torch.Tensor) -> torch.Tensor:
    a = A.abs()
    return a / a.sum(1, keepdim=True).clamp(min=1e-10)


def influence(An: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """w Â + w Â² + ... for a square row-normalised Â."""
    cur = w @ An
    total = cur.clone()
    for _ in range(MAX_DEPTH):
        if not cur.any():
            return total
        cur = cur @ An
        total += cur
    raise RuntimeError("influence did not converge: the graph has a cycle")


def row_influence(rows: torch.Tensor, row_cols: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Influence on every column of a rectangular adjacency whose row r is the node in
    column row_cols[r] (-1: a target). w weights the rows (0 for feature rows)."""
    An = normalise(rows)
    feat_rows = (row_cols >= 0).nonzero(as_tuple=True)[0]
    cur = w @ An
    total = cur.clone()
    for _ in range(MAX_DEPTH):
        nxt = torch.zeros_like(w)
        nxt[feat_rows] = cur[row_cols[feat_rows]]
        if not nxt.any():
            return total
        cur = nxt @ An
        total += cur
    raise RuntimeError("influence did not converge: the graph has a cycle")


@dataclass
class SquareGraph:
    """The expanded nodes as a square matrix, ordered features, errors, embeddings, targets."""

    A: torch.Tensor  # [N, N] rows = targets of edges, columns = sources
    cols: torch.Tensor  # the graph column (source index) of each feature/error/embedding node
    n_feat: int
    n_err: int
    n_emb: int
    n_logit: int
    weights: torch.Tensor  # [N]: target weights at the logit rows, 0 elsewhere


def square(graph) -> SquareGraph:
    """The expanded features, all error and embedding nodes and the targets, square."""
    src = graph.src
    nf = len(graph.rows)
    other = torch.arange(src.n_feat, src.n_cols, device=graph.adjacency.device)
    cols = torch.cat([graph.rows.to(other.device), other])
    n_src = len(cols)
    nl = len(graph.logits)
    N = n_src + nl
    A = torch.zeros(N, N, device=graph.adjacency.device)
    A[:nf, :n_src] = graph.adjacency[:nf][:, cols]
    A[n_src:, :n_src] = graph.adjacency[nf:][:, cols]
    w = torch.zeros(N, device=A.device)
    w[n_src:] = torch.tensor([ln.weight for ln in graph.logits], device=A.device)
    return SquareGraph(A, cols, nf, src.n_err, src.n_pos, nl, w)


def _threshold(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """The score above which the highest scores cover `fraction` of the total."""
    s = scores.flatten().sort(descending=True).values
    total = s.sum()
    if total <= 0:
        return s.new_tensor(float("inf"))
    cum = s.cumsum(0) / total
    i = int(torch.searchsorted(cum, torch.tensor(fraction, device=s.device, dtype=cum.dtype)))
    i = min(i, max(int((s > 0).sum()) - 1, 0))
    return s[i]


@dataclass
class Pruned:
    node_mask: torch.Tensor  # [N] over the square graph's nodes
    edge_mask: torch.Tensor  # [N, N]
    node_influence: torch.Tensor  # [N]
    cumulative: torch.Tensor  # [N] cumulative influence share of each node in rank order


def prune(sq: SquareGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98,
          max_feature_nodes: int | None = None) -> Pruned:
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1, not {v}")
    nf, ne = sq.n_feat, sq.n_err
    keep_always = sq.A.shape[0] - sq.n_emb - sq.n_logit
    infl = influence(normalise(sq.A), sq.weights)
    node_mask = infl >= _threshold(infl, node_threshold)
    node_mask[keep_always:] = True
    if max_feature_nodes is not None and int(node_mask[:nf].sum()) > max_feature_nodes:
        top = infl[:nf].topk(max_feature_nodes).indices
        fm = torch.zeros(nf, dtype=torch.bool, device=infl.device)
        fm[top] = True
        node_mask[:nf] &= fm
    P = sq.A.clone()
    P[~node_mask] = 0
    P[:, ~node_mask] = 0
    Pn = normalise(P)
    pinf = influence(Pn, sq.weights) + sq.weights
    scores = Pn * pinf[:, None]
    edge_mask = scores >= _threshold(scores, edge_threshold)
    edge_mask &= scores > 0
    while True:
        old = node_mask.clone()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[:keep_always] &= edge_mask[:, :keep_always].any(0)  # outgoing edges
        node_mask[:nf] &= edge_mask[:nf].any(1)  # incoming edges
        if torch.equal(old, node_mask):
            break
    order = infl.sort(descending=True)
    cum = torch.zeros_like(infl)
    cum[order.indices] = order.values.cumsum(0) / infl.sum().clamp(min=1e-10)
    return Pruned(node_mask, edge_mask, infl, cum)


def scores(sq: SquareGraph) -> tuple[float, float]:
    """(replacement score, completeness score) of the square graph."""
    nf, ne, nemb = sq.n_feat, sq.n_err, sq.n_emb
    An = normalise(sq.A)
    infl = influence(An, sq.weights)
    emb = infl[nf + ne:nf + ne + nemb].sum()
    err = infl[nf:nf + ne].sum()
    replacement = float(emb / (emb + err).clamp(min=1e-10))
    non_error = 1 - An[:, nf:nf + ne].sum(1)
    out = infl + sq.weights
    completeness = float((non_error * out).sum() / out.sum().clamp(min=1e-10))
    return replacement, completeness
