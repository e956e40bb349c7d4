"""Edge-level circuits (ops/edges): the graph, EAP / EAP-IG scores, exact edge patching and
faithfulness curves, each checked against an independent computation: a model re-written by
hand in plain PyTorch with a separate input per receiver (tests/edge_reference.py)."""

import weakref

import pytest
import torch
from transformers import AutoModelForCausalLM

from evals.cost import count_passes
from tdb_agent.engine import Engine
from tdb_agent.engine.spec import ModelSpec
from tdb_agent.errors import TdbError
from tdb_agent.ops.edges.capture import corrupted_senders, group_pairs, run_senders, sender_sites, senders_from, \
    shared_positions
from tdb_agent.ops.edges.eap import edge_scores
from tdb_agent.ops.edges.faithfulness import MIB_BUDGETS, evaluate_keeps, faithfulness_curve, keep_masks, \
    smallest_circuit
from tdb_agent.ops.edges.graph import EdgeGraph, count_edges
from tdb_agent.ops.edges.patch import patched_metrics
from tdb_agent.tasks import task_examples
from tests import edge_reference
from tests.edge_reference import RefModel
from tests.tiny_models import ALL_FAMILIES, build_tiny, sharpen


def _spec(L, H, KV=None, parallel=False):
    return ModelSpec(family="x", architecture="x", n_layers=L, n_heads=H, n_kv_heads=KV or H, d_model=8, d_head=2,
                     d_mlp=8, vocab_size=4, n_ctx=8, norm="layernorm", parallel_residual=parallel, gated_mlp=False)


def test_edge_count_gpt2_small_and_closed_form():
    assert count_edges(12, 12) == 32491
    assert EdgeGraph(_spec(12, 12)).n_edges == 32491
    for L, H, KV, par in [(2, 4, 2, False), (3, 8, 1, True), (4, 8, 8, False)]:
        g = EdgeGraph(_spec(L, H, KV, par))
        assert g.n_edges == count_edges(L, H, KV, par)
        assert len(g.receivers) == L * (H + 2 * KV + 1) + 1 and len(g.senders) == 1 + L * (H + 1)
    g = EdgeGraph(_spec(2, 4, 2))
    assert g.parse_edge("L0.H3->L1.KV1.k") == (4, g.receiver_index["L1.KV1.k"])
    with pytest.raises(TdbError, match="does not feed"):
        g.parse_edge("L1.H0->L0.MLP")
    with pytest.raises(TdbError, match="unknown edge"):
        g.parse_edge("L0.H9->LOGITS")


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    """Tiny GPT-2 and Llama (GQA) with weights scaled up, so edges have clearly non-zero effects."""
    out = {}
    for fam in ("gpt2", "llama"):
        eng = Engine.load(build_tiny(fam, tmp_path_factory.mktemp(fam), seed=3))
        sharpen(eng.model)
        out[fam] = eng
    return out


def _pairs(n=3, eng=None):
    """n IOI pairs of one token length (one batch)."""
    from tdb_agent.tasks.tokenizer import build_tokenizer
    tok = build_tokenizer()
    by_len = {}
    for p in task_examples("ioi", 40, seed=1):
        by_len.setdefault(len(tok(p.prompt)["input_ids"]), []).append(p)
    return max(by_len.values(), key=len)[:n]


def _tensors(eng, pairs):
    (g,), _ = group_pairs(eng, pairs, True)
    return g


def _close(ours, ref):
    scale = ref.abs().max()
    assert scale > 1e-3  # the comparison means something
    assert (ours - ref).abs().max() <= 1e-5 * max(1.0, float(scale))


