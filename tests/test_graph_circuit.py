"""A pruned attribution graph stored as a circuit hypothesis, through the SDK's real MCP
client: circuit_list lists it, circuit_show shows the graph's kept edges with their weights."""

from __future__ import annotations

import asyncio

import networkx as nx
import pytest
from mcp import Client

from tdb_agent import circuits as C
from tdb_agent.ops.graph import GraphTarget, build_graph
from tdb_agent.ops.graph.export import validate

from tdb_agent.ops.graph.influence import prune, square
from tdb_agent.ops.graph.query import sq_tid
from tdb_agent.server import build_server
from tdb_agent.service.graph_circuit import (
    ToCircuitArgs,
    circuit_node_id,
    graph_to_circuit,
    graph_to_networkx_circuit,
)
from tdb_agent.service.graph_tools import GraphArgs, attribution_graph
from tdb_agent.service.limits import LimitExceeded
from tdb_agent.service.tool import Job
from tdb_agent.workbench import Limits, Workbench
from tests.test_graph import PROMPT, attached, random_resid_saes, random_transcoders
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
            v = await c.call_tool("circuit_validate", {"name": "ioi-feats", "necessity": False})
            assert not v.is_error, v.content  # features ablated (tests/test_feature_circuits.py checks the numbers)
            assert "transcoder feature" in v.structured_content["universe"]
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
    dg = nx.DiGraph(list(got))
    assert all(nx.has_path(dg, n["id"], "LOGITS") for n in shown["nodes"] if n["id"] != "LOGITS")


@pytest.mark.parametrize("family,kind", [("gpt_neox", "plt"), ("llama", "clt"), ("gpt2", "sae")])
def test_graph_circuit_on_families(tiny_engines, family, kind):
    """Parallel-residual (NeoX), cross-layer transcoders (llama) and residual SAE latents: every
    kept edge between nodes with a component id is in the circuit, with the graph's weight."""
    e = tiny_engines[family]
    tcs = None if kind == "sae" else random_transcoders(e, cross_layer=kind == "clt")
    with attached(e, tcs, random_resid_saes(e) if kind == "sae" else None):
        g = build_graph(e, PROMPT, GraphTarget(kind="top", mass=0.5, max_logits=2))
        sq = square(g)
        p = prune(sq, 0.9, 0.99)
        circ = graph_to_networkx_circuit(e, g, sq, p, len(g.rows), "c", "g")
    got = {(s, t): d["weight"] for s, t, d in circ.edges(data=True)}
    sink = sq.A.shape[0] - sq.n_logit
    dg = nx.DiGraph([(s, t) for t, s in p.edge_mask.nonzero().tolist()])
    reach = nx.ancestors(dg, sink) | {sink}
    expect = {}
    for t, s in p.edge_mask.nonzero().tolist():
        a, b = circuit_node_id(sq_tid(g, sq, s)), circuit_node_id(sq_tid(g, sq, t))
        if s in reach and t in reach and t in range(sink + 1) and a and b:
            expect[(a, b)] = float(sq.A[t, s])
    assert got and got == pytest.approx(expect)
    ct = C.to_circuit_tracer(circ, prompt_tokens=g.tokens, prompt=g.prompt, n_layers=e.spec.n_layers)
    assert len(ct["links"]) == len(got)
    assert validate(ct) == []  # Neuronpedia's schema: feature_type is any string (ours: 'mlp block', ...)
    types = {n["tdb_id"]: n["feature_type"] for n in ct["nodes"]}
    assert kind == "sae" or "cross layer transcoder" in types.values()
    assert len({n["node_id"] for n in ct["nodes"]}) == len(ct["nodes"]) == circ.number_of_nodes()
    for f in (C.to_svg, C.to_html, C.to_dot, C.to_graphml):
        assert f(circ)
    if kind == "sae":
        assert "residual error nodes" in circ.graph["description"]
        roles = {d["role"] for n, d in circ.nodes(data=True) if ".MLP@" in n}
        assert roles <= {"MLP output (no transcoder)"} and any(".resid.F" in n for n in circ)
    else:
        assert {d["role"] for n, d in circ.nodes(data=True) if ".MLP@" in n} <= {"transcoder error"}


def test_graph_circuit_over_the_limits_says_how_to_shrink(tiny_engines, tmp_path):
    e = tiny_engines["gpt2"]
    bench = Workbench(e, Limits(max_circuit_edges=3), workspace=tmp_path)
    with attached(e, random_transcoders(e, n=16)):
        attribution_graph(bench, GraphArgs(prompt=P, target="Mary", name="g"), Job())
        with pytest.raises(LimitExceeded, match="max_feature_nodes"):
            graph_to_circuit(bench, ToCircuitArgs(name="g"), Job())
        assert "g" not in bench.circuits
        small = graph_to_circuit(bench, ToCircuitArgs(name="g", node_threshold=0.05, edge_threshold=0.05), Job())
    assert small.edges <= 3 and "g" in bench.circuits
