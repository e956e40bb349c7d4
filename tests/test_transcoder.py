"""Transcoders: file layouts (SAELens, circuit-tracer PLT and CLT) read back against the raw
arrays written, exact splicing, and features as components (ablate, steer) checked with
hand-written hooks on the plain transformers model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tdb_agent.components import parse_component
from tdb_agent.engine.transcoder import TranscoderError, TranscoderSet, load_transcoders
from tdb_agent.errors import TdbError, UnknownComponent
from tdb_agent.ops import ablate
from tdb_agent.ops.sae_ops import sae_sizes
from tdb_agent.ops.steer import steering_vector
from tests.test_graph import attached, random_transcoders

PROMPT = "the cat sat on the mat and the dog ran"


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
@pytest.mark.parametrize("cross_layer", [False, True])
def test_splice_leaves_logits_unchanged(tiny_engines, family, cross_layer):
    e = tiny_engines[family]
    tcs = random_transcoders(e, cross_layer=cross_layer)
    ids = e.to_tokens(PROMPT)
    clean = e.forward(ids, logit_positions=None).logits
    cap = {}
    spliced = e.forward(ids, hooks=tcs.splice_hooks(capture=cap), logit_positions=None).logits
    assert torch.equal(spliced, clean)  # identical, not just close: the error term is kept
    assert set(cap) == set(range(e.spec.n_layers)) and any((f != 0).any() for f in cap.values())
    # rewriting one feature changes the output by exactly its decoder rows
    l, i = 0, int(cap[0][0, -1].argmax())
    assert cap[0][0, -1, i] > 0
    changed = e.forward(ids, hooks=tcs.splice_hooks({0: [lambda f: f.index_fill(-1, torch.tensor([i]), 0.0)]}),
                        logit_positions=None).logits
    assert not torch.allclose(changed, clean)


def _x(e, d=None):
    return torch.randn(5, d or e.spec.d_model, generator=torch.Generator().manual_seed(9))


def test_saelens_layout_round_trip(tiny_engines, tmp_path):
    e = tiny_engines["gpt2"]
    tcs = random_transcoders(e, skip=True)
    tcs.save(tmp_path / "tc")
    cfg = json.loads((tmp_path / "tc" / "L1" / "cfg.json").read_text())
    assert cfg["architecture"] == "skip_transcoder" and cfg["hook_name_out"] == "blocks.1.hook_mlp_out"
    back = load_transcoders(tmp_path / "tc")
    x = _x(e)
    for l, tc in tcs.layers.items():
        b = back.layers[l]
        torch.testing.assert_close(b.encode(x), tc.encode(x))
        torch.testing.assert_close(b.skip(x), tc.skip(x))
        torch.testing.assert_close(b.W_dec, tc.W_dec)
    assert back.read_site == "mlp_in" and not back.cross_layer


def test_circuit_tracer_plt_layout(tiny_engines, tmp_path):
    """One safetensors per layer: W_enc/W_dec [d_tc, d_model], skip applied as x @ W_skip.T."""
    e = tiny_engines["gpt2"]
    D, n, g = e.spec.d_model, 12, torch.Generator().manual_seed(2)
    raw = {}
    for l in range(e.spec.n_layers):
        raw[l] = {"W_enc": torch.randn(n, D, generator=g), "b_enc": torch.randn(n, generator=g),
                  "W_dec": torch.randn(n, D, generator=g), "b_dec": torch.randn(D, generator=g),
                  "W_skip": torch.randn(D, D, generator=g)}
        save_file(raw[l], str(tmp_path / f"layer_{l}.safetensors"))
    (tmp_path / "config.yaml").write_text("model_name: tiny\nfeature_input_hook: hook_resid_mid\n"
                                          "feature_output_hook: hook_mlp_out\ntranscoders:\n"
                                          + "".join(f"  - layer_{l}.safetensors\n" for l in raw))
    tcs = load_transcoders(tmp_path)
    x = _x(e)
    assert tcs.read_site == "resid_mid"
    for l, r in raw.items():
        tc = tcs.layers[l]
        want_f = torch.relu(x @ r["W_enc"].T + r["b_enc"])
        torch.testing.assert_close(tc.encode(x), want_f)
        torch.testing.assert_close(tc.encode(x) @ tc.W_dec[:, 0] + tc.b_dec + tc.skip(x),
                                   want_f @ r["W_dec"] + r["b_dec"] + x @ r["W_skip"].T)


def test_circuit_tracer_clt_layout(tiny_engines, tmp_path):
    """W_enc_{l} [d_tc, d_model]; W_dec_{l} [d_tc, n_layers - l, d_model]; skip x @ W_skip_{l}."""
    e = tiny_engines["llama"]
    D, n, L, g = e.spec.d_model, 10, e.spec.n_layers, torch.Generator().manual_seed(4)
    raw = {}
    for l in range(L):
        raw[l] = (torch.randn(n, D, generator=g), torch.randn(n, generator=g), torch.randn(D, generator=g),
                  torch.randn(D, D, generator=g), torch.randn(n, L - l, D, generator=g))
        save_file({f"W_enc_{l}": raw[l][0], f"b_enc_{l}": raw[l][1], f"b_dec_{l}": raw[l][2],
                   f"W_skip_{l}": raw[l][3]}, str(tmp_path / f"W_enc_{l}.safetensors"))
        save_file({f"W_dec_{l}": raw[l][4]}, str(tmp_path / f"W_dec_{l}.safetensors"))
    tcs = load_transcoders(tmp_path)
    assert tcs.cross_layer and [tc.n_out for tc in tcs.layers.values()] == [L - l for l in range(L)]
    xs = [_x(e) + l for l in range(L)]
    fs = [torch.relu(xs[l] @ raw[l][0].T + raw[l][1]) for l in range(L)]
    for o in range(L):  # the reconstruction of MLP output o, from every layer's features
        want = sum(fs[l] @ raw[l][4][:, o - l] for l in range(o + 1)) + raw[o][2] + xs[o] @ raw[o][3]
        got = sum(tc.encode(xs[tc.layer]) @ tc.W_dec[:, o - tc.layer] for tc in tcs.writers(o))
        got = got + tcs.layers[o].b_dec + tcs.layers[o].skip(xs[o])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_bad_files_give_clear_errors(tmp_path, tiny_engines):
    with pytest.raises(TranscoderError, match="not a folder"):
        load_transcoders(tmp_path / "missing")
    (tmp_path / "x").mkdir()
    with pytest.raises(TranscoderError, match="no transcoder found"):
        load_transcoders(tmp_path / "x")
    e = tiny_engines["gpt2"]
    tcs = random_transcoders(e)
    with pytest.raises(TranscoderError, match="d_model"):
        tcs.check(e.spec.d_model + 1, e.spec.n_layers, False)
    with pytest.raises(TranscoderError, match="parallel-residual"):
        TranscoderSet(tcs.layers, "resid_mid").check(e.spec.d_model, e.spec.n_layers, True)


def test_feature_ids(tiny_engines):
    e = tiny_engines["gpt2"]
    with pytest.raises(UnknownComponent, match="no transcoder reads layer 1"):
        parse_component("L1.tc.F3", e.spec, sae_sizes=sae_sizes(e))
    with attached(e, random_transcoders(e, n=16)):
        c = parse_component("L1.tc.F3@2", e.spec, n_positions=5, sae_sizes=sae_sizes(e))
        assert (c.kind, c.layer, c.index, c.position, c.id) == ("transcoder", 1, 3, 2, "L1.tc.F3@2")
        with pytest.raises(UnknownComponent, match="features are 0..15"):
            parse_component("L1.tc.F16", e.spec, sae_sizes=sae_sizes(e))


def test_ablate_and_steer_features_against_plain_hooks(tiny_engines):
    """Zero-ablating feature i of layer 1 = subtracting f_i · W_dec[i] from that MLP's output,
    done here with a hook on the plain transformers model."""
    e = tiny_engines["gpt2"]
    tcs = random_transcoders(e, n=16, seed=7)
    with attached(e, tcs):
        ids = e.to_tokens(PROMPT)
        tc = tcs.layers[1]
        mlp = e.model.base_model.h[1].mlp
        store = {}
        h1 = mlp.register_forward_pre_hook(lambda m, a: store.__setitem__("x", a[0]))
        try:
            with torch.no_grad():
                e.model(ids)
        finally:
            h1.remove()
        f = torch.relu(store["x"][0] @ tc.W_enc + tc.b_enc)
        i = int(f[1:].sum(0).argmax())

        def sub(m, a, out):
            return out - f[:, i:i + 1] * tc.W_dec[i, 0]
        h2 = mlp.register_forward_hook(sub)
        try:
            with torch.no_grad():
                logits = e.model(ids).logits[0, -1]
        finally:
            h2.remove()
        t, d = e.token_id("dog"), e.token_id("cat")
        res = ablate(e, PROMPT, [f"L1.tc.F{i}"], "dog", "cat")
        assert res.after == pytest.approx(float(logits[t] - logits[d]), abs=1e-4)
        assert abs(res.delta) > 1e-4
        site, vec = steering_vector(e, f"L1.tc.F{i}")
        assert site == "blocks.1.hook_mlp_out" and torch.equal(vec, tc.W_dec[i, 0])
    with pytest.raises(TdbError, match="transcoder"):
        ablate(e, PROMPT, ["L1.tc.F0"], "dog", "cat")


def test_feature_component_page(tiny_engines):
    from tdb_agent.workbench import Workbench, component_page

    e = tiny_engines["gpt2"]
    with attached(e, random_transcoders(e, n=16)):
        page = component_page(Workbench(e), "L1.tc.F3")
        assert page.kind == "transcoder" and page.hook_site == "blocks.1.hook_mlp_out[3]"
        dec = page.weights[0]
        assert dec.matrix == "W_dec[L1.tc.F3] [32]" and dec.norm == pytest.approx(
            float(e.transcoders.layers[1].W_dec[3, 0].norm()), rel=1e-5)
        assert "attribution_graph" in page.related_tools


def test_attribute_transcoder_features(tiny_engines):
    """direct_effect of a last-layer feature = its graph edge into the logit difference (the
    graph is checked against a hand-written forward in test_graph.py); act_times_grad with
    reference zero = f_i · ∂metric/∂f_i, checked by a central finite difference."""
    from tdb_agent.ops import attribute
    from tdb_agent.ops.graph import GraphTarget, build_graph
    from tdb_agent.ops.graph.query import col_tid

    e = tiny_engines["gpt2"]
    with attached(e, random_transcoders(e, n=16, seed=4)):
        r = attribute(e, PROMPT, "dog", "cat", kinds=["transcoder"], top_k=None)
        g = build_graph(e, PROMPT, GraphTarget(kind="logit_diff", token="dog", distractor="cat"))
        last, L = g.n_pos - 1, e.spec.n_layers - 1
        rows = {x.id: x.effect for x in r.rows}
        checked = 0
        for c in range(g.src.n_feat):
            l, p, i = g.src.feat[c].tolist()
            if l == L and p == last:
                assert rows[f"L{l}.tc.F{i}"] == pytest.approx(float(g.adjacency[-1, c]), abs=1e-4), col_tid(g, c)
                checked += 1
        assert checked >= 2
        a = attribute(e, PROMPT, "dog", "cat", method="act_times_grad", reference="zero", kinds=["transcoder"],
                      per_position=True, top_k=3)
        top = a.rows[0]
        ids = e.to_tokens(PROMPT)
        t, d = e.token_id("dog"), e.token_id("cat")

        def metric(eps):
            def bump(f):
                f = f.clone()
                f[0, top.position, top.index] += eps
                return f
            out = e.forward(ids, hooks=e.transcoders.splice_hooks({top.layer: [bump]})).logits[0, -1]
            return float(out[t] - out[d])
        cap = {}
        e.forward(ids, hooks=e.transcoders.splice_hooks(capture=cap))
        f = float(cap[top.layer][0, top.position, top.index])
        grad = (metric(1e-2) - metric(-1e-2)) / 2e-2
        assert top.effect == pytest.approx(f * grad, rel=1e-2, abs=1e-4) and abs(top.effect) > 1e-3