@pytest.mark.parametrize("fam", ["gpt2", "llama"])
def test_eap_equals_autograd_on_separate_receiver_inputs(sharp, fam):
    eng = sharp[fam]
    pairs = _pairs()
    g = _tensors(eng, pairs)
    with count_passes() as cost:
        res = edge_scores(eng, pairs, method="eap")
    ref = RefModel(eng.model).eap(g.ids, g.corrupted, g.target, g.distractor)
    _close(res.scores, ref)
    # one corrupted forward, one clean forward and backward; these pairs share their first p
    # tokens, so the clean pass runs the positions after them only, continuing the corrupted
    # run's keys/values there (capture.Prefix)
    b, s = g.ids.shape
    p = shared_positions(g.ids, g.corrupted)
    assert 0 < p < s - 1
    assert (res.forward_passes, res.backward_passes) == (cost.forward_passes, cost.backward_passes) == (2, 1)
    assert cost.forward_tokens == b * s + b * (s - p)
    with count_passes() as whole:  # without the reuse: every position in both
        alone = edge_scores(eng, pairs, method="eap", reuse_prefix=False)
    _close(alone.scores, ref)
    assert (alone.forward_passes, whole.forward_passes, whole.backward_passes) == (2, 2, 1)
    assert whole.forward_tokens == 2 * b * s
    # each head's q, k and v inputs are receivers of their own: their scores differ
    gr = res.graph
    q, k, v = (gr.receiver_index[n] for n in ("L1.H0.q", "L1.H0.k" if fam == "gpt2" else "L1.KV0.k",
                                               "L1.H0.v" if fam == "gpt2" else "L1.KV0.v"))
    col = res.scores[:, [q, k, v]]
    assert (col[:, 0] - col[:, 1]).abs().max() > 1e-7 and (col[:, 1] - col[:, 2]).abs().max() > 1e-7


@pytest.mark.parametrize("fam", ["gpt2", "llama"])
def test_eap_ig_equals_reference_integrated_gradients(sharp, fam):
    eng = sharp[fam]
    pairs = _pairs(2)
    g = _tensors(eng, pairs)
    with count_passes() as cost:
        res = edge_scores(eng, pairs, method="eap-ig", steps=3)
    ref = RefModel(eng.model).eap(g.ids, g.corrupted, g.target, g.distractor, ig_steps=3)
    _close(res.scores, ref)
    # the corrupted run, then the 3 steps stacked in the batch of one forward and one backward
    # over the positions after the shared prefix
    b, s = g.ids.shape
    p = shared_positions(g.ids, g.corrupted)
    assert (res.forward_passes, res.backward_passes) == (cost.forward_passes, cost.backward_passes) == (2, 1)
    assert cost.forward_rows == 2 + 3 * 2 and cost.forward_tokens == b * s + 3 * b * (s - p)
    with count_passes() as cost:  # one step per pass: the same numbers
        apart = edge_scores(eng, pairs, method="eap-ig", steps=3, steps_per_pass=2)
    assert (apart.forward_passes, apart.backward_passes) == (cost.forward_passes, cost.backward_passes) == (3, 2)
    # (to float32 rounding: the continued passes' attention over the prefix's keys, a masked
    # kernel, rounds by batch size; on this sharpened model that moves scores by up to 8e-6 of
    # the largest, and both are within 3e-6 of a float64 computation)
    assert torch.allclose(apart.scores, res.scores, atol=2e-5 * float(ref.abs().max()))
    one = edge_scores(eng, pairs, method="eap-ig", steps=1)  # one step at the clean input is EAP
    assert torch.allclose(one.scores, edge_scores(eng, pairs, method="eap").scores, atol=1e-7)


def test_frozen_norm_scores_equal_reference_with_detached_scales(sharp):
    eng = sharp["llama"]
    pairs = _pairs(2)
    g = _tensors(eng, pairs)
    res = edge_scores(eng, pairs, method="eap", norm="frozen")
    edge_reference.FROZEN["on"] = True
    try:
        ref = RefModel(eng.model).eap(g.ids, g.corrupted, g.target, g.distractor)
    finally:
        edge_reference.FROZEN["on"] = False
    _close(res.scores, ref)
    assert not torch.allclose(res.scores, edge_scores(eng, pairs, method="eap").scores)


