"""graph_paths, graph_prune and graph_node's layer/position filters through the SDK's real
MCP client, on a tiny model with random transcoders."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import pytest
import torch
from mcp import Client

from tdb_agent.ops.graph.influence import normalise, prune, square
from tdb_agent.ops.graph.query import col_tid, sq_tid
from tdb_agent.server import build_server
from tdb_agent.service.catalog import GRAPH_TOOLS
from tdb_agent.service.graph_query_tools import SupernodeArgs, graph_supernodes
from tdb_agent.service.graph_tools import GraphArgs, attribution_graph
from tdb_agent.service.tool import Job
from tdb_agent.workbench import Workbench
from tests.test_graph import attached, random_transcoders
from tests.test_server_tools import P


def node_layer_pos(tid: str, n_layers: int, n_pos: int) -> tuple[int, int]:
    """Layer and position read from the id's text (independent of the server's helper)."""
    if tid.startswith("LOGIT"):
        return n_layers, n_pos - 1
    pos = int(tid.rpartition("@")[2])
    m = re.match(r"(?:ERR\.)?L(\d+)\.", tid)
    return (int(m.group(1)) if m else -1), pos


def test_graph_query_tools_over_mcp(tiny_engines, tmp_path):
    e = tiny_engines["gpt2"]
    bench = Workbench(e, workspace=tmp_path)
    n_layers = e.spec.n_layers

    async def go():
        async with Client(build_server(bench)) as c:
            tools = {t.name: t for t in (await c.list_tools()).tools}
            for name in ("graph_paths", "graph_prune", "graph_to_circuit"):
                assert "Example" in tools[name].description and tools[name].output_schema
            r = await c.call_tool("attribution_graph", {"prompt": P, "target": "Mary", "distractor": "John",
                                                        "name": "ioi"})
            assert not r.is_error, r.content
            n_pos = len(r.structured_content["tokens"])
            pr = await c.call_tool("graph_prune", {"name": "ioi", "node_threshold": 0.5, "max_feature_nodes": 3})
            assert not pr.is_error, pr.content
            jsonschema.validate(pr.structured_content, tools["graph_prune"].output_schema)
            pa = await c.call_tool("graph_paths", {"name": "ioi", "k": 4})
            assert not pa.is_error, pa.content
            jsonschema.validate(pa.structured_content, tools["graph_paths"].output_schema)
            full = (await c.call_tool("graph_paths", {"name": "ioi", "k": 4, "pruned": False})).structured_content
            node = (await c.call_tool("graph_node", {"name": "ioi", "node": "LOGIT", "top_k": 200,
                                                     "layer": 1})).structured_content
            node_pos = (await c.call_tool("graph_node", {"name": "ioi", "node": "LOGIT", "top_k": 200,
                                                         "position": n_pos - 1})).structured_content
            sn = await c.call_tool("graph_supernodes", {"name": "ioi", "threshold": 0.5})
            assert not sn.is_error, sn.content
            jsonschema.validate(sn.structured_content, tools["graph_supernodes"].output_schema)
            single = (await c.call_tool("graph_supernodes", {"name": "ioi", "threshold": 1})).structured_content
            one = (await c.call_tool("graph_supernodes", {"name": "ioi", "threshold": -1})).structured_content
            for res in (sn.structured_content, single, one):  # every kept feature in exactly one supernode
                members = [m for x in res["supernodes"] for m in x["members"]]
                assert len(members) == len(set(members)) == res["features"] == pr.structured_content["features"]
            assert len(one["supernodes"]) == 1
            return n_pos, pr.structured_content, pa.structured_content, full, node, node_pos

    with attached(e, random_transcoders(e, n=16)):
        n_pos, pr, pa, full, node, node_pos = asyncio.run(go())
    g = bench.graphs["ioi"]
    sq = square(g)
    p = prune(sq, 0.5, 0.98, 3)
    assert pr["features"] == int(p.node_mask[:sq.n_feat].sum()) <= 3 and pr["max_feature_nodes"] == 3
    assert g.stats["pruning"]["node_threshold"] == 0.5
    # pruned paths use only kept edges; unpruned: strengths are products of Â along the path
    ids = {sq_tid(g, sq, i): i for i in range(sq.A.shape[0])}
    An = normalise(sq.A)
    for path in full["paths"]:
        idx = [ids[n] for n in path["nodes"]]
        assert path["nodes"][0].startswith("EMB@") and path["nodes"][-1] == "LOGIT[Mary - John]"
        prod = 1.0
        for a, b in zip(idx, idx[1:]):
            prod *= float(An[b, a])
        assert path["strength"] == pytest.approx(prod, rel=1e-5)
    assert [x["strength"] for x in full["paths"]] == sorted((x["strength"] for x in full["paths"]), reverse=True)
    for path in pa["paths"]:
        idx = [ids[n] for n in path["nodes"]]
        assert all(bool(p.edge_mask[b, a]) for a, b in zip(idx, idx[1:]))
    # layer filter: exactly the target's inputs at layer 1
    row = g.adjacency[-1]
    expect = {col_tid(g, c): float(row[c]) for c in range(row.numel())
              if float(row[c]) != 0 and node_layer_pos(col_tid(g, c), n_layers, n_pos)[0] == 1}
    assert expect and {x["source"]: x["weight"] for x in node["inputs"]} == pytest.approx(expect)
    assert all(node_layer_pos(x["source"], n_layers, n_pos)[1] == n_pos - 1 for x in node_pos["inputs"])
    assert node_pos["inputs"]


def test_supernodes_labelled_with_shipped_explanations(tiny_engines, tmp_path):
    e = tiny_engines["gpt2"]
    bench = Workbench(e, workspace=tmp_path)
    with attached(e, random_transcoders(e, n=16)):
        attribution_graph(bench, GraphArgs(prompt=P, target="Mary", distractor="John", name="g"), Job())
        before = graph_supernodes(bench, SupernodeArgs(name="g", threshold=1.0), Job())
        first = before.supernodes[0].members[0]
        folder = tmp_path / "ds"
        folder.mkdir()
        (folder / "explanations.json").write_text(json.dumps({first.split("@")[0]: {"explanation": "says hi"}}))
        bench.dataset = SimpleNamespace(folder=folder)  # only its folder is read
        after = graph_supernodes(bench, SupernodeArgs(name="g", threshold=1.0), Job())
    assert before.supernodes[0].label == first
    assert after.supernodes[0].label == "says hi" and after.supernodes[0].explanations == {first: "says hi"}


def test_agent_prompt_names_real_graph_tools():
    """The agent prompt's graph step names tools that exist (a renamed tool breaks it)."""
    text = (Path(__file__).resolve().parent.parent / "prompts" / "agent_system.md").read_text()
    named = set(re.findall(r"\b(graph_[a-z_]+|attribution_graph)\b", text))
    have = {t.name for t in GRAPH_TOOLS}
    assert {"attribution_graph", "graph_intervene", "graph_to_circuit", "graph_paths"} <= named <= have


