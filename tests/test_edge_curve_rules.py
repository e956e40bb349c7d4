"""The MIB rules of a faithfulness curve (ops/edges/selection.py), each against a hand
computation: the budgets' edge counts, the signed and |score| rankings, the cleaning of
dangling edges, the areas, and a node ranking's edge order."""

import random

import pytest
import torch

from tdb_agent.engine import Engine
from tdb_agent.engine.spec import ModelSpec
from tdb_agent.ops.edges.faithfulness import MIB_BUDGETS, EdgeEvaluator
from tdb_agent.ops.edges.graph import EdgeGraph
from tdb_agent.ops.edges.selection import budget_counts, mib_areas, node_order_keys, prune_dangling, support, \
    top_masks
from tdb_agent.tasks import task_examples
from tests.tiny_models import build_tiny


def _graph(L=2, H=2, KV=None):
    return EdgeGraph(ModelSpec(family="x", architecture="x", n_layers=L, n_heads=H, n_kv_heads=KV or H, d_model=8,
                               d_head=2, d_mlp=8, vocab_size=4, n_ctx=8, norm="layernorm", parallel_residual=False,
                               gated_mlp=False))


def _mask(g, *edges, positions=None):
    m = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.bool)
    for e in edges:
        m[g.parse_edge(e)] = True
    return m[None]


def _edges(g, mask):
    return {g.edge_name(u, r) for u, r in mask[0].nonzero().tolist()}


def test_areas_by_hand():
    # CPR: 0.4 · (0.2 + 0.8) / 2 + 0.5 · (0.8 + 1) / 2 = 0.2 + 0.45
    # CMD on |1 - f| = 0.2, 0.4, 0 at the points: 0.4 · 0.6 / 2 + 0.5 · 0.4 / 2 = 0.12 + 0.10
    cpr, cmd = mib_areas([0.1, 0.5, 1.0], [0.2, 0.8, 1.0], [1.2, 0.6, 1.0])
    assert cpr == pytest.approx(0.65) and cmd == pytest.approx(0.22)
    # f overshooting 1 raises CPR (not clipped) and counts in CMD like an undershoot
    assert mib_areas([0.5, 1.0], [1.5, 1.0], [1.5, 1.0]) == pytest.approx((0.625, 0.125))
    with pytest.raises(ValueError):
        mib_areas([1.0], [1.0], [1.0])


def test_budget_counts_floor_like_mib():
    assert budget_counts(32491, MIB_BUDGETS) == [32, 64, 162, 324, 649, 1624, 3249, 6498, 16245, 32491]
    assert budget_counts(10, [0.1, 0.3, 1.0]) == [1, 3, 10]


def test_signed_and_absolute_rankings():
    g = _graph()
    scores = torch.zeros(g.n_senders, g.n_receivers)
    helps, hurts, helps_less = (g.parse_edge(e) for e in ("L0.H0->LOGITS", "L0.H1->LOGITS", "EMB->L0.MLP"))
    # an EAP score is the metric's change when the edge is removed: negative = the edge helps
    scores[helps], scores[hurts], scores[helps_less] = -3.0, 5.0, -1.0
    top = lambda keys, c: _edges(g, top_masks(g, keys, [c]))
    assert top(scores.abs(), 1) == {"L0.H1->LOGITS"}
    assert top(support(scores, gap=2.0), 1) == {"L0.H0->LOGITS"}
    assert top(support(scores, gap=2.0), 2) == {"L0.H0->LOGITS", "EMB->L0.MLP"}
    assert top(support(scores, gap=-2.0), 1) == {"L0.H1->LOGITS"}  # a metric whose clean value is the lower
    # invalid (sender, receiver) pairs are never kept, even with every valid edge requested
    assert int(top_masks(g, support(scores, 1.0), [10 ** 6]).sum()) == g.n_edges