def test_per_position_scores_sum_to_summed_scores(sharp):
    eng = sharp["gpt2"]
    pairs = _pairs(2)
    pos = edge_scores(eng, pairs, per_position=True)
    assert pos.scores.shape[0] == eng.to_tokens(pairs[0].prompt).shape[1]
    assert torch.allclose(pos.scores.sum(0), edge_scores(eng, pairs).scores, atol=1e-7)
    top = pos.ranked(3)
    assert "@" in top[0][0] and abs(top[0][1]) >= abs(top[-1][1])
    # the positions the pairs share: no pass after the corrupted run covers them, their scores are 0
    g = _tensors(eng, pairs)
    p = shared_positions(g.ids, g.corrupted)
    assert p > 0 and pos.scores[:p].abs().max() == 0
    whole = edge_scores(eng, pairs, per_position=True, reuse_prefix=False)  # every position run
    scale = float(whole.scores.abs().max())
    assert whole.scores[:p].abs().max() <= 1e-5 * scale  # there, only rounding: the same values in both runs
    assert torch.allclose(pos.scores, whole.scores, atol=2e-5 * scale)


@pytest.mark.parametrize("method", ["eap", "eap-ig"])
def test_scores_built_a_few_positions_at_a_time_are_the_same(sharp, monkeypatch, method):
    """contract.py builds D and G a chunk of positions at a time (one chunk on these tiny
    models) and takes the receivers of a group of blocks per product (every block here):
    chunks of one or two positions, one block per product (logits alone) and weights made
    again at each use give the reference model's scores too."""
    from tdb_agent.ops.edges import contract, grads
    eng = sharp["llama"]
    pairs = _pairs(2)
    g = _tensors(eng, pairs)
    whole = edge_scores(eng, pairs, method=method, steps=3)
    pos_whole = edge_scores(eng, pairs, method=method, steps=3, per_position=True)
    for n_pos in (1, 2):
        monkeypatch.setattr(contract, "CHUNK_BYTES", n_pos * eng.spec.d_model * 4 * 2 * EdgeGraph(eng.spec).n_senders)
        if n_pos == 1:
            monkeypatch.setattr(contract, "GROUP_RECEIVERS", 1)
            monkeypatch.setattr(grads.BlockWeights, "KEEP_BYTES", 0)
            monkeypatch.setattr(grads, "_BY_ENGINE", weakref.WeakKeyDictionary())  # none kept from before
            assert len(contract.receiver_groups(EdgeGraph(eng.spec))) == eng.spec.n_layers + 1
        res = edge_scores(eng, pairs, method=method, steps=3)
        ref = RefModel(eng.model).eap(g.ids, g.corrupted, g.target, g.distractor,
                                      ig_steps=3 if method == "eap-ig" else 0)
        _close(res.scores, ref)
        assert torch.allclose(res.scores, whole.scores, atol=1e-6 * float(ref.abs().max()))
        pos = edge_scores(eng, pairs, method=method, steps=3, per_position=True)
        assert torch.allclose(pos.scores, pos_whole.scores, atol=1e-6 * float(ref.abs().max()))


@pytest.mark.parametrize("method", ["eap", "eap-ig"])
def test_mean_reference_scores_equal_reference_model(sharp, method):
    """reference="mean": senders' corpus means (and, for EAP-IG, the mean token embedding as
    the path's start) instead of the corrupted prompt, against the hand-written model."""
    from tdb_agent.ops.edges.capture import mean_embedding, mean_senders
    eng = sharp["llama"]
    pairs = _pairs(2)
    g = _tensors(eng, pairs)
    res = edge_scores(eng, pairs, method=method, steps=3, reference="mean", ig="inputs")
    ref = RefModel(eng.model).eap(g.ids, g.corrupted, g.target, g.distractor, ig_steps=3 if method == "eap-ig" else 0,
                                  ref=mean_senders(eng, None), ref_embed=mean_embedding(eng, None))
    _close(res.scores, ref)


