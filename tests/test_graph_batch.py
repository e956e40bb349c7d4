"""`tdb-agent graphs --batch FILE` without Ray, on the bundled model and its transcoders:
one valid graph JSON per prompt, whose scores are those of a graph built directly, a
summary, and a failed item as a row (the Ray path: tests/test_scaleout.py, slow)."""

from __future__ import annotations

import json

import pytest

from tdb_agent.cli import main
from tdb_agent.engine import Engine
from tdb_agent.engine.transcoder import BUNDLED_TRANSCODERS, attach_transcoders
from tdb_agent.ops.graph import GraphTarget, build_graph
from tdb_agent.ops.graph.export import validate
from tdb_agent.ops.graph.influence import scores, square
from tests.test_graph_bundled import IOI


def test_graph_batch_writes_one_graph_per_prompt(bundled, tmp_path):
    if not BUNDLED_TRANSCODERS.is_dir():
        pytest.skip("the bundled transcoders are not built (python tools/train_transcoders.py)")
    prompt, target, distractor = IOI
    batch = tmp_path / "graphs.jsonl"
    lines = [json.dumps({"prompt": prompt, "target": target, "distractor": distractor, "name": "ioi"}),
             "# a comment line is skipped", json.dumps({"prompt": prompt, "target": "no-such-token-xyz", "name": "ioi"})]
    batch.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    rc = main(["graphs", "--batch", str(batch), "--out", str(out), "--device", "cpu", "--max-feature-nodes", "64"])
    assert rc == 1  # the second item failed
    s = json.loads((out / "summary.json").read_text())
    assert [(r["name"], r["ok"]) for r in s["graphs"]] == [("ioi", True), ("ioi-2", False)]
    assert s["graphs"][1]["error"] and (out / "summary.md").read_text().count("\n| [") == 2
    data = json.loads((out / "ioi.json").read_text())
    assert validate(data) == [] and data["metadata"]["slug"] == "ioi"
    e = Engine.load(device="cpu")
    attach_transcoders(e)
    g = build_graph(e, prompt, GraphTarget(kind="logit_diff", token=target, distractor=distractor),
                    max_feature_nodes=64, batch_size=16)
    rep, comp = scores(square(g))
    assert s["graphs"][0]["replacement_score"] == pytest.approx(rep, abs=1e-5)
    assert s["graphs"][0]["completeness_score"] == pytest.approx(comp, abs=1e-5)
    assert data["metadata"]["replacement_score"] == pytest.approx(rep, abs=1e-5)