def test_query_tools_absent_without_dictionaries(tiny_engines, tmp_path):
    async def go():
        async with Client(build_server(Workbench(tiny_engines["gpt2"], workspace=tmp_path))) as c:
            return {t.name for t in (await c.list_tools()).tools}
    names = asyncio.run(go())
    assert not {"graph_paths", "graph_prune", "graph_supernodes", "graph_to_circuit"} & names
    assert "circuit_list" in names


def test_pruning_is_cached_on_the_graph(tiny_engines, tmp_path, monkeypatch):
    """A query prunes a stored graph once per setting: the second query (any tool) does no
    pruning work (no call to influence.prune, no influence series) and answers the same;
    a new setting prunes again, once, and equals a fresh pruning of the graph."""
    from tdb_agent.ops.graph import influence, views
    from tdb_agent.service.graph_circuit import ToCircuitArgs, graph_to_circuit
    from tdb_agent.service.graph_query_tools import PathsArgs, PruneArgs, graph_paths, graph_prune

    e = tiny_engines["gpt2"]
    bench = Workbench(e, workspace=tmp_path)
    calls = []
    real_prune, real_series = influence.prune, influence.influence_rows
    monkeypatch.setattr(influence, "prune", lambda *a, **k: calls.append("prune") or real_prune(*a, **k))
    monkeypatch.setattr(influence, "influence_rows", lambda *a, **k: calls.append("series") or real_series(*a, **k))
    with attached(e, random_transcoders(e, n=16)):
        attribution_graph(bench, GraphArgs(prompt=P, target="Mary", distractor="John", name="g"), Job())
        assert calls.count("prune") == 1
        calls.clear()
        paths = [graph_paths(bench, PathsArgs(name="g", k=4), Job()) for _ in range(2)]
        sup = [graph_supernodes(bench, SupernodeArgs(name="g"), Job()) for _ in range(2)]
        graph_to_circuit(bench, ToCircuitArgs(name="g", circuit="c1"), Job())
        assert calls == [] and paths[0] == paths[1] and sup[0] == sup[1]
        first = graph_prune(bench, PruneArgs(name="g", node_threshold=0.5), Job())
        assert calls.count("prune") == 1
        calls.clear()
        again = graph_prune(bench, PruneArgs(name="g", node_threshold=0.5), Job())
        assert calls == [] and again == first
        g = bench.graphs["g"]
        cached = views.pruned_of(g, 0.5, 0.98)
    fresh = real_prune(square(g), 0.5, 0.98)
    assert all(torch.equal(getattr(cached, f), getattr(fresh, f))
               for f in ("node_mask", "edge_rows", "node_influence", "cumulative"))
