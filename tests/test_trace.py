"""trace_upstream against hand computations on a plain GPT-2 forward."""

import pytest
import torch

from tdb_agent.errors import TdbError
from tdb_agent.ops.attribute import attribute
from tdb_agent.ops.trace import trace_upstream
from tests.tiny_models import FAMILIES

PROMPT = "When Mary and John went to the store , John gave a drink to"




def _frozen_ln_parts(ln, x):
    mu = x.mean(-1, keepdim=True)
    s = 1 / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + ln.eps)
    return (x - mu) * s * ln.weight, ln.bias  # linear part, constant part


def _inputs(model, ids, **modules) -> dict[str, torch.Tensor]:
    """The input of each named module on a plain forward of `ids` (forward pre-hooks)."""
    store, handles = {}, []
    for name, mod in modules.items():
        handles.append(mod.register_forward_pre_hook(lambda m, a, name=name: store.__setitem__(name, a[0].detach())))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return store


@pytest.fixture(scope="module")
def plain_gpt2(tiny_dirs):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_dirs["gpt2"], dtype=torch.float32).eval()


def test_head_score_trace_via_q_and_k_by_hand(gpt2_tiny, plain_gpt2):
    model, eng = plain_gpt2, gpt2_tiny
    ids = eng.to_tokens(PROMPT)
    layer, h, q, k = 1, 2, 14, 4
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states  # hs[l] enters block l
    x = hs[layer][0]
    blk = model.transformer.h[layer]
    d, dh = model.config.n_embd, model.config.n_embd // model.config.n_head
    W, b = blk.attn.c_attn.weight, blk.attn.c_attn.bias
    Wq, Wk = W[:, :d], W[:, d:2 * d]
    bq, bk = b[:d], b[d:2 * d]
    sl = slice(h * dh, (h + 1) * dh)
    lin_q, const = _frozen_ln_parts(blk.ln_1, x[q])
    lin_k, _ = _frozen_ln_parts(blk.ln_1, x[k])
    q_x, q_b = lin_q @ Wq[:, sl], const @ Wq[:, sl] + bq[sl]
    k_x, k_b = lin_k @ Wk[:, sl], const @ Wk[:, sl] + bk[sl]
    scale = dh ** -0.5
    score = ((q_x + q_b) @ (k_x + k_b)).item() * scale

    r = trace_upstream(eng, PROMPT, f"L{layer}.H{h}@{q}", via="qk", key_position=k, top_k=None)
    assert r.value == pytest.approx(score, abs=1e-5)
    # via q: edges + output biases = the part linear in x_q; the rest is the bias side
    assert r.sum_of_edges["q"] + r.unattributed["q_output_biases"] == pytest.approx(
        (q_x @ (k_x + k_b)).item() * scale, abs=1e-5)
    assert r.unattributed["q_norm_bias_qk_bias_and_other_side"] == pytest.approx(
        (q_b @ (k_x + k_b)).item() * scale, abs=1e-5)
    assert r.sum_of_edges["k"] + r.unattributed["k_output_biases"] == pytest.approx(
        ((q_x + q_b) @ k_x).item() * scale, abs=1e-5)
    assert {e.via for e in r.edges} == {"q", "k"}
    assert all(e.source.endswith(f"@{q}") for e in r.edges if e.via == "q")
    assert all(e.source.endswith(f"@{k}") for e in r.edges if e.via == "k")
    # layer-0 heads are upstream of layer 1: one edge per head, position and side
    assert sum(1 for e in r.edges if ".H" in e.source) == 2 * eng.spec.n_heads
    assert eng.active_hook_count() == 0


def test_neuron_trace_by_hand(gpt2_tiny, plain_gpt2):
    model, eng = plain_gpt2, gpt2_tiny
    ids = eng.to_tokens(PROMPT)
    layer, n, t = 1, 7, 9
    blk = model.transformer.h[layer]
    store = _inputs(model, ids, mid=blk.ln_2, pre=blk.mlp.act)
    lin, const = _frozen_ln_parts(blk.ln_2, store["mid"][0, t])
    w_in, b_in = blk.mlp.c_fc.weight[:, n], blk.mlp.c_fc.bias[n]
    r = trace_upstream(eng, PROMPT, f"L{layer}.N{n}@{t}", top_k=None)
    assert r.value == pytest.approx(store["pre"][0, t, n].item(), abs=1e-5)
    assert r.unattributed["norm_bias_and_input_bias"] == pytest.approx((const @ w_in + b_in).item(), abs=1e-5)
    assert r.sum_of_edges["direct"] + r.unattributed["attn_output_biases"] + r.unattributed[
        "mlp_output_biases"] == pytest.approx((lin @ w_in).item(), abs=1e-5)
    # the same layer's heads write into resid_mid, so they are upstream of its neurons
    assert any(e.source.startswith(f"L{layer}.H") for e in r.edges)


