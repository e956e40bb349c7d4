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

from tdb_agent.errors import TdbError
from tdb_agent.ops.graph.sparse import DENSE_LIMIT, SparseRows

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


def row_influence(rows: SparseRows, row_cols: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Influence on every column of the computed rows (sparse), row r being the node in
    column row_cols[r] (-1: a target). w weights the rows (0 for feature rows)."""
    feat_rows = (row_cols >= 0).nonzero(as_tuple=True)[0]
    ri, col = rows.row_index(), rows.col.long()
    a = rows.val.abs()
    an = a / torch.zeros(rows.n_rows, device=a.device).index_add_(0, ri, a).clamp(min=1e-10)[ri]

    def step(x):
        return torch.zeros(rows.n_cols, device=a.device).index_add_(0, col, an * x[ri])
    cur = step(w)
    total = cur.clone()
    for _ in range(MAX_DEPTH):
        nxt = torch.zeros_like(w)
        nxt[feat_rows] = cur[row_cols[feat_rows]]
        if not nxt.any():
            return total
        cur = step(nxt)
        total += cur
    raise RuntimeError("influence did not converge: the graph has a cycle")


class SquareGraph:
    """The expanded features, all error and embedding nodes and the targets, ordered
    features, errors, embeddings, targets (N nodes). Only feature and target nodes have
    inputs, so the graph is held as its rows `R` [n_feat + n_logit, N] (feature rows, then
    target rows); `A` is the dense N x N view, for small graphs. Built from `R=` or, as
    before, from a dense square A whose error and embedding rows are zero."""

    def __init__(self, A: torch.Tensor | None, cols: torch.Tensor, n_feat: int, n_err: int, n_emb: int,
                 n_logit: int, weights: torch.Tensor, *, R: torch.Tensor | None = None):
        self.cols, self.n_feat, self.n_err, self.n_emb, self.n_logit = cols, n_feat, n_err, n_emb, n_logit
        self.weights = weights  # [N]: target weights at the logit nodes, 0 elsewhere
        self.N = len(cols) + n_logit
        self.row_nodes = torch.cat([torch.arange(n_feat), torch.arange(self.N - n_logit, self.N)]).to(weights.device)
        if R is None:
            others = torch.ones(self.N, dtype=torch.bool, device=A.device)
            others[self.row_nodes.to(A.device)] = False
            if A[others].any():
                raise ValueError("error and embedding nodes have no inputs: their rows of A must be zero")
        self._A, self._R = A, R

    @property
    def R(self) -> torch.Tensor:
        """[n_feat + n_logit, N]: the inputs of the feature nodes, then of the targets."""
        return self._R if self._R is not None else self._A[self.row_nodes.to(self._A.device)]

    @property
    def A(self) -> torch.Tensor:
        if self._A is not None:
            return self._A
        if self.N * self.N > DENSE_LIMIT:
            raise TdbError(f"this graph has {self.N:,} nodes, too many for a dense node x node matrix; use its "
                           "rows (SquareGraph.R)")
        A = torch.zeros(self.N, self.N, device=self.R.device, dtype=self.R.dtype)
        A[self.row_nodes.to(A.device)] = self.R
        return A

    def row_of(self, node: int) -> int | None:
        """The row of square node `node` in R (None: an error or embedding node)."""
        if node < self.n_feat:
            return node
        return self.n_feat + node - (self.N - self.n_logit) if node >= self.N - self.n_logit else None

    def weight(self, t: int, s: int) -> float:
        """The edge s -> t (square indices)."""
        r = self.row_of(t)
        return 0.0 if r is None else float(self.R[r, s])

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """A per-row vector as a per-node vector (0 at error and embedding nodes)."""
        out = x.new_zeros(self.N)
        out[self.row_nodes.to(x.device)] = x
        return out


def square(graph) -> SquareGraph:
    """The expanded features, all error and embedding nodes and the targets (rows form)."""
    src = graph.src
    nf = len(graph.rows)
    dev = graph.value.device
    other = torch.arange(src.n_feat, src.n_cols, device=dev)
    cols = torch.cat([graph.rows.to(dev), other])
    nl = len(graph.logits)
    R = torch.zeros(nf + nl, len(cols) + nl, device=dev)
    R[:, :len(cols)] = graph.edges.select(cols)
    w = torch.zeros(len(cols) + nl, device=dev)
    w[len(cols):] = torch.tensor([ln.weight for ln in graph.logits], device=dev)
    return SquareGraph(None, cols, nf, src.n_err, src.n_pos, nl, w, R=R)


def influence_rows(Rn: torch.Tensor, sq: SquareGraph) -> torch.Tensor:
    """w Â + w Â² + ... over all N nodes, with Â given by its normalised rows Rn."""
    rn = sq.row_nodes.to(Rn.device)
    cur = sq.weights[rn] @ Rn
    total = cur.clone()
    for _ in range(MAX_DEPTH):
        x = cur[rn]
        if not x.any():
            return total
        cur = x @ Rn
        total += cur
    raise RuntimeError("influence did not converge: the graph has a cycle")


def _threshold(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """The score above which the highest scores cover `fraction` of the total (only the
    positive scores are sorted)."""
    s = scores.flatten()
    s = s[s > 0].sort(descending=True).values
    total = s.sum()
    if not len(s) or total <= 0:
        return scores.new_tensor(float("inf"))
    cum = s.cumsum(0) / total
    i = int(torch.searchsorted(cum, torch.tensor(fraction, device=s.device, dtype=cum.dtype)))
    return s[min(i, len(s) - 1)]


@dataclass
class Pruned:
    node_mask: torch.Tensor  # [N] over the square graph's nodes
    edge_rows: torch.Tensor  # [n_rows, N]: kept edges into the row nodes (SquareGraph.R's layout)
    node_influence: torch.Tensor  # [N]
    cumulative: torch.Tensor  # [N] cumulative influence share of each node in rank order
    row_nodes: torch.Tensor  # square index of each row

    @property
    def edge_mask(self) -> torch.Tensor:
        """Dense [N, N] view (small graphs)."""
        N = len(self.node_mask)
        if N * N > DENSE_LIMIT:
            raise TdbError(f"{N:,} nodes are too many for a dense edge mask; use Pruned.edge_rows")
        m = torch.zeros(N, N, dtype=torch.bool, device=self.edge_rows.device)
        m[self.row_nodes.to(m.device)] = self.edge_rows
        return m

    def edges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(targets, sources) of the kept edges, square indices."""
        r, s = self.edge_rows.nonzero(as_tuple=True)
        return self.row_nodes.to(r.device)[r], s


def prune(sq: SquareGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98,
          max_feature_nodes: int | None = None) -> Pruned:
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1, not {v}")
    nf = sq.n_feat
    rn = sq.row_nodes.to(sq.R.device)
    keep_always = sq.N - sq.n_emb - sq.n_logit
    infl = influence_rows(normalise(sq.R), sq)
    node_mask = infl >= _threshold(infl, node_threshold)
    node_mask[keep_always:] = True
    if max_feature_nodes is not None and int(node_mask[:nf].sum()) > max_feature_nodes:
        top = infl[:nf].topk(max_feature_nodes).indices
        fm = torch.zeros(nf, dtype=torch.bool, device=infl.device)
        fm[top] = True
        node_mask[:nf] &= fm
    P = sq.R.clone()
    P[~node_mask[rn]] = 0
    P[:, ~node_mask] = 0
    Pn = normalise(P)
    pinf = influence_rows(Pn, sq) + sq.weights
    scores = Pn * pinf[rn][:, None]
    edge_rows = scores >= _threshold(scores, edge_threshold)
    edge_rows &= scores > 0
    while True:
        old = node_mask.clone()
        edge_rows[~node_mask[rn]] = False
        edge_rows[:, ~node_mask] = False
        node_mask[:keep_always] &= edge_rows[:, :keep_always].any(0)  # outgoing edges
        node_mask[:nf] &= edge_rows[:nf].any(1)  # incoming edges
        if torch.equal(old, node_mask):
            break
    order = infl.sort(descending=True)
    cum = torch.zeros_like(infl)
    cum[order.indices] = order.values.cumsum(0) / infl.sum().clamp(min=1e-10)
    return Pruned(node_mask, edge_rows, infl, cum, sq.row_nodes)


def scores(sq: SquareGraph) -> tuple[float, float]:
    """(replacement score, completeness score) of the square graph."""
    nf, ne, nemb = sq.n_feat, sq.n_err, sq.n_emb
    Rn = normalise(sq.R)
    infl = influence_rows(Rn, sq)
    emb = infl[nf + ne:nf + ne + nemb].sum()
    err = infl[nf:nf + ne].sum()
    replacement = float(emb / (emb + err).clamp(min=1e-10))
    non_error = torch.ones(sq.N, device=Rn.device)
    non_error[sq.row_nodes.to(Rn.device)] = 1 - Rn[:, nf:nf + ne].sum(1)
    out = infl + sq.weights
    completeness = float((non_error * out).sum() / out.sum().clamp(min=1e-10))
    return replacement, completeness