@pytest.mark.parametrize("fam,reference", [("gpt2", "corrupted"), ("llama", "corrupted"), ("gpt2", "mean")])
def test_eap_ig_over_activations_equals_reference_integrated_gradients(sharp, fam, reference):
    """ig="activations": each sender group's output interpolated (the rest recomputed), against
    the hand-written model with that group's outputs overridden and autograd at every receiver."""
    from tdb_agent.ops.edges.capture import mean_senders
    eng = sharp[fam]
    pairs = _pairs(2)
    g = _tensors(eng, pairs)
    res = edge_scores(eng, pairs, method="eap-ig", steps=3, reference=reference, ig="activations")
    ref = RefModel(eng.model).ig_activations(g.ids, g.corrupted, g.target, g.distractor, 3,
                                             ref=mean_senders(eng, None) if reference == "mean" else None)
    _close(res.scores, ref)
    # the clean pass, then each group's 2 steps off α = 1 stacked in one pass (2 pairs × 2 steps ≤ 16 rows)
    groups = 1 + 2 * eng.spec.n_layers
    assert res.ig == "activations" and res.backward_passes == 1 + groups
    assert res.forward_passes == res.backward_passes + (reference == "corrupted")
    apart = edge_scores(eng, pairs, method="eap-ig", steps=3, reference=reference, ig="activations", steps_per_pass=1)
    assert apart.backward_passes == 1 + groups * 2  # one step a pass: the same scores
    _close(apart.scores, ref)
    assert torch.allclose(apart.scores, res.scores, atol=1e-6 * float(ref.abs().max()))
    # inputs and activations differ (the mean path), and EAP-IG over the mean defaults to activations
    other = edge_scores(eng, pairs, method="eap-ig", steps=3, reference=reference, ig="inputs").scores
    assert (res.scores - other).abs().max() > 1e-3 * res.scores.abs().max()
    if reference == "mean":
        assert edge_scores(eng, pairs, method="eap-ig", steps=3, reference="mean").ig == "activations"


def test_eap_ig_over_activations_a_few_positions_at_a_time(sharp, monkeypatch):
    """Each sender group is contracted with its receivers' head-space gradients a chunk of
    positions at a time: chunks of one or two positions give the reference model's scores."""
    from tdb_agent.ops.edges import contract
    eng = sharp["gpt2"]
    pairs = _pairs(2)
    g = _tensors(eng, pairs)
    ref = RefModel(eng.model).ig_activations(g.ids, g.corrupted, g.target, g.distractor, 3)
    for n_pos in (1, 2):
        rows = EdgeGraph(eng.spec).layer_receivers(0).stop - EdgeGraph(eng.spec).layer_receivers(0).start
        monkeypatch.setattr(contract, "CHUNK_BYTES", n_pos * eng.spec.d_model * 4 * 2 * (rows + eng.spec.n_heads))
        _close(edge_scores(eng, pairs, method="eap-ig", steps=3, ig="activations").scores, ref)


def test_eap_ig_over_activations_is_complete_per_group(sharp):
    """Completeness: a group's scores summed over all its edges tend to the exact effect of
    setting the group's outputs to their reference (patching every edge out of it), computed
    by the hand-written model."""
    from tdb_agent.ops.edges.ig_activations import sender_groups
    eng = sharp["gpt2"]
    pairs = _pairs(2)
    g = _tensors(eng, pairs)
    res = edge_scores(eng, pairs, method="eap-ig", steps=32, ig="activations")
    ref_model = RefModel(eng.model)
    m_clean, _ = ref_model.run(g.ids, g.target, g.distractor)
    corr = ref_model.run(g.corrupted, g.target, g.distractor)[1]
    exact = []
    for _, us in sender_groups(eng):
        with torch.no_grad():
            m_patched, _ = ref_model.run(g.ids, g.target, g.distractor, override={u: corr[:, :, u] for u in us})
        exact.append(float((m_patched - m_clean).mean()))
        total = float(res.scores[us].sum())
        assert abs(total - exact[-1]) <= 0.01 * abs(exact[-1]) + 1e-6, (us, total, exact[-1])
    assert max(abs(e) for e in exact) > 1e-2


def test_mean_reference_scores_use_corpus_means(sharp):
    eng = sharp["gpt2"]
    pairs = [p.model_copy(update={"corrupted_prompt": None}) for p in _pairs(2)]
    res = edge_scores(eng, pairs, reference="mean", method="eap-ig", steps=2)
    assert res.reference == "mean" and res.scores.abs().max() > 0
    with pytest.raises(TdbError, match="corrupted_prompt"):
        edge_scores(eng, pairs, reference="corrupted")


