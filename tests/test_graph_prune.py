"""Influence, pruning, the replacement and completeness scores on a graph worked out by hand,
and the graph JSON (round trip, validator)."""

from __future__ import annotations

import json

import pytest
import torch

from tdb_agent.ops.graph import GraphTarget, build_graph
from tdb_agent.ops.graph.export import to_json, validate
from tdb_agent.ops.graph.influence import SquareGraph, influence, normalise, prune, scores, square
from tests.test_graph import PROMPT, attached, random_transcoders


def hand_graph() -> SquareGraph:
    """Nodes f0, f1, err, e0, e1, logit. logit <- f1 (2), err (-1), e1 (1);
    f1 <- f0 (3), e0 (1); f0 <- e0 (1), err (1)."""
    A = torch.zeros(6, 6)
    A[5, 1], A[5, 2], A[5, 4] = 2, -1, 1
    A[1, 0], A[1, 3] = 3, 1
    A[0, 3], A[0, 2] = 1, 1
    w = torch.tensor([0, 0, 0, 0, 0, 1.0])
    return SquareGraph(A, torch.arange(5), n_feat=2, n_err=1, n_emb=2, n_logit=1, weights=w)


def test_influence_and_scores_by_hand():
    sq = hand_graph()
    # Â rows: logit f1 .5 err .25 e1 .25; f1: f0 .75 e0 .25; f0: e0 .5 err .5
    # influence: wÂ = (f1 .5, err .25, e1 .25); wÂ² = (f0 .375, e0 .125); wÂ³ = (e0 .1875, err .1875)
    infl = influence(normalise(sq.A), sq.weights)
    torch.testing.assert_close(infl, torch.tensor([0.375, 0.5, 0.4375, 0.3125, 0.25, 0.0]))
    replacement, completeness = scores(sq)
    assert replacement == pytest.approx(0.5625 / 1.0)  # (e0 + e1) / (e0 + e1 + err)
    # non-error share per node (f0 .5, logit .75, others 1) weighted by influence + w
    assert completeness == pytest.approx(2.4375 / 2.875)


def test_node_pruning_by_hand():
    sq = hand_graph()
    # influences sorted f1 .5, err .4375, f0 .375, e0, e1: cumulative .267, .5, .7 ...
    p = prune(sq, node_threshold=0.4, edge_threshold=1.0)  # keeps f1, err (cum .5 >= .4); drops f0
    assert p.node_mask.tolist() == [False, True, True, True, True, True]
    p = prune(sq, node_threshold=0.6, edge_threshold=1.0)
    assert p.node_mask.all()


def test_edge_pruning_cascades_by_hand():
    sq = hand_graph()
    # edge scores Â[t, s] (influence_t + w_t): logit<-f1 .5, f1<-f0 .375, logit<-err .25, logit<-e1 .25,
    # f0<-e0 .1875, f0<-err .1875, f1<-e0 .125 (total 1.875). 50 % keeps scores >= .25: f0 then has no
    # input, so it goes, then f1 (its only kept input was f0), then the edge f1 -> logit.
    p = prune(sq, node_threshold=1.0, edge_threshold=0.5)
    assert p.node_mask.tolist() == [False, False, True, True, True, True]
    kept = {(int(t), int(s)) for t, s in p.edge_mask.nonzero().tolist()}
    assert kept == {(5, 2), (5, 4)}
    with pytest.raises(ValueError, match="node_threshold"):
        prune(sq, node_threshold=1.5)


def test_graph_json_round_trips_and_validates(tiny_engines, tmp_path):
    e = tiny_engines["gpt2"]
    with attached(e, random_transcoders(e)):
        g = build_graph(e, PROMPT, GraphTarget(kind="logit_diff", token="dog", distractor="cat"))
    sq = square(g)
    p = prune(sq, 0.8, 0.98)
    d = to_json(g, sq, p, slug="t", scores=scores(sq))
    assert validate(d) == []
    path = tmp_path / "g.json"
    path.write_text(json.dumps(d))
    back = json.loads(path.read_text())
    assert back == d and validate(back) == []
    assert {n["feature_type"] for n in d["nodes"]} >= {"embedding", "logit"}
    ids = {n["node_id"]: n for n in d["nodes"]}
    assert all(ln["source"] in ids and ln["target"] in ids for ln in d["links"])
    # every kept link is an adjacency entry
    by_tdb = {n["tdb_id"]: n["node_id"] for n in d["nodes"]}
    logit = next(n for n in d["nodes"] if n["feature_type"] == "logit")
    assert logit["is_target_logit"] and logit["activation"] == pytest.approx(g.value[-1].item(), abs=1e-5)
    assert len(by_tdb) == len(d["nodes"])
    # the validator catches what it should
    bad = json.loads(json.dumps(d))
    bad["nodes"][0].pop("ctx_idx")
    bad["links"].append({"source": "nope", "target": d["nodes"][0]["node_id"], "weight": 1})
    bad["links"][0]["weight"] = float("nan")
    probs = validate(bad)
    assert any("ctx_idx" in x for x in probs) and any("not a node" in x for x in probs)
    assert any("not finite" in x for x in probs)  # an integer weight is valid (Neuronpedia's schema: a number)
