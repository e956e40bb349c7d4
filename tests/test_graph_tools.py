"""The attribution-graph tools through the SDK's real MCP client (in-process transport), on
a tiny model with random transcoders: schemas, progress, and the numbers' own sums."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
from mcp import Client

from tdb_agent.ops.graph.export import validate
from tdb_agent.server import build_server
from tdb_agent.workbench import Workbench
from tests.test_graph import attached, random_transcoders
from tests.test_server_tools import P

GRAPH_TOOLS = {"attribution_graph", "graph_node", "graph_edge_heads", "graph_qk", "graph_export", "graph_intervene"}


def test_graph_tools_over_mcp(tiny_engines, tmp_path):
    e = tiny_engines["gpt2"]
    progress = []

    async def on_progress(done, total, message):
        progress.append((done, total))

    async def go(bench):
        async with Client(build_server(bench)) as c:
            tools = {t.name: t for t in (await c.list_tools()).tools}
            assert GRAPH_TOOLS <= set(tools)
            for name in GRAPH_TOOLS:
                assert "Example" in tools[name].description and tools[name].output_schema
            r = await c.call_tool("attribution_graph", {"prompt": P, "target": "Mary", "distractor": "John",
                                                        "name": "ioi", "top_k": 5}, progress_callback=on_progress)
            assert not r.is_error, r.content
            g = r.structured_content
            jsonschema.validate(g, tools["attribution_graph"].output_schema)
            assert g["targets"] == ["Mary - John"] and 0 <= g["replacement_score"] <= 1
            assert 0 <= g["completeness_score"] <= 1 and g["completeness_residual"] < 1e-3
            assert g["paths"] and all(p[-1] == "LOGIT[Mary - John]" for p in g["paths"])
            src = g["top_edges_into_target"][0]["source"]
            nd = await c.call_tool("graph_node", {"name": "ioi", "node": "LOGIT", "top_k": 200})
            assert not nd.is_error, nd.content
            n = nd.structured_content
            jsonschema.validate(n, tools["graph_node"].output_schema)
            # value = bias + every input (top_k covers them all on this tiny graph)
            assert n["bias"] + sum(x["weight"] for x in n["inputs"]) == pytest.approx(n["value"], abs=1e-4)
            out = (await c.call_tool("graph_node", {"name": "ioi", "node": src})).structured_content
            assert any(x["target"] == "LOGIT[Mary - John]" for x in out["outputs"])
            h = await c.call_tool("graph_edge_heads", {"name": "ioi", "source": src, "target": "LOGIT"})
            assert not h.is_error, h.content
            hs = h.structured_content
            jsonschema.validate(hs, tools["graph_edge_heads"].output_schema)
            assert hs["edge"] == pytest.approx(g["top_edges_into_target"][0]["weight"], rel=1e-5)
            for layer in hs["layers"]:  # every head listed (top_k 8 >= 4 heads): heads + bypass = edge
                assert sum(x["weight"] for x in layer["heads"]) + layer["bypass"] == pytest.approx(hs["edge"],
                                                                                                   abs=1e-5)
            q = await c.call_tool("graph_qk", {"name": "ioi", "head": "L1.H2", "query": 14, "key": 2})
            assert not q.is_error, q.content
            qk = q.structured_content
            jsonschema.validate(qk, tools["graph_qk"].output_schema)
            assert qk["total"] == pytest.approx(qk["score"], abs=1e-4) and qk["pairs"]
            x = await c.call_tool("graph_export", {"name": "ioi", "pruned": False})
            assert not x.is_error and x.structured_content["problems"] == []
            data = json.loads(open(x.structured_content["path"]).read())
            assert validate(data) == [] and len(data["nodes"]) == x.structured_content["nodes"]
            feats = [n["id"] for n in g["top_nodes"] if ".tc.F" in n["id"]][:2]
            iv = await c.call_tool("graph_intervene", {"name": "ioi", "nodes": feats})
            assert not iv.is_error, iv.content
            jsonschema.validate(iv.structured_content, tools["graph_intervene"].output_schema)
            assert iv.structured_content["nodes"] == feats and iv.structured_content["measured"] != 0
            bad = await c.call_tool("graph_qk", {"name": "nope", "head": "L1.H2", "query": 3, "key": 2})
            assert bad.is_error and "no attribution graph named 'nope'" in bad.content[0].text
            bad = await c.call_tool("graph_edge_heads", {"name": "ioi", "source": "L9.tc.F1@2"})
            assert bad.is_error and "not an active feature" in bad.content[0].text

    with attached(e, random_transcoders(e, n=16)):
        asyncio.run(go(Workbench(e, workspace=tmp_path)))
    assert progress and progress[-1][0] == progress[-1][1]


def test_graph_tools_absent_without_dictionaries(tiny_engines, tmp_path):
    async def go():
        async with Client(build_server(Workbench(tiny_engines["gpt2"], workspace=tmp_path))) as c:
            names = {t.name for t in (await c.list_tools()).tools}
            assert not GRAPH_TOOLS & names
    asyncio.run(go())
