"""The circuit_* MCP tools through the SDK's real client (in-process): schemas, annotations,
a whole create -> add -> validate -> prune -> export session checked against direct calls
of tdb_agent.circuits, the workspace files, and clear errors."""

import asyncio
import copy
import json

import jsonschema
import networkx as nx
import pytest
from mcp import Client

from tdb_agent import circuits as C
from tdb_agent.ops.runs import RunCache
from tdb_agent.server import build_server
from tdb_agent.server.circuit_tools import register_circuit_tools
from tdb_agent.workbench import Workbench

TOOLS = {"circuit_create", "circuit_add", "circuit_remove", "circuit_show", "circuit_list", "circuit_validate",
         "circuit_prune", "circuit_export"}
READ_ONLY = {"circuit_show", "circuit_list"}

NODES = [{"id": "L1.H2", "role": "name mover", "explanation": "copies the indirect object", "effect": 0.4,
          "evidence": [{"tool": "attribute", "args": {"prompt": "p"}, "value": 0.4}]},
         {"id": "L0.H1", "role": "duplicate token"}, {"id": "L1.MLP"}, {"id": "L0.H3"}]
EDGES = [{"source": "L0.H1", "target": "L1.H2", "via": "q", "weight": 0.2,
          "evidence": [{"tool": "trace_upstream", "args": {"via": "q"}, "value": 0.2}]},
         {"source": "L1.H2", "target": "LOGITS", "weight": 0.4}]


def make(engine, workspace):
    bench = Workbench(engine, workspace=workspace)
    server = build_server(bench)
    register_circuit_tools(server, bench)
    return bench, server


async def call(c, tools, name, args, ok=True):
    r = await c.call_tool(name, args)
    assert r.is_error is (not ok), (name, r.content)
    if ok:
        jsonschema.validate(r.structured_content, tools[name].output_schema)
        return r.structured_content
    return r.content[0].text


def test_a_whole_session(gpt2_tiny, tmp_path):
    bench, server = make(gpt2_tiny, tmp_path)

    async def go():
        async with Client(server) as c:
            tools = {t.name: t for t in (await c.list_tools()).tools}
            assert TOOLS <= set(tools)
            for name in TOOLS:
                t = tools[name]
                assert t.output_schema and "Example" in t.description, name
                assert t.annotations.read_only_hint is (name in READ_ONLY), name
            made = await call(c, tools, "circuit_create", {"name": "ioi", "task": "ioi", "n_pairs": 3,
                                                           "description": "test"})
            assert [n["id"] for n in made["nodes"]] == ["LOGITS"] and made["behaviour"]["task"] == "ioi"
            shown = await call(c, tools, "circuit_add", {"name": "ioi", "nodes": NODES, "edges": EDGES})
            assert [n["id"] for n in shown["nodes"]] == ["LOGITS", "L1.H2", "L0.H1", "L1.MLP", "L0.H3"]
            assert shown["nodes"][1]["evidence"][0]["tool"] == "attribute"
            edge = next(e for e in shown["edges"] if e["source"] == "L0.H1")
            assert edge["via"] == "q" and edge["evidence"][0]["value"] == 0.2
            assert shown["saved_to"] == "circuits/ioi.json"  # relative to the workspace
            on_disk = C.load(tmp_path / shown["saved_to"])
            assert list(on_disk.nodes(data=True)) == list(bench.circuits["ioi"].nodes(data=True))

            before = copy.deepcopy(bench.circuits["ioi"])
            v = await call(c, tools, "circuit_validate", {"name": "ioi", "mode": "resample"})
            direct = C.validate(gpt2_tiny, before, mode="resample", cache=RunCache(gpt2_tiny))
            assert v["faithfulness"] == pytest.approx(direct.faithfulness, abs=1e-5)
            assert {n["id"]: n["drop"] for n in v["necessity"]} == pytest.approx(
                {n.id: n.drop for n in direct.necessity}, abs=1e-5)
            assert v["mode"] == "resample" and "@t" in v["positions"] and v["n_pairs"] == 3
            held = await call(c, tools, "circuit_validate", {"name": "ioi", "heldout_seed": 7, "necessity": False})
            direct_h = C.validate(gpt2_tiny, before, pairs=C.Behaviour(task="ioi", n=3, seed=7), necessity=False,
                                  cache=RunCache(gpt2_tiny))
            assert held["faithfulness"] == pytest.approx(direct_h.faithfulness, abs=1e-5)
            assert held["behaviour"] == "task ioi (n=3, seed=7)" and held["necessity"] is None
            shown = await call(c, tools, "circuit_show", {"name": "ioi"})
            assert shown["faithfulness"] == pytest.approx(v["faithfulness"])  # held-out runs are not recorded
            assert json.loads((tmp_path / "circuits" / "ioi.json").read_text())["graph"]["faithfulness"] == \
                pytest.approx(v["faithfulness"])

            p = await call(c, tools, "circuit_prune", {"name": "ioi", "threshold": 0.05})
            direct_p = C.prune(gpt2_tiny, before, threshold=0.05, cache=RunCache(gpt2_tiny))
            assert p["kept"] == direct_p.kept and p["saved_as"] == "ioi-pruned" and p["removed"] and p["reached"]
            pruned = await call(c, tools, "circuit_show", {"name": "ioi-pruned"})
            assert [n["id"] for n in pruned["nodes"] if n["id"] != "LOGITS"] == p["kept"]
            assert pruned["faithfulness"] == pytest.approx(p["faithfulness"], abs=1e-3)  # the tiny gap amplifies
            # float noise of different batch shapes
            listed = await call(c, tools, "circuit_list", {})
            assert [x["name"] for x in listed["circuits"]] == ["ioi", "ioi-pruned"]

            for fmt in ["json", "graphml", "dot", "circuit_tracer", "svg", "html"]:
                e = await call(c, tools, "circuit_export", {"name": "ioi", "format": fmt})
                assert open(tmp_path / e["path"]).read() == e["content"]
            exports = tmp_path / "exports" / "circuits" / "ioi"
            assert C.from_json(json.loads(open(exports / "ioi.json").read())).number_of_nodes() == 5
            ct = json.loads(open(exports / "ioi.circuit_tracer.json").read())
            assert ct["metadata"]["prompt_tokens"][0] == gpt2_tiny.str_tokens([gpt2_tiny.tokenizer.bos_token_id])[0]
            assert nx.read_graphml(str(exports / "ioi.graphml")).number_of_edges() == 2

            rm = await call(c, tools, "circuit_remove", {"name": "ioi", "nodes": ["L0.H1"]})
            assert "L0.H1" not in [n["id"] for n in rm["nodes"]] and len(rm["edges"]) == 1
    asyncio.run(go())

    # a restarted server finds the saved circuits in its workspace
    bench2, server2 = make(gpt2_tiny, tmp_path)
    assert sorted(bench2.circuits) == ["ioi", "ioi-pruned"]
    assert "L0.H1" not in bench2.circuits["ioi"]