@pytest.mark.parametrize("fam", ["gpt2", "llama"])
def test_edge_patching_equals_brute_force(sharp, fam):
    eng = sharp[fam]
    pairs = _pairs(2)
    g = _tensors(eng, pairs)
    graph = EdgeGraph(eng.spec)
    ref_vals = run_senders(eng, g.corrupted)
    R = RefModel(eng.model)
    gen = torch.Generator().manual_seed(1)
    keeps = torch.rand(5, graph.n_senders, graph.n_receivers, generator=gen) < 0.5
    keeps[0], keeps[1] = True, False
    # one edge removed at a time: an edge into a head's k, one into an MLP, one into the logits
    singles = [graph.parse_edge(e) for e in ("EMB->L1.H0.k" if fam == "gpt2" else "EMB->L1.KV1.k",
                                             "L0.H2->L1.MLP", "L1.MLP->LOGITS")]
    for s, r in singles:
        k = torch.ones(1, graph.n_senders, graph.n_receivers, dtype=torch.bool)
        k[0, s, r] = False
        keeps = torch.cat([keeps, k])
    ours, passes = patched_metrics(eng, graph, g, ref_vals, keeps, batch_size=4)
    assert passes == -(-keeps.shape[0] * 2 // 4)
    with torch.no_grad():
        clean, _ = R.run(g.ids, g.target, g.distractor)
        corr, refR = R.run(g.corrupted, g.target, g.distractor)
        assert torch.allclose(ours[0], clean, atol=1e-5) and torch.allclose(ours[1], corr, atol=1e-5)
        assert (clean - corr).abs().max() > 1e-2
        for i in range(2, keeps.shape[0]):
            removed = {(u, r) for u, r in zip(*torch.nonzero(graph.valid & ~keeps[i], as_tuple=True))}
            removed = {(int(u), int(r)) for u, r in removed}
            want, _ = R.run(g.ids, g.target, g.distractor, ref=refR, removed=removed)
            assert torch.allclose(ours[i], want, atol=1e-5), (i, ours[i], want)
    # the single-edge removals moved the metric (so the check above is not vacuous)
    assert (ours[-3:] - clean).abs().max() > 1e-5


def _check_ends(eng, pairs, atol):
    """Keeping every edge is the engine's clean run, keeping none its corrupted run."""
    g = _tensors(eng, pairs)
    graph = EdgeGraph(eng.spec)
    keeps = torch.zeros(2, graph.n_senders, graph.n_receivers, dtype=torch.bool)
    keeps[0] = True
    ours, _ = patched_metrics(eng, graph, g, run_senders(eng, g.corrupted), keeps)
    with torch.no_grad():
        for row, ids in ((0, g.ids), (1, g.corrupted)):
            logits = eng.forward(ids).logits[:, -1]
            want = logits.gather(1, g.target[:, None])[:, 0] - logits.gather(1, g.distractor[:, None])[:, 0]
            assert torch.allclose(ours[row], want, atol=atol), (row, ours[row], want)


@pytest.mark.parametrize("fam", ALL_FAMILIES)
def test_keep_none_is_the_reference_run_on_every_family(tiny_engines, fam):
    _check_ends(tiny_engines[fam], _pairs(2), 1e-5)


def test_position_aware_mask_matches_summed_mask(sharp):
    eng = sharp["gpt2"]
    pairs = _pairs(2)
    g = _tensors(eng, pairs)
    graph = EdgeGraph(eng.spec)
    gen = torch.Generator().manual_seed(2)
    keep = torch.rand(1, graph.n_senders, graph.n_receivers, generator=gen) < 0.5
    s = g.ids.shape[1]
    ref = run_senders(eng, g.corrupted)
    a, _ = patched_metrics(eng, graph, g, ref, keep)
    b, _ = patched_metrics(eng, graph, g, ref, keep[:, None].expand(1, s, -1, -1).clone())
    assert torch.allclose(a, b, atol=1e-6)
    late = keep[:, None].expand(1, s, -1, -1).clone()
    late[:, -1] = True  # the last position keeps every edge: a different circuit
    c, _ = patched_metrics(eng, graph, g, ref, late)
    assert not torch.allclose(a, c)
    # continuing the pairs' shared prefix (capture.Prefix): random edge sets per position, those
    # at the prefix's positions included (there they change nothing), as the whole runs give
    p = shared_positions(g.ids, g.corrupted)
    after, prefix = corrupted_senders(eng, g.corrupted, p)
    sets = torch.rand(3, s, graph.n_senders, graph.n_receivers, generator=gen) < 0.5
    whole, _ = patched_metrics(eng, graph, g, ref, sets)
    cont, _ = patched_metrics(eng, graph, g, after, sets, prefix=prefix)
    assert p > 0 and torch.allclose(cont, whole, atol=1e-5)
    assert (whole - whole[:1]).abs().max() > 1e-3  # the sets differ


def test_faithfulness_curve_endpoints_and_areas(sharp):
    eng = sharp["llama"]
    pairs = _pairs(3)
    scores = edge_scores(eng, pairs).scores
    curve = faithfulness_curve(eng, pairs, scores)
    assert [p.budget for p in curve.points] == list(MIB_BUDGETS) == [p.budget for p in curve.signed_points]
    for pts in (curve.points, curve.signed_points):
        assert pts[-1].faithfulness == pytest.approx(1.0, abs=1e-6)
        assert pts[-1].n_edges == EdgeGraph(eng.spec).n_edges
    # MIB: trapezoids over the budgets alone; CPR on the signed ranking's curve, CMD on |score|'s
    xs = [p.budget for p in curve.points]
    ys = [p.faithfulness for p in curve.signed_points]
    dev = [abs(1 - p.faithfulness) for p in curve.points]
    assert curve.cpr == pytest.approx(sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(xs) - 1)))
    assert curve.cmd == pytest.approx(sum((xs[i + 1] - xs[i]) * (dev[i] + dev[i + 1]) / 2 for i in range(len(xs) - 1)))
    # f(0 edges) = 0 and f(all) = 1 by construction of evaluate_keeps
    graph = EdgeGraph(eng.spec)
    keeps = keep_masks(graph, scores, [0, graph.n_edges])
    ms, full, empty, _, _ = evaluate_keeps(eng, pairs, keeps)
    assert float(ms[0]) == pytest.approx(float(empty), abs=1e-6) and float(ms[1]) == pytest.approx(float(full), abs=1e-6)


