"""The edge tools through the SDK's real client (in-process): edge_attribution,
edge_circuit (stored as a circuit hypothesis, shown by circuit_show, exported) and
edge_faithfulness, checked against direct calls of tdb_agent.ops.edges."""

import asyncio
import json

import pytest
from mcp import Client

from tdb_agent import circuits as C
from tdb_agent.circuits.edges import circuit_edges, keep_mask
from tdb_agent.ops.edges.eap import edge_scores
from tdb_agent.ops.edges.faithfulness import MIB_BUDGETS, evaluate_keeps
from tdb_agent.server import build_server
from tdb_agent.workbench import Workbench
from tests.test_circuits_mcp import call

TOOLS = {"edge_attribution", "edge_circuit", "edge_faithfulness"}


def test_edge_tools_session(gpt2_tiny, tmp_path):
    bench = Workbench(gpt2_tiny, workspace=tmp_path)
    server = build_server(bench)
    pairs = C.Behaviour(task="ioi", n=3).resolve()

    async def go():
        async with Client(server) as c:
            tools = {t.name: t for t in (await c.list_tools()).tools}
            assert TOOLS <= set(tools)
            assert tools["edge_attribution"].annotations.read_only_hint is True
            assert "Example" in tools["edge_circuit"].description

            a = await call(c, tools, "edge_attribution", {"task": "ioi", "n_pairs": 3, "method": "eap", "top_k": 5})
            direct = edge_scores(gpt2_tiny, pairs, method="eap")
            want = direct.ranked(5)
            assert [r["edge"] for r in a["edges"]] == [e for e, _ in want]
            assert [r["score"] for r in a["edges"]] == pytest.approx([s for _, s in want], abs=1e-6)
            assert a["n_edges_total"] == direct.graph.n_edges and a["forward_passes"] == direct.forward_passes == 2
            row = a["edges"][0]
            assert row["edge"].startswith(row["source"] + "->")

            pos = await call(c, tools, "edge_attribution", {"task": "ioi", "n_pairs": 3, "method": "eap",
                                                            "per_position": True, "top_k": 3})
            want = edge_scores(gpt2_tiny, pairs, method="eap", per_position=True).ranked(3)
            assert [r["edge"] for r in pos["edges"]] == [e for e, _ in want] and "@" in want[0][0]

            made = await call(c, tools, "edge_circuit", {"name": "ioi_e", "task": "ioi", "n_pairs": 3,
                                                         "method": "eap", "n_edges": 12})
            assert made["n_edges"] == 12 and len(made["edges"]) == 12
            keep = keep_mask(gpt2_tiny, [e for e, _ in direct.ranked(12)])
            (m,), full, empty, _, _ = evaluate_keeps(gpt2_tiny, pairs, keep)
            assert made["faithfulness"] == pytest.approx(float((m - empty) / (full - empty)), abs=1e-4)
            shown = await call(c, tools, "circuit_show", {"name": "ioi_e"})
            assert shown["faithfulness"] == pytest.approx(made["faithfulness"])
            ev = [e for edge in shown["edges"] for e in edge["evidence"]]
            assert len(ev) >= 12 and all(e["tool"] == "edge_circuit" for e in ev)
            assert {e["args"]["edge"] for e in ev} == {r["edge"] for r in made["edges"]}
            saved = json.loads((tmp_path / "circuits" / "ioi_e.json").read_text())
            assert saved["graph"]["granularity"] == "edge" and len(saved["graph"]["edges"]) == 12
            assert circuit_edges(C.load(tmp_path / "circuits" / "ioi_e.json")) == [r["edge"] for r in made["edges"]]
            for fmt in ["graphml", "dot", "circuit_tracer", "svg"]:
                await call(c, tools, "circuit_export", {"name": "ioi_e", "format": fmt})

            f = await call(c, tools, "edge_faithfulness", {"circuit": "ioi_e", "method": "eap"})
            assert [p["budget"] for p in f["points"]] == list(MIB_BUDGETS)
            # keep-all is the clean run: to float32 rounding of the patched runs (which continue the
            # pairs' shared prefix, attention rounding by batch size), relative to a gap of ~0.03
            assert f["points"][-1]["faithfulness"] == pytest.approx(1.0, abs=1e-4)
            assert f["circuit_faithfulness"] == pytest.approx(made["faithfulness"], abs=1e-5)
            # MIB: CPR under the signed ranking's curve, CMD over |1 - f| of the |score| ranking's,
            # trapezoids over the budgets alone
            trap = lambda pts, y: sum((b["budget"] - a["budget"]) * (y(a) + y(b)) / 2 for a, b in zip(pts, pts[1:]))
            assert f["cpr"] == pytest.approx(trap(f["signed_points"], lambda p: p["faithfulness"]))
            assert f["cmd"] == pytest.approx(trap(f["points"], lambda p: abs(1 - p["faithfulness"])))

            thr = await call(c, tools, "edge_circuit", {"name": "ioi_t", "task": "ioi", "n_pairs": 3,
                                                        "method": "eap", "threshold": 0.7})
            assert thr["faithfulness"] >= 0.7 and 1 <= thr["n_edges"] <= thr["n_edges_total"]
            pr = await call(c, tools, "edge_circuit", {"name": "ioi_p", "task": "ioi", "n_pairs": 3,
                                                       "method": "eap", "threshold": 0.7, "prune": True})
            kept = [r["edge"] for r in pr["edges"]]
            assert set(kept) <= {r["edge"] for r in thr["edges"]} and pr["n_edges"] == len(kept)
            (m,), full, empty, _, _ = evaluate_keeps(gpt2_tiny, pairs, keep_mask(gpt2_tiny, kept))
            f_kept = float((m - empty) / (full - empty))
            assert pr["faithfulness"] == pytest.approx(f_kept, abs=1e-4)
            assert abs(f_kept - thr["faithfulness"]) < 0.05

            err = await call(c, tools, "edge_circuit", {"name": "x", "task": "ioi", "budget": 0.1,
                                                        "threshold": 0.5}, ok=False)
            assert "exactly one of budget" in err
            bench.circuits["nodes"] = C.new_circuit("nodes", behaviour=C.Behaviour(task="ioi", n=2))
            err = await call(c, tools, "edge_faithfulness", {"circuit": "nodes"}, ok=False)
            assert "node circuit" in err
            err = await call(c, tools, "edge_attribution", {"pairs": [{"prompt": "When Mary and John went",
                                                                        "target": "Mary", "distractor": "John"}]},
                             ok=False)
            assert "corrupted_prompt" in err
    asyncio.run(go())


