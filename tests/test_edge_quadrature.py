"""EAP-IG's quadrature (ops/edges/quadrature.py): the Gauss–Radau nodes integrate polynomials
exactly to their degree, and EAP-IG with them equals a hand-written integral (plain autograd
at the nodes' α, weighted) on the hand-written models of tests/edge_reference.py; as the
nodes grow in number, the Riemann sum and Gauss–Radau tend to the same scores."""

import numpy as np
import pytest
import torch

from evals.cost import count_passes
from tdb_agent.errors import TdbError
from tdb_agent.ops.edges.capture import mean_senders
from tdb_agent.ops.edges.eap import edge_scores
from tdb_agent.ops.edges.quadrature import nodes
from tests.edge_reference import RefModel
from tests.test_edges import _close, _pairs, _tensors, sharp  # noqa: F401 (the fixture)


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 20])
def test_radau_nodes_integrate_polynomials_to_degree_2m_minus_2(m):
    a, w = map(np.array, nodes("radau", m))
    assert a[-1] == 1.0 and np.all(np.diff(a) > 0) and a[0] > 0 and np.all(w > 0)
    # ∫_0^1 x^p dx = 1/(p + 1), exactly for p ≤ 2m − 2 (and not beyond: seen while it is above rounding)
    for p in range(2 * m - 1):
        assert abs((w * a ** p).sum() - 1 / (p + 1)) < 1e-12
    if m <= 5:
        assert abs((w * a ** (2 * m - 1)).sum() - 1 / (2 * m)) > 1e-6
    ra, rw = nodes("riemann", m)
    assert ra == [k / m for k in range(1, m + 1)] and rw == [1 / m] * m


def test_bad_quadrature_is_refused(sharp):
    with pytest.raises(TdbError, match="quadrature"):
        nodes("simpson", 3)
    with pytest.raises(TdbError, match="quadrature"):
        edge_scores(sharp["gpt2"], _pairs(2), method="eap-ig", steps=3, quadrature="simpson")


@pytest.mark.parametrize("fam", ["gpt2", "llama"])
def test_radau_over_inputs_equals_hand_written_integral(sharp, fam):
    eng = sharp[fam]
    pairs = _pairs(2)
    g = _tensors(eng, pairs)
    rule = nodes("radau", 4)
    with count_passes() as cost:
        res = edge_scores(eng, pairs, method="eap-ig", steps=4, quadrature="radau")
    ref = RefModel(eng.model).eap(g.ids, g.corrupted, g.target, g.distractor, ig_steps=4, nodes=rule)
    _close(res.scores, ref)
    # the same passes as the Riemann sum: the corrupted run, the 4 steps stacked in one pass
    assert (res.forward_passes, res.backward_passes) == (cost.forward_passes, cost.backward_passes) == (2, 1)
    apart = edge_scores(eng, pairs, method="eap-ig", steps=4, quadrature="radau", steps_per_pass=3)  # 3 + 1
    _close(apart.scores, ref)
    riemann = RefModel(eng.model).eap(g.ids, g.corrupted, g.target, g.distractor, ig_steps=4)
    assert (ref - riemann).abs().max() > 1e-3 * ref.abs().max()  # the rules differ at 4 nodes
    assert torch.equal(edge_scores(eng, pairs, method="eap-ig", steps=1, quadrature="radau").scores,
                       edge_scores(eng, pairs, method="eap").scores)  # one node: the clean run, EAP


@pytest.mark.parametrize("reference", ["corrupted", "mean"])
def test_radau_over_activations_equals_hand_written_integral(sharp, reference):
    eng = sharp["gpt2"]
    pairs = _pairs(2)
    g = _tensors(eng, pairs)
    res = edge_scores(eng, pairs, method="eap-ig", steps=3, reference=reference, ig="activations",
                      quadrature="radau")
    ref = RefModel(eng.model).ig_activations(g.ids, g.corrupted, g.target, g.distractor, 3,
                                             ref=mean_senders(eng, None) if reference == "mean" else None,
                                             nodes=nodes("radau", 3))
    _close(res.scores, ref)
    assert res.backward_passes == 1 + (1 + 2 * eng.spec.n_layers)  # as the Riemann sum's: a group's 2 steps a pass


@pytest.mark.parametrize("ig", ["inputs", "activations"])
def test_rules_converge_to_one_integral(sharp, ig):
    """Radau at 12 nodes is the integral to ~1e-6 here; the Riemann sum's error falls as 1/m
    (halved from 16 to 32 steps) towards the same scores, and Radau at 5 nodes is closer to
    them than the Riemann sum at 32."""
    eng = sharp["llama"]
    pairs = _pairs(2)

    def scores(rule, m):
        return edge_scores(eng, pairs, method="eap-ig", steps=m, quadrature=rule, ig=ig).scores

    limit = scores("radau", 12)
    err = {k: float((scores(*k) - limit).norm() / limit.norm()) for k in
           [("radau", 8), ("radau", 5), ("riemann", 16), ("riemann", 32)]}
    assert err[("radau", 8)] < 1e-4
    assert 0.4 < err[("riemann", 32)] / err[("riemann", 16)] < 0.6
    assert err[("radau", 5)] < err[("riemann", 32)]