def test_smallest_circuit_reaches_threshold_and_one_fewer_does_not(sharp):
    eng = sharp["gpt2"]
    pairs = _pairs(3)
    scores = edge_scores(eng, pairs).scores
    n, f, _ = smallest_circuit(eng, pairs, scores, threshold=0.8)
    graph = EdgeGraph(eng.spec)
    ms, full, empty, _, _ = evaluate_keeps(eng, pairs, keep_masks(graph, scores, [n - 1, n]))
    faith = [(float(m) - float(empty)) / (float(full) - float(empty)) for m in ms]
    # The two searches batch their rows differently, so patching sums in another order: the
    # metric (~0.62) agrees to float32 rounding, ~4e-8, which is ~1e-5 of the 0.005 gap here.
    assert faith[1] == pytest.approx(f, abs=1e-4) and f >= 0.8
    assert faith[0] < 0.8


@pytest.mark.parametrize("fam", ALL_FAMILIES)
def test_eap_is_the_derivative_of_exact_edge_patching_on_every_family(tiny_engines, fam):
    """Independent of the gradient code: moving one edge's sender a fraction ε of the way to its
    reference (exact patching with a fractional mask) changes the metric by ε · EAP score."""
    from tdb_agent.ops.edges.patch import patched_rows
    eng = tiny_engines[fam]
    pairs = _pairs(1)
    g = _tensors(eng, pairs)
    graph = EdgeGraph(eng.spec)
    res = edge_scores(eng, pairs, method="eap")
    ref = run_senders(eng, g.corrupted)

    def slope(s, r, eps):  # central difference
        one = torch.zeros(1, graph.n_senders, graph.n_receivers)
        one[0, s, r] = eps
        up, down = (patched_rows(eng, graph, g.ids, ref, sign * one, g.target, g.distractor)
                    for sign in (1.0, -1.0))
        return float((up - down)[0]) / (2 * eps)
    for name, score in res.ranked(6):
        s, r = graph.parse_edge(name)
        fd = (4 * slope(s, r, 0.05) - slope(s, r, 0.1)) / 3  # Richardson: the ε² term cancels
        assert fd == pytest.approx(score, rel=5e-3, abs=1e-2 * abs(res.ranked(1)[0][1])), (fam, name)


