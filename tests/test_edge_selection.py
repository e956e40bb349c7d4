"""Choosing an edge circuit from a ranking (ops/edges/faithfulness.py: close_ties,
prune_unneeded) on the constructed models, whose true edges are known, each circuit's
faithfulness re-computed by brute-force edge patching in the hand-written model
(tests/edge_reference.py), not by patch.py."""

import pytest
import torch

from evals import constructed
from tdb_agent.engine import Engine
from tdb_agent.ops.edges.capture import group_pairs
from tdb_agent.ops.edges.eap import edge_scores
from tdb_agent.ops.edges.faithfulness import EdgeEvaluator, close_ties, keep_masks, prune_unneeded, \
    smallest_circuit
from tests.edge_reference import RefModel


def _brute_mean(engine, pairs, keep: torch.Tensor) -> float:
    """Mean metric with only `keep` [U, R] edges kept, every other receiver reading the
    corrupted run's sender value: the hand-written model, per length group."""
    ref = RefModel(engine.model)
    groups, _ = group_pairs(engine, pairs, True)
    total = 0.0
    valid = torch.ones_like(keep)
    for r, (kind, l, _) in enumerate(ref.receivers()):
        valid[ref.n_up(kind, l):, r] = False
    removed = {tuple(e) for e in (valid & ~keep).nonzero().tolist()}
    with torch.no_grad():
        for g in groups:
            corr = ref.run(g.corrupted, g.target, g.distractor)[1]
            m, _ = ref.run(g.ids, g.target, g.distractor, ref=corr, removed=removed)
            total += float(m.sum())
    return total / len(pairs)


def _pairs_of(g, keep):
    out = set()
    for u, r in keep.nonzero().tolist():
        if g.senders[u] != "EMB":
            out |= {(g.senders[u], node) for node in g.receivers[r].heads}
    return out


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("constructed")
    out = {}
    for name in ("names", "induction_backup"):
        c = constructed.build_case(name, root)
        out[name] = (c, Engine.load(c.model_dir, device="cpu"), constructed.case_pairs(name, 8, seed=1))
    return out


def test_pruning_drops_only_edges_that_do_nothing(cases):
    """names: EAP-IG ranks three edges that do nothing (L0.H2->L2.H3.k, L1.MLP->L2.H3.k,
    L0.H2->L1.MLP) above one the name mover needs (EMB->L2.H3.k: its key reads the token),
    so the smallest prefix reaching 0.8 carries them; pruning removes exactly the unneeded
    ones, and the result is the true circuit, at the faithfulness brute force gives."""
    case, eng, pairs = cases["names"]
    s = edge_scores(eng, pairs, method="eap-ig", steps=5)
    ev = EdgeEvaluator(eng, pairs, "corrupted")
    g = s.graph
    n, _, _ = smallest_circuit(eng, pairs, s.scores, 0.8, evaluator=ev)
    keep = keep_masks(g, s.scores, [close_ties(g, s.scores, n)])[0]
    assert _pairs_of(g, keep) > set(case.edges)  # the prefix has extra edges
    pruned, f, dropped = prune_unneeded(ev, keep)
    assert dropped > 0 and _pairs_of(g, pruned) == set(case.edges)
    m_full, m_empty = _brute_mean(eng, pairs, torch.ones_like(keep)), _brute_mean(eng, pairs, torch.zeros_like(keep))
    assert abs(ev.m_full - m_full) < 1e-4 and abs(ev.m_empty - m_empty) < 1e-4
    f_brute = (_brute_mean(eng, pairs, pruned) - m_empty) / (m_full - m_empty)
    assert abs(f - f_brute) < 1e-4 and f_brute >= 0.8
    # every dropped edge, put back alone, changes nothing (brute force)
    for u, r in (keep & ~pruned).nonzero().tolist()[:3]:
        back = pruned.clone()
        back[u, r] = True
        assert abs((_brute_mean(eng, pairs, back) - m_empty) / (m_full - m_empty) - f_brute) < 0.05


def test_tied_backups_are_kept_together(cases):
    """induction_backup: two identical previous-token heads score exactly alike; the tie is
    taken whole, and pruning keeps both (each alone is unneeded, together they are not)."""
    case, eng, pairs = cases["induction_backup"]
    s = edge_scores(eng, pairs, method="eap-ig", steps=5)
    ev = EdgeEvaluator(eng, pairs, "corrupted")
    g = s.graph
    n, _, _ = smallest_circuit(eng, pairs, s.scores, 0.8, evaluator=ev)
    n2 = close_ties(g, s.scores, n)
    assert n2 >= n
    keep = keep_masks(g, s.scores, [n2])[0]
    pruned, f, _ = prune_unneeded(ev, keep)
    assert _pairs_of(g, pruned) == set(case.edges) and f >= 0.8
    both = [g.parse_edge(e) for e in ("L0.H0->L1.H1.k", "L0.H3->L1.H1.k")]
    for u, r in both:
        assert pruned[u, r]
    gone = pruned.clone()
    for u, r in both:
        gone[u, r] = False
    (f_gone,) = ev.faithfulness(gone.unsqueeze(0))
    assert f_gone < 0.5
