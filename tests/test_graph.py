"""Attribution graphs checked against an independent computation: a hand-written frozen
forward in float64 (tests/frozen_reference.py), one source removed at a time. The frozen
model is affine, so an edge s -> t is exactly pre_t(all sources) - pre_t(without s)."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from tdb_agent.engine.sae import SAE, SAEConfig, SAESet
from tdb_agent.engine.transcoder import LayerTranscoder, TranscoderSet
from tdb_agent.ops.graph import GraphTarget, build_graph
from tdb_agent.ops.graph.heads import head_split, qk_decompose, qk_pairs
from tests.frozen_reference import Dict_, HandModel

PROMPT = "the cat sat on the mat and the dog ran"


def random_transcoders(engine, n=16, cross_layer=False, skip=True, seed=0) -> TranscoderSet:
    g = torch.Generator().manual_seed(seed)
    D, L = engine.spec.d_model, engine.spec.n_layers
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731
    layers = {l: LayerTranscoder(l, r(D, n, scale=0.4), r(n, scale=0.3) - 0.2, r(n, L - l if cross_layer else 1, D, scale=0.2),
                                 r(D, scale=0.1), r(D, D, scale=0.05) if skip else None)
              for l in range(L)}
    return TranscoderSet(layers, "mlp_in", L)


@contextmanager
def attached(engine, tcs=None, saes=None):
    old_t, old_s = engine.transcoders, engine.saes
    engine.transcoders = tcs
    if saes is not None:
        engine.saes = saes
    try:
        yield engine
    finally:
        engine.transcoders, engine.saes = old_t, old_s


def hand_dicts(engine):
    if engine.transcoders is not None:
        return {l: Dict_(tc.W_enc.double(), tc.b_enc.double(), tc.W_dec.double(), tc.b_dec.double(),
                         None if tc.W_skip is None else tc.W_skip.double())
                for l, tc in engine.transcoders.layers.items()}, "mlp_in"
    return {l: Dict_(s.W_enc.double(), s.b_enc.double(), s.W_dec.double()[:, None], s.b_dec.double(),
                     in_offset=s.b_dec.double()) for (l, site), s in engine.saes.items()}, "resid"


def remove(graph, src, col):
    """The hand model's sources with graph column `col` set to zero."""
    out = src.copy()
    gs = graph.src
    if col < gs.n_feat:
        l, p, i = gs.feat[col].tolist()
        out.feats[l][p, i] = 0
    elif col < gs.n_feat + gs.n_err:
        site, layer = gs.err_keys[(col - gs.n_feat) // gs.n_pos]
        p = (col - gs.n_feat) % gs.n_pos
        (out.mlp_err if site == "mlp" else out.res_err)[layer][p] = 0
    else:
        out.emb[col - gs.n_feat - gs.n_err] = 0
    return out


def target_values(graph, out) -> torch.Tensor:
    """Every row node's value in a hand run: feature pre-activations, then the targets."""
    vals = []
    for c in graph.rows.tolist():
        l, p, i = graph.src.feat[c].tolist()
        vals.append(out["pre"][l][p, i])
    for ln in graph.logits:
        vals.append(sum(cf * out["logits"][t] for t, cf in zip(ln.token_ids, ln.coef)))
    return torch.stack(vals)


def zero_sources(src):
    z = src.copy()
    z.emb.zero_()
    for d in (z.feats, z.mlp_err, z.res_err):
        for v in d.values():
            v.zero_()
    return z


def check_graph(engine, target):
    g = build_graph(engine, PROMPT, target, batch_size=7)
    ids = engine.to_tokens(PROMPT)
    ref = HandModel(engine.model)
    dicts, site = hand_dicts(engine)
    src = ref.clean(ids, dicts, site)
    clean = engine.forward(ids).logits[0, -1]
    torch.testing.assert_close(ref.clean_out["logits"].float(), clean, atol=1e-4, rtol=1e-4)
    # the hand model finds the same feature nodes
    n_hand = sum(int((f != 0).sum()) for f in src.feats.values())
    assert n_hand == g.src.n_feat and g.stats["expanded_features"] == g.src.n_feat
    full = ref.run(ids, dicts, site, frozen=True, src=src)
    full_vals = target_values(g, full)
    torch.testing.assert_close(full_vals.float(), g.value, atol=1e-4, rtol=1e-4)  # frozen == clean
    # every edge, one source removed at a time
    expect = torch.zeros_like(g.adjacency, dtype=torch.float64)
    for col in range(g.src.n_cols):
        expect[:, col] = full_vals - target_values(g, ref.run(ids, dicts, site, True, remove(g, src, col)))
    torch.testing.assert_close(g.adjacency.double(), expect, atol=1e-5, rtol=1e-4)
    # completeness: incoming edges + bias (all sources at zero, computed by hand) = value
    bias = target_values(g, ref.run(ids, dicts, site, True, zero_sources(src)))
    torch.testing.assert_close(g.adjacency.double().sum(1) + bias, full_vals, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(g.bias.double(), bias, atol=1e-4, rtol=1e-4)
    assert g.adjacency.abs().sum() > 0 and (expect.abs() > 1e-3).sum() > 20  # the test can fail
    return g, ref, dicts, site, src, full


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("cross_layer", [False, True])
def test_transcoder_graph_edges_exact(tiny_engines, family, cross_layer):
    e = tiny_engines[family]
    with attached(e, random_transcoders(e, cross_layer=cross_layer)):
        check_graph(e, GraphTarget(kind="top", mass=0.5, max_logits=3))


def test_logit_diff_target(tiny_engines):
    e = tiny_engines["gpt2"]
    with attached(e, random_transcoders(e, skip=False, seed=3)):
        g, *_ = check_graph(e, GraphTarget(kind="logit_diff", token="cat", distractor="dog"))
        assert len(g.logits) == 1 and g.logits[0].coef == [1.0, -1.0]


def random_resid_saes(e, seed: int = 5) -> SAESet:
    """A 24-latent SAE on every layer's residual stream (resid_post)."""
    D = e.spec.d_model
    gen = torch.Generator().manual_seed(seed)
    saes = SAESet()
    for l in range(e.spec.n_layers):
        w = {"W_enc": torch.randn(D, 24, generator=gen) * 0.3, "b_enc": torch.randn(24, generator=gen) * 0.2 - 0.3,
             "W_dec": torch.randn(24, D, generator=gen) * 0.2, "b_dec": torch.randn(D, generator=gen) * 0.1}
        saes.add(SAE(SAEConfig(d_in=D, d_sae=24, hook_name=f"blocks.{l}.hook_resid_post"), w), e.spec.n_layers, D)
    return saes


def test_sae_latent_graph_edges_exact(tiny_engines):
    e = tiny_engines["gpt2"]
    saes = random_resid_saes(e)
    with attached(e, None, saes):
        g, *_ = check_graph(e, GraphTarget(kind="logit", token="dog"))
        assert g.mode == "saes" and any(site == "resid" for site, _ in g.src.err_keys)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_head_split_and_qk_decomposition(tiny_engines, family):
    e = tiny_engines[family]
    H = e.spec.n_heads
    with attached(e, random_transcoders(e, seed=1)):
        g, ref, dicts, site, src, full = check_graph(e, GraphTarget(kind="top", mass=0.3, max_logits=2))
        ids = e.to_tokens(PROMPT)
        logit_row = len(g.rows)
        feat_row = next(r for r, c in enumerate(g.rows.tolist()) if g.src.feat[c, 0] == 1 and g.src.feat[c, 1] > 3)
        for row in (logit_row, feat_row):
            L = 1 if row == logit_row else 0
            hs = head_split(g, row, L)
            cols = g.adjacency[row].abs().topk(6).indices.tolist()
            for col in cols:
                without = remove(g, src, col)
                alt = ref.run(ids, dicts, site, True, without)["resid_pre"][L]
                for h in range(H):  # paths through head h only: its values read the stream without s
                    only_h = ref.run(ids, dicts, site, True, src, head_v=(L, [h], alt))
                    want = (full_vals := target_values(g, full))[row] - target_values(g, only_h)[row]
                    assert abs(float(hs[h, col]) - float(want)) < 1e-5 + 1e-4 * abs(float(want))
                # bypass: s removed, but every head of L reads its values from the full stream
                keep = ref.run(ids, dicts, site, True, without, head_v=(L, list(range(H)), full["resid_pre"][L]))
                bypass = full_vals[row] - target_values(g, keep)[row]
                edge = float(g.adjacency[row, col])
                assert abs(float(hs[:, col].sum()) + float(bypass) - edge) < 1e-5 + 1e-4 * abs(edge)
        # QK: each source's part of the query and key, the pair sum = the attention score
        L, h, qpos, kpos = 1, 2, ids.shape[1] - 1, 3
        Qc, Kc, scaling, score = qk_decompose(g, L, h, qpos, kpos)
        kv = h // (H // e.spec.n_kv_heads)
        for col in g.adjacency[logit_row].abs().topk(8).indices.tolist():
            w = ref.run(ids, dicts, site, True, remove(g, src, col))
            torch.testing.assert_close(Qc[col].double(), full["q"][L][qpos, h] - w["q"][L][qpos, h], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(Kc[col].double(), full["k"][L][kpos, kv] - w["k"][L][kpos, kv], atol=1e-5, rtol=1e-4)
        z = ref.run(ids, dicts, site, True, zero_sources(src))
        torch.testing.assert_close(Qc[-1].double(), z["q"][L][qpos, h], atol=1e-5, rtol=1e-4)
        P, top = qk_pairs(Qc, Kc, scaling)
        hand_score = float(full["q"][L][qpos, h] @ full["k"][L][kpos, kv]) * ref.dh ** -0.5
        assert abs(float(P.sum()) - hand_score) < 1e-4 and abs(score - hand_score) < 1e-4
        assert abs(top[0].contribution) == pytest.approx(float(P.abs().max()), rel=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_intervention_on_a_last_layer_feature_is_exact(tiny_engines, family):
    """Zeroing a last-layer feature at the last position in the real model (spliced, attention
    and norms frozen) moves the target by minus its edge: nothing nonlinear lies between."""
    from tdb_agent.ops.graph.intervene import check

    e = tiny_engines[family]
    with attached(e, random_transcoders(e, seed=2)):
        g = build_graph(e, PROMPT, GraphTarget(kind="logit_diff", token="dog", distractor="cat"))
        row, last, L = len(g.rows), g.n_pos - 1, e.spec.n_layers - 1
        cols = [c for c in range(g.src.n_feat) if g.src.feat[c, 0] == L and g.src.feat[c, 1] == last]
        col = max(cols, key=lambda c: abs(float(g.adjacency[row, c])))
        r = check(g, [col])
        assert abs(r.predicted_direct) > 1e-2
        assert r.measured_frozen == pytest.approx(r.predicted_direct, abs=1e-4)
        assert r.predicted_total == pytest.approx(r.predicted_direct, abs=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_replacement_model_measurement_equals_the_graph(tiny_engines, family):
    """Zeroing the weakest first-layer feature in the graph's own model run forward (errors,
    attention and norms frozen; downstream features recomputed) moves the target exactly as
    the graph propagates it, as long as no downstream feature switches on or off: a weak
    feature's change is too small to cross a threshold here."""
    from tdb_agent.ops.graph.intervene import check

    e = tiny_engines[family]
    with attached(e, random_transcoders(e, seed=2)):
        g = build_graph(e, PROMPT, GraphTarget(kind="logit_diff", token="dog", distractor="cat"))
        first = [c for c in range(g.src.n_feat) if g.src.feat[c, 0] == 0 and g.src.feat[c, 1] > 0]
        col = min(first, key=lambda c: float(g.src.feat_act[c]))
        r = check(g, [col])
        assert abs(r.predicted_total - r.predicted_direct) > 1e-6  # it acts through later features too
        assert r.measured_replacement == pytest.approx(r.predicted_total, abs=1e-4)
        # nothing zeroed: the replacement model run forward reproduces the clean target (the
        # baseline is the clean run's stored logits, not a second forward of the same hooks)
        assert check(g, []).measured_replacement == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_replacement_model_with_real_mlps_spans_graph_to_real_model(tiny_engines, family):
    """measure_replacement(real_mlps=...): no MLP real is the graph's own model; every MLP
    real is the spliced real model with attention and norms frozen, measured by other code
    (transcoder_ops' splice hooks); the zeroed features' own layer (0) made real changes
    nothing - its input is unchanged, so its real MLP gives the clean output (transcoder +
    error) less the zeroed writes, as the replacement model does."""
    from tdb_agent.ops.graph.intervene import check, measure_replacement

    e = tiny_engines[family]
    n = e.spec.n_layers
    with attached(e, random_transcoders(e, seed=2)):
        g = build_graph(e, PROMPT, GraphTarget(kind="logit_diff", token="dog", distractor="cat"))
        row = len(g.rows)
        first = [c for c in range(g.src.n_feat) if g.src.feat[c, 0] == 0 and g.src.feat[c, 1] > 0]
        cols = sorted(first, key=lambda c: -float(g.src.feat_act[c]))[:3]
        r = check(g, cols)
        assert abs(r.measured_frozen - r.measured_replacement) > 1e-4  # the transcoders are not the MLPs
        assert measure_replacement(g, cols, row) == pytest.approx(r.measured_replacement, abs=1e-6)
        assert measure_replacement(g, cols, row, frozenset(range(n))) == pytest.approx(r.measured_frozen, abs=1e-4)
        assert measure_replacement(g, cols, row, frozenset({0})) == pytest.approx(r.measured_replacement, abs=1e-5)


def test_feature_cap_keeps_rows_exact(tiny_engines):
    """With max_feature_nodes below the active count, the expanded rows are the same rows as
    in the full graph (edges do not depend on which rows are computed), chosen by influence,
    and the memory estimate refuses what would not fit."""
    e = tiny_engines["gpt2"]
    with attached(e, random_transcoders(e)):
        full = build_graph(e, PROMPT, GraphTarget(kind="logit", token="dog"), batch_size=16)
        cap = build_graph(e, PROMPT, GraphTarget(kind="logit", token="dog"), batch_size=5, max_feature_nodes=20)
        assert cap.stats["expanded_features"] == 20 < full.src.n_feat
        for r, col in enumerate(cap.rows.tolist()):
            torch.testing.assert_close(cap.adjacency[r], full.adjacency[full.row_of_feature(col)], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cap.adjacency[-1], full.adjacency[-1], atol=1e-5, rtol=1e-5)
        # the first rows expanded are the features with the strongest direct edges into the target
        direct = full.adjacency[-1, : full.src.n_feat].abs()
        first = set(cap.rows[:5].tolist())
        assert first == set(direct.topk(5).indices.tolist())
        with pytest.raises(Exception, match="GiB"):
            build_graph(e, PROMPT, GraphTarget(kind="logit", token="dog"), max_bytes=1000)