def test_transcoder_feature_trace_by_hand(gpt2_tiny, plain_gpt2):
    """A transcoder feature's pre-activation (MLP input · W_enc[:, i] + b_enc[i]) traced like a
    neuron's: its value, its constant part and the linear part the edges carry, by hand."""
    from tests.test_graph import attached, random_transcoders

    model, eng = plain_gpt2, gpt2_tiny
    ids = eng.to_tokens(PROMPT)
    layer, i, t = 1, 5, 9
    blk = model.transformer.h[layer]
    store = _inputs(model, ids, mid=blk.ln_2)
    tcs = random_transcoders(eng, n=12, seed=9)
    w, b = tcs.layers[layer].W_enc[:, i], tcs.layers[layer].b_enc[i]
    lin, const = _frozen_ln_parts(blk.ln_2, store["mid"][0, t])
    x = blk.ln_2(store["mid"][0, t])
    with attached(eng, tcs):
        r = trace_upstream(eng, PROMPT, f"L{layer}.tc.F{i}@{t}", top_k=None)
    assert r.node == f"L{layer}.tc.F{i}@{t}"
    assert r.value == pytest.approx((x @ w + b).item(), abs=1e-5)
    assert r.unattributed["norm_bias_and_input_bias"] == pytest.approx((const @ w + b).item(), abs=1e-5)
    assert r.sum_of_edges["direct"] + r.unattributed["attn_output_biases"] + r.unattributed[
        "mlp_output_biases"] == pytest.approx((lin @ w).item(), abs=1e-5)
    assert any(e.source.startswith(f"L{layer}.H") for e in r.edges) and eng.active_hook_count() == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_value_trace_sums_to_the_heads_direct_effect(family, tiny_engines):
    eng = tiny_engines[family]
    de = attribute(eng, PROMPT, "Mary", "John", kinds=["head"], top_k=None)
    expected = next(r.effect for r in de.rows if r.id == "L1.H1")
    r = trace_upstream(eng, PROMPT, "L1.H1", via="v", target="Mary", distractor="John", top_k=None)
    assert r.value == pytest.approx(expected, abs=1e-5)
    assert r.sum_of_edges["v"] + sum(r.unattributed.values()) == pytest.approx(r.value, abs=1e-5)
    positions = {int(e.source.split("@")[1]) for e in r.edges}
    assert len(positions) > 1  # values come from many key positions


@pytest.mark.parametrize("family", FAMILIES)
def test_score_traces_add_up_for_every_family(family, tiny_engines):
    eng = tiny_engines[family]
    r = trace_upstream(eng, PROMPT, "L1.H0@12", via="qk", top_k=5)
    for side in ("q", "k"):
        total = (r.sum_of_edges[side] + r.unattributed[f"{side}_output_biases"]
                 + r.unattributed[f"{side}_norm_bias_qk_bias_and_other_side"])
        assert total == pytest.approx(r.value, abs=1e-5)
    assert len(r.edges) == 5 and r.key_position is not None


def test_via_all_is_an_alias_of_qk(gpt2_tiny):
    qk = trace_upstream(gpt2_tiny, PROMPT, "L1.H2@14", via="qk", top_k=None)
    old = trace_upstream(gpt2_tiny, PROMPT, "L1.H2@14", via="all", top_k=None)
    assert [e.model_dump() for e in old.edges] == [e.model_dump() for e in qk.edges]
    assert {e.via for e in qk.edges} == {"q", "k"}  # edges keep their side; v is not part of qk
    assert old.value == qk.value and old.sum_of_edges == qk.sum_of_edges and old.via == qk.via == "qk"
    assert trace_upstream(gpt2_tiny, PROMPT, "L1.H2@14", top_k=None).edges == qk.edges  # the default


def test_trace_errors(gpt2_tiny):
    with pytest.raises(TdbError, match="give target"):
        trace_upstream(gpt2_tiny, PROMPT, "L1.H0", via="v")
    with pytest.raises(TdbError, match="unknown via"):
        trace_upstream(gpt2_tiny, PROMPT, "L1.H0", via="x")
    with pytest.raises(TdbError, match="causal"):
        trace_upstream(gpt2_tiny, PROMPT, "L1.H0@3", via="q", key_position=5)
    with pytest.raises(TdbError, match="neuron"):
        trace_upstream(gpt2_tiny, PROMPT, "L1.MLP")
    with pytest.raises(TdbError, match="out of range"):
        trace_upstream(gpt2_tiny, PROMPT, "L1.H0@30")
    assert gpt2_tiny.active_hook_count() == 0