def test_post_norm_with_an_attention_output_bias_is_refused(tmp_path):
    """Through a post-norm, the bias's share of the block's write scales with the norm from run
    to run: the heads' edges would not add up, so the edge methods refuse it by name."""
    eng = Engine.load(build_tiny("gemma2", tmp_path, overrides={"attention_bias": True}))
    with pytest.raises(TdbError, match="attention output bias before its post-norm"):
        edge_scores(eng, _pairs(1))


@pytest.mark.parametrize("fam", ["gpt2", "llama", "gemma", "falcon:new", "gptj", "cohere", "opt"])
@pytest.mark.parametrize("norm", ["unfrozen", "frozen"])
def test_autograd_head_grads_equal_the_closed_form(tiny_engines, monkeypatch, fam, norm):
    """The vector-Jacobian product of heads.head_read (used where the closed form does not
    apply: q/k norms, no input norm) equals grads.py's closed form (with the rotary's transpose,
    halves or interleaved, and OPT's q scale) where both apply, norms live or frozen."""
    from tdb_agent.ops.edges import grads
    eng = tiny_engines[fam]
    pairs = _pairs(2)
    closed = edge_scores(eng, pairs, norm=norm).scores
    monkeypatch.setattr(grads, "closed_form", lambda engine: False)
    auto = edge_scores(eng, pairs, norm=norm).scores
    assert closed.abs().max() > 1e-5
    assert (closed - auto).abs().max() <= 1e-5 * float(closed.abs().max())


def test_post_norm_mean_senders_are_per_token_writes(tiny_engines):
    """Under a post-norm the heads' mean senders are means of their per-token writes: summed over
    a layer's heads they give the mean of what attention writes (hook_attn_out), which a plain
    mean of z through W_O would not."""
    from tdb_agent.ops.edges.capture import mean_senders
    from tdb_agent.ops.runs import reference_means
    eng = tiny_engines["gemma2"]
    H = eng.spec.n_heads
    means = mean_senders(eng, None)
    want = reference_means(eng, ["blocks.0.hook_attn_out", "blocks.1.hook_attn_out"])
    for l in range(2):
        got = means[1 + l * (H + 1):1 + l * (H + 1) + H].sum(0)
        assert torch.allclose(got, want[f"blocks.{l}.hook_attn_out"], atol=1e-5)


@pytest.mark.parametrize("fam", ["olmo2", "qwen3", "gptj"])
def test_half_precision_edges_on_the_per_family_reads(tmp_path, fam):
    """bf16 blocks with a float32 stream (engine/precision.py) through heads.head_read and
    OLMo-2's raw MLP read: keep-all / keep-none are the bf16 runs, and EAP is the bf16 model's
    own sender differences (reference − clean) times float32 autograd gradients at each
    receiver's own input (tests/edge_hooks.py on the plain model, same weights).

    Not compared with the float32 model's scores: its sender differences are another model's.
    A sender whose output changes by ~1 % between the prompts (tiny GPT-J's last MLP, after
    the swapped name) has that difference rounded at 2^-9 of the output itself, so the two
    models' differences part by 1-21 % of the largest score over seeds 0-9, where the bf16 and
    float32 gradients part by < 3 % (bf16 backward; the measured floor). A wrong read is far
    outside: the norm's x̂ term dropped from the receivers' gradients puts Qwen3 10-50 % and
    GPT-J 5-37 % off (seeds 0-3); an upcast dropped from the contraction's senders raises."""
    d = build_tiny(fam, tmp_path / fam, seed=3, dtype=torch.bfloat16)
    e16 = Engine.load(d, dtype="bfloat16")
    plain = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in [*e16.model.parameters(), *plain.parameters()]:
            if p.dim() == 2:
                p.mul_(2.0)
    pairs = _pairs(2)
    _check_ends(e16, pairs, 2e-2)
    got = edge_scores(e16, pairs).scores
    assert got.dtype == torch.float32
    want = _bf16_senders_times_float32_grads(e16, plain, _tensors(e16, pairs))
    assert want.abs().max() > 1e-3
    assert (got - want).abs().max() <= 0.05 * want.abs().max(), float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("fam", ["llama", "qwen3", "gptj", "olmo2", "gemma2"])
