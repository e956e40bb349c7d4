"""A pruned attribution graph stored as a circuit hypothesis, through the SDK's real MCP
client: circuit_list lists it, circuit_show shows the graph's kept edges with their weights."""

from __future__ import annotations

import asyncio

import pytest
from mcp import Client

from tdb_agent.ops.graph.influence import prune, square
from tdb_agent.ops.graph.query import sq_tid
from tdb_agent.server import build_server
from tdb_agent.service.graph_circuit import circuit_node_id
from tdb_agent.workbench import Workbench
from tests.test_graph import attached, random_transcoders
from tests.test_server_tools import P


def test_circuit_node_ids():
    assert circuit_node_id("ERR.L1.mlp@4") == "L1.MLP@4"
    assert circuit_node_id("ERR.L1.resid@4") is None
    assert circuit_node_id("L0.tc.F3@2") == "L0.tc.F3@2" and circuit_node_id("LOGIT[a - b]") == "LOGITS"


def test_graph_to_circuit_over_mcp(tiny_engines, tmp_path):
    e = tiny_engines["gpt2"]
    bench = Workbench(e, workspace=tmp_path)

    async def go():
        async with Client(build_server(bench)) as c:
            r = await c.call_tool("attribution_graph", {"prompt": P, "target": "Mary", "distractor": "John",
                                                        "name": "ioi", "node_threshold": 0.9})
            assert not r.is_error, r.content
            r = await c.call_tool("graph_to_circuit", {"name": "ioi", "circuit": "ioi-feats"})
            assert not r.is_error, r.content
            made = r.structured_content
            listed = (await c.call_tool("circuit_list", {})).structured_content["circuits"]
            assert any(x["name"] == "ioi-feats" for x in listed)
            shown = (await c.call_tool("circuit_show", {"name": "ioi-feats"})).structured_content
            again = await c.call_tool("graph_to_circuit", {"name": "ioi", "circuit": "ioi-feats"})
            assert again.is_error and "exists" in again.content[0].text
            return made, shown

    with attached(e, random_transcoders(e, n=16)):
        made, shown = asyncio.run(go())
    g = bench.graphs["ioi"]
    sq = square(g)
    p = prune(sq, 0.9, 0.98)
    # the graph's kept edges (square indices -> circuit ids), weights as the graph has them
    expect = {}
    for t, s in p.edge_mask.nonzero().tolist():
        src, dst = circuit_node_id(sq_tid(g, sq, s)), circuit_node_id(sq_tid(g, sq, t))
        expect[(src, dst)] = float(sq.A[t, s])
    got = {(x["source"], x["target"]): x["weight"] for x in shown["edges"]}
    assert got and made["edges"] == len(got)
    for k, w in got.items():
        assert w == pytest.approx(expect[k], rel=1e-6, abs=1e-7)
    assert any(k[1] == "LOGITS" for k in got)
    kinds = {n["kind"] for n in shown["nodes"]}
    assert "transcoder" in kinds and "emb" in kinds
    feat = next(n for n in shown["nodes"] if n["kind"] == "transcoder")
    ev = feat["evidence"][0]
    assert ev["tool"] == "attribution_graph" and ev["value"]["activation"] > 0
    assert shown["behaviour"]["pairs"][0]["prompt"] == P and shown["metric"] == "logit_diff"
    # every circuit node other than the sink reaches LOGITS through the circuit's edges
    import networkx as nx
    dg = nx.DiGraph(list(got))
    assert all(nx.has_path(dg, n["id"], "LOGITS") for n in shown["nodes"] if n["id"] != "LOGITS")