def test_position_aware_edge_circuit_round_trip(gpt2_tiny, tmp_path):
    """edge_circuit(per_position=true) stores edges pinned to positions with their scores as
    evidence; the stored circuit survives a reload and an export, and edge_faithfulness on it
    reproduces the metric of exact position-wise edge patching, computed here by brute force
    in the hand-written model (tests/edge_reference.py)."""
    import torch

    from tests.edge_reference import RefModel
    from tests.test_edges import _pairs, _tensors
    bench = Workbench(gpt2_tiny, workspace=tmp_path)
    server = build_server(bench)
    pairs = _pairs(2)
    payload = [p.model_dump() for p in pairs]
    s = gpt2_tiny.to_tokens(pairs[0].prompt).shape[1]

    async def go():
        async with Client(server) as c:
            tools = {t.name: t for t in (await c.list_tools()).tools}
            made = await call(c, tools, "edge_circuit", {"name": "pos", "pairs": payload, "method": "eap",
                                                         "per_position": True, "n_edges": 10})
            want = edge_scores(gpt2_tiny, pairs, method="eap", per_position=True).ranked(10)
            assert [r["edge"] for r in made["edges"]] == [e for e, _ in want]
            assert made["n_edges_total"] == s * edge_scores(gpt2_tiny, pairs, method="eap").graph.n_edges
            g = C.load(tmp_path / "circuits" / "pos.json")
            assert g.graph["positions"] == s and circuit_edges(g) == [e for e, _ in want]
            ev = [e for _, _, d in g.edges(data=True) for e in d["evidence"]]
            assert {(e["args"]["edge"], e["args"]["position"]) for e in ev} == \
                {(e, int(e.split("@")[1])) for e, _ in want}
            scores = {e: v for e, v in want}
            assert all(e["value"] == pytest.approx(scores[e["args"]["edge"]], abs=1e-6) for e in ev)
            for fmt in ["graphml", "dot", "circuit_tracer"]:
                await call(c, tools, "circuit_export", {"name": "pos", "format": fmt})
            f = await call(c, tools, "edge_faithfulness", {"circuit": "pos", "method": "eap"})
            return made, f, g

    made, f, g = asyncio.run(go())
    assert f["circuit_faithfulness"] == pytest.approx(made["faithfulness"], abs=1e-6)
    # brute force: every (edge, position) not kept reads the corrupted run's sender value
    grp = _tensors(gpt2_tiny, pairs)
    ref = RefModel(gpt2_tiny.model)
    from tdb_agent.ops.edges.graph import EdgeGraph
    graph = EdgeGraph(gpt2_tiny.spec)
    kept = set()
    for e in circuit_edges(g):
        base, t = e.split("@")
        kept.add(graph.parse_edge(base) + (int(t),))
    removed = {(u, r, t) for u, r in graph.valid.nonzero().tolist() for t in range(grp.ids.shape[1])
               if (u, r, t) not in kept}
    with torch.no_grad():
        corr = ref.run(grp.corrupted, grp.target, grp.distractor)[1]
        m = float(ref.run(grp.ids, grp.target, grp.distractor, ref=corr, removed=removed)[0].mean())
    assert f["circuit_metric"] == pytest.approx(m, abs=1e-4)
    assert g.graph["validation"]["metric"] == pytest.approx(m, abs=1e-4)
