"""The bundled model's transcoders and attribution graphs on its IOI and facts behaviours."""

from __future__ import annotations

import json

import pytest
import torch

from tdb_agent.engine import Engine
from tdb_agent.engine.transcoder import BUNDLED_TRANSCODERS, attach_transcoders, load_transcoders
from tdb_agent.ops.graph import GraphTarget, build_graph
from tdb_agent.ops.graph.influence import prune, scores, square
from tdb_agent.ops.graph.intervene import check, measure_replacement
from tdb_agent.tasks import vocab as V
from tdb_agent.tasks.generators import _language

IOI = ("When Eric and Ryan went to the harbor , Eric gave a pen to", "Ryan", "Eric")
FACTS = ("The people of Kribrilia speak", "Faigeamouish", "Stihaiish")


@pytest.fixture(scope="module")
def engine(bundled):
    if not BUNDLED_TRANSCODERS.is_dir():
        pytest.skip("the bundled transcoders are not built (python tools/train_transcoders.py)")
    e = Engine.load()
    attach_transcoders(e)
    return e


def test_shipped_transcoders_card_and_layout(engine):
    tcs = load_transcoders(BUNDLED_TRANSCODERS)
    assert sorted(tcs.layers) == [0, 1, 2, 3] and not tcs.cross_layer and tcs.read_site == "mlp_in"
    metrics = json.loads((BUNDLED_TRANSCODERS / "metrics.json").read_text())
    card = (BUNDLED_TRANSCODERS / "README.md").read_text()
    for l, m in enumerate(metrics):
        cfg = json.loads((BUNDLED_TRANSCODERS / f"L{l}" / "cfg.json").read_text())
        assert cfg["dtype"] == "float16" and cfg["hook_name"] == f"blocks.{l}.ln2.hook_normalized"
        assert cfg["d_sae"] == tcs.layers[l].d_tc and cfg["k"] == 16
        assert m["fvu"] < 0.1 and m["mean_l0"] == pytest.approx(16, abs=0.05) and m["eval_tokens"] >= 50_000
        assert (f"| L{l} | {cfg['d_sae']} | 16 | {m['fvu']:.3f} | {m['mean_l0']:.1f} | {m['dead_fraction']:.1%} | "
                f"{m['fact_answer_fvu']:.3f} |") in card


def test_spliced_bundled_model_is_exact(engine):
    ids = engine.to_tokens(IOI[0])
    clean = engine.forward(ids, logit_positions=None).logits
    assert torch.equal(engine.forward(ids, hooks=engine.transcoders.splice_hooks(), logit_positions=None).logits, clean)


@pytest.mark.parametrize("prompt,target,distractor", [IOI, FACTS])
def test_bundled_graphs(engine, prompt, target, distractor):
    g = build_graph(engine, prompt, GraphTarget(kind="logit_diff", token=target, distractor=distractor))
    assert g.stats["completeness_residual"] < 1e-3
    clean = engine.forward(engine.to_tokens(prompt)).logits[0, -1]
    want = clean[engine.token_id(target)] - clean[engine.token_id(distractor)]
    assert float(g.value[-1]) == pytest.approx(float(want), abs=1e-4) and want > 2  # the model does the task
    sq = square(g)
    p = prune(sq)
    rep, comp = scores(sq)
    assert 0.5 < rep <= 1 and 0.7 < comp <= 1
    assert 0 < int(p.node_mask[: len(g.rows)].sum()) < len(g.rows)  # pruning keeps some features, not all
    last = g.n_pos - 1
    nf = len(g.rows)
    top = [int(g.rows[k]) for k in p.node_influence[:nf].argsort(descending=True)[:5]]
    # the answer is read out at the last position: most influential features sit there
    assert sum(int(g.src.feat[c, 1]) == last for c in top) >= 3