def test_half_precision_sender_differences_are_float32(tmp_path, fam, monkeypatch):
    """In a bf16 model EAP and EAP-IG over activations at one node (α = 1: the same formula,
    (reference − clean sender) · gradient at the clean run) take their sender differences in
    float32 from the bf16 activations, by two code paths (SenderActs' difference of z or of
    post-norm writes; ig_activations' group difference): they agree to float32 rounding. Taken
    in bf16 (as before) they parted by 0.1-1.3 % of the largest score. The last MLP runs whole
    in both (its one-position run rounds its bf16 output differently, a property of bf16)."""
    from contextlib import nullcontext

    from tdb_agent.ops.edges import capture
    monkeypatch.setattr(capture, "last_mlp_tail_only", lambda engine: nullcontext())
    e16 = Engine.load(build_tiny(fam, tmp_path / fam, seed=3, dtype=torch.bfloat16), dtype="bfloat16")
    with torch.no_grad():
        for p in e16.model.parameters():
            if p.dim() == 2:
                p.mul_(2.0)
    pairs = _pairs(2)
    eap = edge_scores(e16, pairs, reuse_prefix=False).scores  # the same runs as the other path's
    ig1 = edge_scores(e16, pairs, method="eap-ig", steps=1, ig="activations").scores
    assert eap.abs().max() > 1e-3
    assert (eap - ig1).abs().max() <= 1e-5 * eap.abs().max(), float((eap - ig1).abs().max() / eap.abs().max())


def _bf16_senders_times_float32_grads(e16, plain, g):
    """[U, R]: Σ (corrupted − clean sender of the bf16 engine, z upcast before W_O) · (float32
    autograd gradient at the receiver's own input), averaged over rows, on the graph's edges."""
    from tests.edge_hooks import HookedEdges

    def senders(ids):
        with torch.no_grad():
            _, acts = e16.run_with_cache(ids, sender_sites(e16), logit_positions=[-1], logit_ids=[0])
        return senders_from(e16, {k: v.float() for k, v in acts.items()})
    D = senders(g.corrupted) - senders(g.ids)
    G, _ = HookedEdges(plain).receiver_grads(g.ids, g.target, g.distractor)
    return torch.einsum("bsud,rbsd->ur", D, torch.stack(G)) / g.ids.shape[0] * EdgeGraph(e16.spec).valid


@pytest.mark.parametrize("method", ["eap", "eap-ig"])
def test_a_pair_whose_prompts_are_the_same_scores_zero(sharp, method):
    """A corrupted prompt equal to the prompt shares every position: the passes run the last
    one alone (shared_positions keeps it), every difference there is 0 but for rounding (the
    corrupted run's last position is computed whole, the clean one continuing the prefix), so
    is every score; the pair beside it in a batch scores as it does alone (their shared prefix
    is then its own)."""
    eng = sharp["gpt2"]
    p0, p1 = _pairs(2)
    same = p0.model_copy(update={"corrupted_prompt": p0.prompt})
    g = _tensors(eng, [same])
    assert shared_positions(g.ids, g.corrupted) == g.ids.shape[1] - 1
    alone = edge_scores(eng, [p1], method=method, steps=2).scores
    scale = float(alone.abs().max())
    # (measured 2.6e-5 of the other pair's largest score on this sharpened model: rounding only)
    assert scale > 1e-3 and edge_scores(eng, [same], method=method, steps=2).scores.abs().max() <= 1e-4 * scale
    both = edge_scores(eng, [same, p1], method=method, steps=2).scores  # the mean over the two pairs
    assert torch.allclose(2 * both, alone, atol=2e-5 * scale)
