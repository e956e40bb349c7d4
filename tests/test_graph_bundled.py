"""The bundled model's transcoders and attribution graphs on its IOI and facts behaviours."""

from __future__ import annotations

import json

import pytest
import torch

from tdb_agent.engine import Engine
from tdb_agent.engine.transcoder import BUNDLED_TRANSCODERS, attach_transcoders, load_transcoders
from tdb_agent.ops.graph import GraphTarget, build_graph
from tdb_agent.ops.graph.influence import prune, scores, square
from tdb_agent.ops.graph.intervene import check

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
    errors kept). Attention and norms frozen as in the graph, the measured change is within
    10 % of the graph's propagated prediction: what remains is the real downstream MLPs'
    nonlinear response, small for these late, last-position features. Free, the norms
    rescale the residual stream, so only the direction is asserted there, for the set of 5."""
    prompt, target, distractor = IOI
    g = build_graph(engine, prompt, GraphTarget(kind="logit_diff", token=target, distractor=distractor))
    p = prune(square(g))
    nf = len(g.rows)
    top = [int(g.rows[k]) for k in p.node_influence[:nf].argsort(descending=True)[:5]]
    last_layer = next(c for c in top if int(g.src.feat[c, 0]) == 3 and int(g.src.feat[c, 1]) == g.n_pos - 1)
    one = check(g, [last_layer])  # nothing nonlinear downstream: exact
    assert one.measured_frozen == pytest.approx(one.predicted_direct, abs=1e-4)
    assert one.predicted_total == pytest.approx(one.predicted_direct, abs=1e-6)
    for k in (3, 5):
        r = check(g, top[:k])
        assert abs(r.measured_frozen - r.predicted_total) < 0.1 * abs(r.predicted_total)
    assert r.measured < 0 and r.predicted_total < 0


@pytest.mark.parametrize("prompt,target,distractor", [IOI, FACTS])
def test_top_features_move_the_replacement_model_as_the_graph_predicts(engine, prompt, target, distractor):
    """Zeroing the graph's top 1, 3 and 5 features in the graph's own model run forward
    (errors, attention and norms frozen, later features recomputed) moves the target as the
    graph predicts, within 2 % of the target's clean value: what differs is TopK membership
    downstream (a feature entering or leaving a layer's top 16), which the linear graph does
    not see. In the real model the facts prompt differs further (its real MLPs respond unlike
    their transcoders: the replacement model's own error); the sign agrees there only for IOI."""
    g = build_graph(engine, prompt, GraphTarget(kind="logit_diff", token=target, distractor=distractor))
    p = prune(square(g))
    nf = len(g.rows)
    top = [int(g.rows[k]) for k in p.node_influence[:nf].argsort(descending=True)[:5]]
    value = abs(float(g.value[-1]))
    for k in (1, 3, 5):
        r = check(g, top[:k])
        assert abs(r.measured_replacement - r.predicted_total) < 0.02 * value, (k, r)