def test_ioi_interventions_match_the_graph(engine):
    """Zeroing the graph's most influential features in the real model (transcoders spliced,
    errors kept), attention and norms frozen as in the graph. The top 4 are layer-3 features
    at the last position: nothing nonlinear lies downstream, so the real model moves exactly
    as predicted (the top 3 asserted to 10 %, as before). The 5th is L0.tc.F233 at the last
    position, whose removal passes the real MLPs of layers 1-3: there the real model moves
    about 36 % more than the graph predicts (-4.17 against -3.06), NOT within 10 %
    (asserted within 40 %). Alone,
    the graph gives that feature's removal -0.13 (direct +0.27, through later transcoders
    -0.40) and the real model, frozen, -1.23; with only layer 2's MLP real the replacement
    model gives -0.97 (layer 1: -0.34, layer 3: -0.64): the later transcoders' linear
    responses under-read how the real MLPs amplify it. Each of those MLPs alone made real
    moves the set's result further the same way, which is asserted with the direction.
    (The 512-feature transcoders shipped before had a top 5 of layer-2/3 features, within
    10 %; the 1,024-feature ones rank this layer-0 feature higher.) Free, the norms rescale
    the residual stream, so only the direction is asserted there."""
    prompt, target, distractor = IOI
    g = build_graph(engine, prompt, GraphTarget(kind="logit_diff", token=target, distractor=distractor))
    top = _top(g, 5)
    row = len(g.rows)
    last_layer = next(c for c in top if int(g.src.feat[c, 0]) == 3 and int(g.src.feat[c, 1]) == g.n_pos - 1)
    one = check(g, [last_layer])  # nothing nonlinear downstream: exact
    assert one.measured_frozen == pytest.approx(one.predicted_direct, abs=1e-4)
    assert one.predicted_total == pytest.approx(one.predicted_direct, abs=1e-6)
    r = check(g, top[:3])
    assert abs(r.measured_frozen - r.predicted_total) < 0.1 * abs(r.predicted_total)
    r = check(g, top[:5])
    assert r.measured < 0 and r.measured_frozen < 0 and r.predicted_total < 0
    # within 40 % (measured 36 %), the bound of the facts test's kind: what remains is the
    # later real MLPs' response to an early feature, located just below
    assert abs(r.measured_frozen - r.predicted_total) < 0.4 * abs(r.predicted_total)
    early = [c for c in top if int(g.src.feat[c, 0]) < 3]
    for later in (1, 2, 3):
        if all(int(g.src.feat[c, 0]) < later for c in early):
            assert measure_replacement(g, top, row, frozenset({later})) < r.measured_replacement - 0.05


def _top(g, n):
    p = prune(square(g))
    return [int(g.rows[k]) for k in p.node_influence[: len(g.rows)].argsort(descending=True)[:n]]


@torch.no_grad()
def _mlp_inputs(engine, prompts: list[str], layer: int, pos: int) -> torch.Tensor:
    """Block `layer`'s MLP input at `pos` for each prompt, from a plain forward hook on the
    HF module (not the engine's hook sites)."""
    got = []
    h = engine.model.transformer.h[layer].mlp.register_forward_hook(lambda m, a, o: got.append(a[0][0, pos].float()))
    try:
        for q in prompts:
            engine.model(engine.to_tokens(q))
    finally:
        h.remove()
    return torch.stack(got)


