"""What edge_scores keeps between calls (each engine's folded weights, the graph of a shape)
and what its passes skip (the last MLP away from the metric's position): the scores stay
those of an independent computation, and of the passes run in full."""

from contextlib import nullcontext

import pytest
import torch

from tdb_agent.engine import Engine
from tdb_agent.ops.edges import capture
from tdb_agent.ops.edges.capture import group_pairs, reference_run
from tdb_agent.ops.edges.eap import edge_scores
from tdb_agent.ops.edges.grads import block_weights
from tdb_agent.ops.edges.graph import edge_graph
from tests.edge_reference import RefModel
from tests.test_edges import _pairs
from tests.tiny_models import build_tiny, sharpen


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    """Tiny GPT-2, Llama (GQA) and sequential Falcon with weights scaled up (clearly non-zero edges)."""
    out = {}
    for fam in ("gpt2", "llama", "falcon:sequential"):
        eng = Engine.load(build_tiny(fam, tmp_path_factory.mktemp(fam.replace(":", "_")), seed=3))
        sharpen(eng.model)
        out[fam] = eng
    return out


@pytest.mark.parametrize("fam", ["gpt2", "llama", "falcon:sequential"])
@pytest.mark.parametrize("method", ["eap", "eap-ig"])
@pytest.mark.parametrize("per_position", [False, True])
def test_last_mlp_at_the_metric_position_only_gives_the_full_passes_scores(sharp, monkeypatch, fam, method,
                                                                          per_position):
    eng = sharp[fam]
    pairs = _pairs(2)
    ours = edge_scores(eng, pairs, method=method, steps=3, per_position=per_position)
    monkeypatch.setattr(capture, "last_mlp_tail_only", lambda engine: nullcontext())
    full = edge_scores(eng, pairs, method=method, steps=3, per_position=per_position)
    scale = float(full.scores.abs().max())
    assert scale > 1e-3
    assert (ours.scores - full.scores).abs().max() <= 1e-5 * scale
    last_mlp = full.graph.sender_index[f"L{eng.spec.n_layers - 1}.MLP"]
    logits = full.graph.receiver_index["LOGITS"]
    assert abs(float(full.summed()[last_mlp, logits])) > 1e-4 * scale  # the edge the skipped rows feed
    assert ours.metric_clean == pytest.approx(full.metric_clean, rel=1e-5)


@pytest.mark.parametrize("fam", ["gpt2", "llama", "falcon:sequential"])
@pytest.mark.parametrize("reference", ["corrupted", "mean"])
@pytest.mark.parametrize("per_position", [False, True])
def test_eap_ig_over_activations_with_the_last_mlp_tail_gives_the_full_passes_scores(sharp, monkeypatch, fam,
                                                                                    reference, per_position):
    """EAP-IG over activations runs its passes with the last-MLP tail too (the last MLP's own
    group included: its path moves only the last position's value that any metric reads)."""
    eng = sharp[fam]
    pairs = _pairs(2)
    kw = dict(method="eap-ig", steps=3, ig="activations", reference=reference, per_position=per_position)
    used, tail = [], capture.last_mlp_tail_only
    monkeypatch.setattr(capture, "last_mlp_tail_only", lambda engine: used.append(1) or tail(engine))
    ours = edge_scores(eng, pairs, **kw)
    assert used  # the passes ran with the tail
    monkeypatch.setattr(capture, "last_mlp_tail_only", lambda engine: nullcontext())
    full = edge_scores(eng, pairs, **kw)
    scale = float(full.scores.abs().max())
    assert scale > 1e-3
    assert (ours.scores - full.scores).abs().max() <= 1e-5 * scale
    assert ours.metric_clean == pytest.approx(full.metric_clean, rel=1e-5)


def test_the_skipped_rows_are_zero_and_the_metric_position_is_the_full_runs(sharp):
    eng = sharp["gpt2"]
    (g,), _ = group_pairs(eng, _pairs(2), True)
    tail = reference_run(eng, g.corrupted)[0].mlp[-1]
    whole = reference_run(eng, g.corrupted, last_mlp_tail=False)[0].mlp[-1]
    assert (tail[:, :-1] == 0).all() and (whole[:, :-1] != 0).any()
    assert torch.allclose(tail[:, -1], whole[:, -1], rtol=1e-5, atol=1e-6 * float(whole.abs().max()))
    assert eng.active_hook_count() == 0 and "forward" not in eng.adapter.mlp(eng.spec.n_layers - 1).__dict__


def test_an_instance_level_forward_of_the_last_mlp_is_kept(sharp):
    """accelerate's device-map hooks replace a module's forward on the instance: the last-MLP
    tail wraps it for the pass and puts it back after (deleting it would drop the hook)."""
    eng = sharp["gpt2"]
    mlp = eng.adapter.mlp(eng.spec.n_layers - 1)
    calls = []
    cls_forward = type(mlp).forward

    def wrapped(*args, **kwargs):
        calls.append(1)
        return cls_forward(mlp, *args, **kwargs)
    mlp.forward = wrapped
    try:
        edge_scores(eng, _pairs(2))
        assert mlp.__dict__.get("forward") is wrapped and calls
        n = len(calls)
        with torch.no_grad():
            eng.forward(eng.to_tokens("a b c"))
        assert len(calls) == n + 1
    finally:
        del mlp.forward


def test_kept_weights_follow_a_weight_edited_in_place(sharp):
    """block_weights is made once per engine and made again when a parameter changes: the
    scores after an in-place edit are the edited model's (hand-written reference), and after
    the edit is undone the first ones again."""
    eng = sharp["llama"]
    pairs = _pairs(2)
    (g,), _ = group_pairs(eng, pairs, True)
    before = edge_scores(eng, pairs, method="eap").scores
    kept = block_weights(eng)
    assert block_weights(eng) is kept
    W = eng.adapter.attn(1).k_proj.weight
    saved = W.detach().clone()
    try:
        with torch.no_grad():
            W.mul_(1.7)
        assert block_weights(eng) is not kept
        edited = edge_scores(eng, pairs, method="eap").scores
        ref = RefModel(eng.model).eap(g.ids, g.corrupted, g.target, g.distractor)
        assert (edited - ref).abs().max() <= 1e-5 * float(ref.abs().max())
        assert (edited - before).abs().max() > 1e-3 * float(before.abs().max())
    finally:
        with torch.no_grad():
            W.copy_(saved)
    assert torch.allclose(edge_scores(eng, pairs, method="eap").scores, before, rtol=0, atol=1e-7)


def test_edge_graph_is_made_once_per_shape(sharp):
    a, b = sharp["gpt2"].spec, sharp["llama"].spec
    assert edge_graph(a) is edge_graph(a.model_copy()) and edge_graph(a) is not edge_graph(b)
    assert edge_graph(b).n_edges == len(edge_graph(b).valid.nonzero())