def test_edge_scores_are_computed_once_per_behaviour_and_model(gpt2_tiny, tmp_path):
    """edge_circuit then edge_faithfulness (and edge_attribution again) on one behaviour score
    the edges once: the second scoring runs no forward or backward pass and gives the same
    numbers; another behaviour or method misses; a weight edited in place empties the cache."""
    import torch

    from evals.cost import count_passes
    from tdb_agent.service.edge_tools import (EdgeAttributionArgs, EdgeCircuitArgs, EdgeFaithfulnessArgs,
                                              edge_attribution, edge_circuit_tool, edge_faithfulness)
    from tdb_agent.service.tool import Job
    bench = Workbench(gpt2_tiny, workspace=tmp_path)
    ig = {"task": "ioi", "n_pairs": 3, "method": "eap-ig", "steps": 3}
    with count_passes() as first:
        made = edge_circuit_tool(bench, EdgeCircuitArgs(name="c", n_edges=10, **ig), Job())
    assert first.backward_passes == 1 and first.forward_passes > 2  # scored (3 steps stacked), then patched runs
    with count_passes() as scoring:
        again = EdgeFaithfulnessArgs(**ig).scores(bench)
    assert scoring.forward_passes == scoring.backward_passes == 0 and again.cached
    direct = edge_scores(gpt2_tiny, C.Behaviour(task="ioi", n=3).resolve(), method="eap-ig", steps=3)
    assert torch.equal(again.scores, direct.scores)  # identical, not merely close
    with count_passes() as curve:
        f = edge_faithfulness(bench, EdgeFaithfulnessArgs(circuit="c", **ig), Job())
    assert curve.backward_passes == 0 and curve.forward_passes == f.forward_passes  # the curve's patched runs only
    assert f.circuit_faithfulness == pytest.approx(made.faithfulness, abs=1e-6)
    with count_passes() as listed:
        a = edge_attribution(bench, EdgeAttributionArgs(top_k=5, **ig), Job())
    assert listed.forward_passes == 0 and a.forward_passes == 0
    assert [r.edge for r in a.edges] == [e for e, _ in direct.ranked(5)]
    with count_passes() as other:  # another method is another entry
        EdgeAttributionArgs(task="ioi", n_pairs=3, method="eap").scores(bench)
    assert other.forward_passes == 2
    with count_passes() as radau:  # so is another quadrature, whose scores are edge_scores' with it
        got = EdgeAttributionArgs(quadrature="radau", **ig).scores(bench)
    assert radau.backward_passes == 1 and not got.cached
    assert torch.equal(got.scores, edge_scores(gpt2_tiny, C.Behaviour(task="ioi", n=3).resolve(), method="eap-ig",
                                               steps=3, quadrature="radau").scores)
    assert not torch.equal(got.scores, direct.scores)
    with torch.no_grad():  # the model changes: nothing cached is served
        p = next(gpt2_tiny.model.parameters())
        p.add_(0.0)
    with count_passes() as after:
        EdgeFaithfulnessArgs(**ig).scores(bench)
    assert after.forward_passes == 2 and len(bench.edge_scores) == 1