def test_facts_graph_names_the_language_features(engine):
    """The facts graph's three most influential features sit at 'speak' (the last position)
    and carry the answer: each has a positive edge into Faigeamouish - Stihaiish, its
    decoder read through the unembedding ranks Faigeamouish among the top 4 of the 20
    languages and above Stihaiish, and - computed from the model alone, a hand-encoded
    TopK of the MLP input - it fires more on 'The people of X speak' for the three countries
    whose language is Faigeamouish than, on average, for the other 57 (by 1.4x or more)."""
    prompt, target, distractor = FACTS
    g = build_graph(engine, prompt, GraphTarget(kind="logit_diff", token=target, distractor=distractor))
    top = _top(g, 3)
    into_target = g.edges.row(len(g.rows))
    langs = [engine.token_id(x) for x in V.LANGUAGES]
    same = torch.tensor([_language(c) == target for c in V.COUNTRIES])
    assert int(same.sum()) == 3
    prompts = [f"The people of {c} speak" for c in V.COUNTRIES]
    for c in top:
        l, pos, i = g.src.feat[c].tolist()
        assert pos == g.n_pos - 1 and float(into_target[c]) > 0.2, (l, pos, i, float(into_target[c]))
        tc = engine.transcoders.layers[l]
        order = engine.unembed(tc.W_dec[i, 0].float()[None], langs)[0].argsort(descending=True).tolist()
        rank = {V.LANGUAGES[j]: r for r, j in enumerate(order)}
        assert rank[target] < 4 and rank[target] < rank[distractor], (l, i, rank[target], rank[distractor])
        x = _mlp_inputs(engine, prompts, l, pos)
        pre = x @ tc.W_enc.float() + tc.b_enc.float()
        f = pre.masked_fill(pre < pre.topk(tc.k, dim=-1).values[:, -1:], 0).clamp(min=0)[:, i]
        assert float(f[prompts.index(prompt)]) == pytest.approx(float(g.src.feat_act[c]), rel=1e-3)
        assert float(f[same].mean()) > 1.4 * float(f[~same].mean()), (l, i, f[same].mean(), f[~same].mean())


def test_facts_interventions_match_the_graph(engine):
    """Zeroing the facts graph's top 1, 3 and 5 features in the real model (transcoders
    spliced, errors recomputed), attention and norms frozen: the target moves the way the
    graph predicts, within 35 % of the prediction (measured: 19-32 %), and in the same
    direction with attention free. Why 35 % and not IOI's 10 %: the gap is wholly the layer-3
    MLP at 'speak' responding unlike its transcoder - the replacement model with only that
    MLP real reproduces the real measurement, and with every other MLP real it reproduces
    the graph's - and the layer-3 transcoder reconstructs fact answers less well than IOI's
    last position (its card's FVU at fact answers, 0.24 on held-out fact sentences; the
    MLP recalls a memorised fact there), so its linear response to the removed features
    misses more of the real MLP's."""
    prompt, target, distractor = FACTS
    g = build_graph(engine, prompt, GraphTarget(kind="logit_diff", token=target, distractor=distractor))
    top = _top(g, 5)
    row = len(g.rows)
    for k in (1, 3, 5):
        r = check(g, top[:k])
        assert r.predicted_total < 0 and r.measured_frozen < 0 and r.measured < 0, (k, r)
        assert abs(r.measured_frozen - r.predicted_total) < 0.35 * abs(r.predicted_total), (k, r)
        assert measure_replacement(g, top[:k], row, frozenset({3})) == pytest.approx(r.measured_frozen, abs=1e-3)
        assert measure_replacement(g, top[:k], row, frozenset({0, 1, 2})) == pytest.approx(
            r.measured_replacement, abs=1e-3)
        assert measure_replacement(g, top[:k], row, frozenset({0, 1, 2, 3})) == pytest.approx(
            r.measured_frozen, abs=1e-4)


@pytest.mark.parametrize("prompt,target,distractor", [IOI, FACTS])
def test_top_features_move_the_replacement_model_as_the_graph_predicts(engine, prompt, target, distractor):
    """Zeroing the graph's top 1, 3 and 5 features in the graph's own model run forward
    (errors, attention and norms frozen, later features recomputed) moves the target as the
    graph predicts, within 2 % of the target's clean value: what differs is TopK membership
    downstream (a feature entering or leaving a layer's top 16), which the linear graph does
    not see. The real model: test_ioi_interventions_match_the_graph and
    test_facts_interventions_match_the_graph."""
    g = build_graph(engine, prompt, GraphTarget(kind="logit_diff", token=target, distractor=distractor))
    p = prune(square(g))
    nf = len(g.rows)
    top = [int(g.rows[k]) for k in p.node_influence[:nf].argsort(descending=True)[:5]]
    value = abs(float(g.value[-1]))
    for k in (1, 3, 5):
        r = check(g, top[:k])
        assert abs(r.measured_replacement - r.predicted_total) < 0.02 * value, (k, r)