@pytest.mark.parametrize("name,args,fragment", [
    ("circuit_show", {"name": "nope"}, "no circuit named 'nope'; circuits: base"),
    ("circuit_add", {"name": "base", "nodes": [{"id": "L0.H1"}, {"id": "L9.H1"}]}, "layers are 0..1"),
    ("circuit_add", {"name": "base", "edges": [{"source": "L1.H0", "target": "L0.H0"}]}, "against the residual"),
    ("circuit_add", {"name": "base", "edges": [{"source": "L0.H0", "target": "L1.MLP", "via": "k"}]}, "direct"),
    ("circuit_add", {"name": "base"}, "give nodes and/or edges"),
    ("circuit_create", {"name": "base", "task": "ioi"}, "exists"),
    ("circuit_create", {"name": "a/b", "task": "ioi"}, "bad circuit name"),
    ("circuit_create", {"name": "x", "task": "nope"}, "unknown task"),
    ("circuit_create", {"name": "x"}, "exactly one"),
    ("circuit_create", {"name": "x", "pairs": [{"prompt": "When Mary", "target": "Mary Ann"}]}, "tokenizes as"),
    ("circuit_remove", {"name": "base", "nodes": ["LOGITS"]}, "cannot be removed"),
    ("circuit_validate", {"name": "empty"}, "no behaviour"),
    ("circuit_validate", {"name": "pinned"}, "out of range"),
    ("circuit_prune", {"name": "base", "into": "../x"}, "bad circuit name"),
    ("circuit_export", {"name": "base", "format": "pdf"}, "format"),
])
def test_bad_input_is_a_clear_tool_error(gpt2_tiny, tmp_path, name, args, fragment):
    bench, server = make(gpt2_tiny, tmp_path)
    bench.circuits["empty"] = C.new_circuit("empty")
    pinned = C.new_circuit("pinned", behaviour=C.Behaviour(task="ioi", n=2))
    C.add_node(pinned, "L0.H1@60")
    bench.circuits["pinned"] = pinned

    async def go():
        async with Client(server) as c:
            tools = {t.name: t for t in (await c.list_tools()).tools}
            await call(c, tools, "circuit_create", {"name": "base", "task": "ioi", "n_pairs": 2})
            before = copy.deepcopy(bench.circuits["base"])
            text = await call(c, tools, name, args, ok=False)
            assert fragment in text, text
            after = bench.circuits["base"]  # a failed edit changes nothing
            assert list(after.nodes(data=True)) == list(before.nodes(data=True)) and list(after.edges) == list(
                before.edges)
    asyncio.run(go())