@pytest.mark.parametrize("kept, left", [
    (["EMB->L0.MLP", "L0.MLP->LOGITS"], ["EMB->L0.MLP", "L0.MLP->LOGITS"]),
    (["L0.H1->LOGITS"], []),  # nothing feeds L0.H1
    (["EMB->L0.H0.q", "L0.H0->L1.MLP"], []),  # L1.MLP feeds nothing kept
    # a cascade: L1.MLP goes, then L1.H0, then L0.H0
    (["EMB->L0.H0.q", "L0.H0->L1.H0.q", "L1.H0->L1.MLP", "EMB->L1.MLP"], []),
    (["EMB->L0.H0.k", "L0.H0->L1.H1.v", "L1.H1->LOGITS", "L0.H1->L1.H1.q"],
     ["EMB->L0.H0.k", "L0.H0->L1.H1.v", "L1.H1->LOGITS"]),
])
def test_prune_dangling_by_hand(kept, left):
    g = _graph()
    assert _edges(g, prune_dangling(g, _mask(g, *kept))) == set(left)


def test_prune_dangling_groups_and_positions():
    g = _graph(2, 4, KV=2)
    # L1.H1 reads key/value group 0 (heads 0 and 1): an edge into that key feeds it
    kept = _mask(g, "EMB->L1.KV0.k", "L1.H1->LOGITS")
    assert torch.equal(prune_dangling(g, kept), kept)
    # position-aware: a node counts as fed / read when it is at any position
    g = _graph()
    m = torch.zeros(1, 2, g.n_senders, g.n_receivers, dtype=torch.bool)
    m[0, 0][g.parse_edge("EMB->L0.MLP")] = True
    m[0, 1][g.parse_edge("L0.MLP->LOGITS")] = True
    m[0, 1][g.parse_edge("L0.H0->L1.MLP")] = True  # L1.MLP feeds nothing
    out = prune_dangling(g, m)
    assert int(out.sum()) == 2 and not out[0, 1][g.parse_edge("L0.H0->L1.MLP")]


def test_node_order_boundaries_are_the_edges_among_the_top_nodes():
    g = _graph(3, 3)
    nodes = [s for s in g.senders if s != "EMB"]
    order = random.Random(0).sample(nodes, len(nodes))
    keys = node_order_keys(g, order)
    for k in range(len(order) + 1):
        inside = set(order[:k]) | {"EMB", "LOGITS"}
        among = {g.edge_name(u, r) for u in range(g.n_senders) for r in range(g.n_receivers)
                 if g.valid[u, r] and g.senders[u] in inside and any(h in inside for h in g.receivers[r].heads)}
        assert _edges(g, top_masks(g, keys, [len(among)])) == among


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    eng = Engine.load(build_tiny("gpt2", tmp_path_factory.mktemp("gpt2"), seed=3))
    with torch.no_grad():
        for name, p in eng.model.named_parameters():
            if p.dim() == 2:
                p.mul_(5.0 if "wte" in name else 2.5)
    return eng


def test_dangling_edges_change_nothing_against_the_corrupted_prompts(gpt2):
    """A node that reads only reference values writes its reference value, so against the
    corrupted prompts cleaning a circuit leaves its metric as it was (exact edge patching)."""
    ev = EdgeEvaluator(gpt2, task_examples("ioi", 8, seed=1), "corrupted")
    g = ev.graph
    gen = torch.Generator().manual_seed(0)
    keeps = (torch.rand(8, g.n_senders, g.n_receivers, generator=gen) < torch.linspace(0.1, 0.6, 8)[:, None, None]) \
        & g.valid
    pruned = prune_dangling(g, keeps)
    assert (pruned.sum((1, 2)) < keeps.sum((1, 2))).all()  # every circuit had dangling edges
    before, after = ev.means(keeps), ev.means(pruned)
    assert (before - ev.m_empty).abs().max() > 1e-3  # the circuits move the metric
    assert torch.allclose(before, after, atol=1e-5, rtol=0)
