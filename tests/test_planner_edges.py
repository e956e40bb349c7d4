"""The scripted planner's edge step: the discovered circuit states its edges with the
measurement behind each (EAP-IG score, the edge circuit's faithfulness, CPR, CMD, budget) in
graph.json and report.md; a resumed run asks the same questions; a family the edge methods
refuse gets a note and the run goes on."""

import asyncio
import json
import shutil

import pytest

from evals import constructed
from tdb_agent.agent import discover
from tdb_agent.agent.runstore import RunConfig, RunStore
from tests.test_discover import _interrupt, calls


def _run(cfg: RunConfig, out):
    return asyncio.run(discover.run(cfg, out, echo=lambda m: None))


@pytest.fixture(scope="module")
def induction_cfg(tmp_path_factory):
    """The constructed induction model (L0.H0 -> (k) L1.H1 -> logits) on one prompt pair."""
    case = constructed.build_case("induction", tmp_path_factory.mktemp("constructed"))
    p = constructed.case_pairs("induction", 1)[0]
    return RunConfig(planner="scripted", model=str(case.model_dir), prompt=p.prompt, target=p.target,
                     distractor=p.distractor, corrupted_prompt=p.corrupted_prompt)


@pytest.fixture(scope="module")
def induction_run(induction_cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("edges") / "run"
    return out, _run(induction_cfg, out)


def test_the_circuit_states_its_edges_with_their_measurements(induction_run):
    out, summary = induction_run
    events = [e for e in RunStore(out).events() if e["kind"] == "tool_call"]
    by_tool = {e["tool"]: e for e in events}
    ec, curve = by_tool["edge_circuit"], by_tool["edge_faithfulness"]
    assert ec["arguments"]["method"] == "eap-ig" and ec["arguments"]["reference"] == "corrupted"
    assert len(ec["arguments"]["pairs"]) == 1 and not ec["is_error"] and not curve["is_error"]
    scores = {r["edge"]: r["score"] for r in ec["result"]["edges"]}
    graph = json.loads((out / "graph.json").read_text())
    nodes = {n["id"] for n in graph["nodes"]}
    assert set(summary.nodes) <= nodes and nodes <= set(summary.nodes) | {"LOGITS"}  # no node added by edges
    assert {"L0.H0", "L1.H1"} <= set(summary.nodes)
    stated = {(e["source"], e["target"]): e for e in graph["links"]
              if any(x["tool"] == "edge_circuit" for x in e["evidence"])}
    # the known mechanism's edges, found by EAP-IG and stated on the node circuit
    assert {("L0.H0", "L1.H1"), ("L1.H1", "LOGITS")} <= set(stated)
    assert stated[("L0.H0", "L1.H1")]["via"] == "k"
    # the previous-token head's direct effect is no edge the faithful edge circuit needs: dropped
    links = {(e["source"], e["target"]) for e in graph["links"]}
    assert ec["result"]["faithfulness"] >= 0.8 and ("L0.H0", "LOGITS") not in links
    assert not any(r["source"] == "L0.H0" and r["target"] == "LOGITS" for r in ec["result"]["edges"])
    assert "L0.H0->LOGITS" in (out / "report.md").read_text()
    stated = list(stated.values())
    for e in stated:
        for x in e["evidence"]:
            if x["tool"] == "edge_circuit":  # the score is the one edge_circuit reported for that edge
                assert x["value"] == pytest.approx(scores[x["args"]["edge"]], abs=1e-6)
                src, recv = x["args"]["edge"].split("->")
                assert src == e["source"] and recv.split(".")[:2] == e["target"].split(".")[:2]
        (c,) = [x for x in e["evidence"] if x["tool"] == "edge_faithfulness"]
        assert c["args"]["cpr"] == pytest.approx(curve["result"]["cpr"], abs=1e-4)
        assert c["args"]["cmd"] == pytest.approx(curve["result"]["cmd"], abs=1e-4)
        assert c["value"] == pytest.approx(ec["result"]["faithfulness"], abs=1e-4)
        assert c["args"]["budget"] == pytest.approx(ec["result"]["n_edges"] / ec["result"]["n_edges_total"], abs=1e-6)
    report = (out / "report.md").read_text()
    assert "## Edge circuit" in report and f"CPR {curve['result']['cpr']:.3f}" in report
    assert f"CMD {curve['result']['cmd']:.3f}" in report
    for row in ec["result"]["edges"]:
        assert f"| {row['edge']} | {row['via']} | {row['score']:.4f} |" in report
    # the edge circuit is stored beside the node circuit, with the curve's validation
    ecg = json.loads((out / "workspace" / "circuits" / "prompt-edges.json").read_text())
    assert ecg["graph"]["validation"]["cpr"] == pytest.approx(curve["result"]["cpr"])


def test_a_resumed_run_asks_the_same_edge_questions(induction_cfg, induction_run, tmp_path):
    src, _ = induction_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    uninterrupted = RunStore(out).events()
    n = _interrupt(out, keep_after="edge_circuit")
    _run(induction_cfg, out)
    resumed = RunStore(out).events()
    assert len(resumed) > n and calls(resumed) == calls(uninterrupted)
    stated = [e for e in json.loads((out / "graph.json").read_text())["links"]
              if any(x["tool"] == "edge_circuit" for x in e["evidence"])]
    assert stated


def test_a_model_the_edge_methods_refuse_gets_a_note(tmp_path):
    """A Gemma-2 with an attention output bias before its post-norm (ops/edges/graph.check_supported)."""
    from tests.tiny_models import build_tiny
    model = build_tiny("gemma2", tmp_path / "model", overrides={"attention_bias": True})
    out = tmp_path / "run"
    summary = _run(RunConfig(task="ioi", planner="scripted", model=str(model)), out)
    assert summary.nodes
    report = (out / "report.md").read_text()
    assert "no edge-level analysis" in report and "attention output bias" in report
    assert "## Edge circuit" not in report
