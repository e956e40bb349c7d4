"""Graphs at scale: the sparse row store against its dense equivalent, and a whole graph
workflow (build, prune, scores, export, paths, node, intervention prediction) with every
dense view refused, so nothing builds a node x node matrix."""

from __future__ import annotations

import pytest
import torch

from tdb_agent.errors import TdbError
from tdb_agent.ops.graph import GraphTarget, build_graph, influence, sparse
from tdb_agent.ops.graph.export import to_json, validate
from tdb_agent.ops.graph.influence import prune, row_influence, scores, square
from tdb_agent.ops.graph.intervene import predict
from tdb_agent.ops.graph.paths import strongest_paths_k
from tdb_agent.ops.graph.query import strongest_paths
from tdb_agent.ops.graph.sparse import SparseRows
from tests.test_graph import PROMPT, attached, random_transcoders


def test_sparse_rows_equal_their_dense_matrix():
    g = torch.Generator().manual_seed(0)
    D = torch.randn(7, 11, generator=g) * (torch.rand(7, 11, generator=g) < 0.4)
    D[3] = 0  # an empty row
    S = SparseRows(11, "cpu")
    S.append(D[:4])
    S.append(D[4:])
    assert S.n_rows == 7 and S.nnz == int((D != 0).sum())
    torch.testing.assert_close(S.to_dense(), D)
    for r in range(7):
        torch.testing.assert_close(S.row(r), D[r])
    for c in range(11):
        torch.testing.assert_close(S.column(c), D[:, c])
    cols = torch.tensor([9, 0, 4])
    torch.testing.assert_close(S.select(cols), D[:, cols])
    torch.testing.assert_close(S.row_sums(), D.sum(1))
    order = torch.tensor([6, 0, 3, 2])
    torch.testing.assert_close(S.take_rows(order).to_dense(), D[order])
    w = torch.rand(7, generator=g)
    An = D.abs() / D.abs().sum(1, keepdim=True).clamp(min=1e-10)
    torch.testing.assert_close(S.normalised_vecmat(w), w @ An)


def test_row_influence_on_sparse_rows_equals_dense_series():
    """Rows: two features (graph columns 1 and 3) and a target; influence = w Â + w Â² + ..."""
    A = torch.tensor([[0.0, 0, 2, 0, 1],   # feature in column 1 <- col 2, col 4
                      [1.0, 0, 0, 0, 3],   # feature in column 3 <- col 0, col 4
                      [0.0, 2, 0, -1, 1]])  # target <- col 1, col 3, col 4
    S = SparseRows(5, "cpu")
    S.append(A)
    row_cols = torch.tensor([1, 3, -1])
    w = torch.tensor([0.0, 0.0, 1.0])
    # square form: nodes = columns 0..4 and the target (5)
    sq = torch.zeros(6, 6)
    sq[1, :5], sq[3, :5], sq[5, :5] = A[0], A[1], A[2]
    ws = torch.zeros(6)
    ws[5] = 1
    want = influence.influence(influence.normalise(sq), ws)[:5]
    torch.testing.assert_close(row_influence(S, row_cols, w), want)


def test_graph_workflow_never_builds_a_dense_node_matrix(tiny_engines, monkeypatch):
    e = tiny_engines["gpt2"]
    with attached(e, random_transcoders(e)):
        full = build_graph(e, PROMPT, GraphTarget(kind="top", mass=0.5, max_logits=3), batch_size=8)
        A_rows = full.adjacency  # the dense view, for comparison (small graph)
        sq_dense = square(full).A
        monkeypatch.setattr(sparse, "DENSE_LIMIT", 10)
        monkeypatch.setattr(influence, "DENSE_LIMIT", 10)
        g = build_graph(e, PROMPT, GraphTarget(kind="top", mass=0.5, max_logits=3), batch_size=8)
        with pytest.raises(TdbError, match="too many"):
            g.adjacency  # noqa: B018
        sq = square(g)
        with pytest.raises(TdbError, match="too many"):
            sq.A  # noqa: B018
        torch.testing.assert_close(sq.R, sq_dense[sq.row_nodes])
        # causal zeros are not stored: fewer entries than rows x columns
        assert g.stats["stored_edges"] == int((A_rows != 0).sum()) < A_rows.numel()
        assert g.completeness_residual() < 1e-4
        p = prune(sq, 0.8, 0.98)
        with pytest.raises(TdbError):
            p.edge_mask  # noqa: B018
        rep, comp = scores(sq)
        assert 0 < rep <= 1 and 0 < comp <= 1
        data = to_json(g, sq, p, scores=(rep, comp))
        assert validate(data) == [] and len(data["links"]) == int(p.edge_rows.sum())
        target = sq.N - sq.n_logit
        assert strongest_paths_k(sq, target, 3, p.edge_rows)
        assert strongest_paths(g, len(g.rows))
        feats = [int(c) for c in g.rows[:3]]
        direct, total = predict(g, feats, len(g.rows))
        monkeypatch.setattr(sparse, "DENSE_LIMIT", 1 << 30)
        assert direct == pytest.approx(-float(A_rows[len(g.rows), feats].sum()), abs=1e-5)


def test_memory_estimate_names_what_to_lower(tiny_engines):
    e = tiny_engines["gpt2"]
    with attached(e, random_transcoders(e)):
        with pytest.raises(TdbError, match="max_feature_nodes") as err:
            build_graph(e, PROMPT, GraphTarget(kind="logit", token="dog"), max_bytes=1000)
    assert "patterns" in str(err.value) and "batch" in str(err.value)


def test_memory_estimate_counts_the_pruning_matrix(tiny_engines):
    """Pruning's dense rows (influence.square) are in the estimate: three copies of exactly the
    matrix it builds, counted against the forward passes (they do not overlap)."""
    from tdb_agent.ops.graph.build import estimate_bytes, peak_bytes
    from tdb_agent.ops.graph.influence import square

    e = tiny_engines["gpt2"]
    with attached(e, random_transcoders(e)):
        g = build_graph(e, PROMPT, GraphTarget(kind="logit", token="dog"))
        R = square(g).R
        parts = estimate_bytes(e, g.src.n_pos, g.src.n_cols, len(g.rows) + len(g.logits), 8, g.src.n_feat)
    assert parts["pruning"] == 3 * R.numel() * R.element_size()
    assert peak_bytes(parts) == parts["patterns"] + parts["rows"] + max(parts["forward"], parts["pruning"])
