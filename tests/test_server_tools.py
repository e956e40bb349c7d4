"""Every tool through the SDK's real client (in-process transport): schemas, structured
results that validate against the output schema, images, progress, and tool errors."""

import asyncio

import jsonschema
import pytest
from mcp import Client

from tdb_agent.server import build_server
from tdb_agent.workbench import Workbench

P = "When Mary and John went to the store , John gave a drink to"
C = "When Mary and John went to the store , Tom gave a drink to"
TOOLS = {"model_info", "tokenize", "predict", "list_tasks", "attribute", "ablate", "ablation_sweep", "patch",
         "trace_upstream", "attention_pattern", "steer"}

CALLS = {
    "model_info": {},
    "tokenize": {"text": P},
    "predict": {"prompt": P, "target": "Mary", "distractor": "John"},
    "list_tasks": {},
    "attribute": {"prompt": P, "target": "Mary", "distractor": "John", "kinds": ["head", "mlp"], "top_k": 5},
    "ablate": {"prompt": P, "components": ["L0.H1", "L1.N3@4"], "target": "Mary", "distractor": "John",
               "mode": "mean"},
    "ablation_sweep": {"prompt": P, "kind": "head", "target": "Mary", "distractor": "John", "positions": "last"},
    "patch": {"clean_prompt": P, "corrupted_prompt": C, "components": ["L1.H2"], "target": "Mary",
              "distractor": "John"},
    "trace_upstream": {"prompt": P, "component": "L1.H2@14", "via": "q"},
    "attention_pattern": {"prompt": P, "component": "L1.H2"},
    "steer": {"prompt": P, "component": "L0.N5", "scale": 4.0, "max_new_tokens": 3},
    "logit_lens": {"prompt": P, "top_k": 3, "target": "Mary", "positions": [-1, 3]},
    "direct_logit_attribution": {"prompt": P, "component": "L1.H2", "target": "Mary", "distractor": "John"},
    # circuit tools (tdb_agent/server/circuit_tools.py), in the order a session uses them
    "circuit_create": {"name": "conformance", "task": "ioi", "n_pairs": 2, "overwrite": True},
    "circuit_add": {"name": "conformance", "nodes": [{"id": "L1.H2", "role": "mover"}, {"id": "L0.H1"}],
                    "edges": [{"source": "L0.H1", "target": "L1.H2", "via": "q", "weight": 0.1},
                              {"source": "L1.H2", "target": "LOGITS", "weight": 0.3}]},
    "circuit_show": {"name": "conformance"},
    "circuit_list": {},
    "circuit_validate": {"name": "conformance", "necessity": False},
    "circuit_prune": {"name": "conformance", "threshold": 0.5, "into": "conformance-pruned"},
    "circuit_export": {"name": "conformance", "format": "dot"},
    "circuit_remove": {"name": "conformance", "nodes": ["L0.H1"]},
    # edge tools (tdb_agent/service/edge_tools.py)
    "edge_attribution": {"task": "ioi", "n_pairs": 2, "method": "eap", "top_k": 5},
    "edge_circuit": {"name": "conformance-edges", "task": "ioi", "n_pairs": 2, "method": "eap", "n_edges": 8,
                     "overwrite": True},
    "edge_faithfulness": {"task": "ioi", "n_pairs": 2, "method": "eap-ig", "steps": 2, "budgets": [0.1, 0.5, 1.0]},
}


async def check_conformance(c: Client) -> dict:
    """tools/list shows every tool with a description (with an example), input and output
    schemas and annotations; each tool's structured result validates against its output
    schema. Shared by the in-process, stdio and HTTP tests; returns the results."""
    tools = {t.name: t for t in (await c.list_tools()).tools}
    assert TOOLS <= set(tools), TOOLS - set(tools)
    untested = set(tools) - set(CALLS)
    assert not untested, f"add an example call for the new tool(s) {untested} to CALLS in tests/test_server_tools.py"
    results = {}
    for name, t in tools.items():
        assert t.description and "Example" in t.description, name
        assert t.input_schema.get("type") == "object" and "properties" in t.input_schema, name
        assert t.output_schema and t.output_schema.get("type") == "object", name
        assert t.annotations is not None and t.annotations.read_only_hint is not None, name
        if name in TOOLS:
            assert t.annotations.read_only_hint is True and t.annotations.destructive_hint is False, name
    for name, args in CALLS.items():  # in order: later calls may build on earlier ones
        r = await c.call_tool(name, args)
        assert not r.is_error, (name, r.content)
        jsonschema.validate(r.structured_content, tools[name].output_schema)
        results[name] = r
    return results


@pytest.fixture(scope="module")
def server(gpt2_tiny, tmp_path_factory):
    return build_server(Workbench(gpt2_tiny, workspace=tmp_path_factory.mktemp("workspace")))


def test_every_tool_validates_against_its_schema(server):
    async def go():
        async with Client(server) as c:
            await check_conformance(c)
    asyncio.run(go())


def test_contract_fields(server):
    async def go():
        async with Client(server) as c:
            a = (await c.call_tool("attribute", CALLS["attribute"])).structured_content
            assert "metric" in a and {"id", "kind", "effect", "share"} <= set(a["rows"][0])
            ab = (await c.call_tool("ablate", CALLS["ablate"])).structured_content
            assert {"before", "after", "delta"} <= set(ab)
            sw = (await c.call_tool("ablation_sweep", CALLS["ablation_sweep"])).structured_content
            assert {"id", "delta"} <= set(sw["rows"][0])
            tr = (await c.call_tool("trace_upstream", CALLS["trace_upstream"])).structured_content
            assert {"source", "target", "weight", "via"} <= set(tr["edges"][0])
            img = await c.call_tool("attention_pattern", CALLS["attention_pattern"])
            assert any(getattr(b, "type", "") == "image" and b.mime_type == "image/png" for b in img.content)
    asyncio.run(go())


def test_sweep_reports_progress(server):
    seen = []

    async def on_progress(progress, total, message):
        seen.append((progress, total))

    async def go():
        async with Client(server) as c:
            r = await c.call_tool("ablation_sweep", {**CALLS["ablation_sweep"], "kind": "neuron", "positions": "all"},
                                  progress_callback=on_progress)
            assert not r.is_error
    asyncio.run(go())
    assert seen and seen[-1][0] == seen[-1][1]


@pytest.mark.parametrize("name,args,fragment", [
    ("ablate", {"prompt": P, "components": ["L9.H1"], "target": "Mary", "distractor": "John"}, "layers are 0..1"),
    ("ablate", {"prompt": P, "components": ["L0.H1"], "target": "Mary Ann", "distractor": "John"}, "tokenizes as"),
    ("attribute", {"prompt": P, "target": "Mary", "distractor": "John", "method": "magic"}, "method"),
    ("patch", {"clean_prompt": P, "corrupted_prompt": "short", "components": ["L0.H1"], "target": "Mary",
               "distractor": "John"}, "same length"),
    ("trace_upstream", {"prompt": P, "component": "L1.H2@99"}, "out of range"),
    ("ablation_sweep", {"prompt": P, "kind": "head", "target": "Mary", "mode": "resample"}, "corrupted_prompt"),
    ("predict", {"prompt": " ".join(["the"] * 100)}, "context"),
])
def test_bad_input_is_a_clear_tool_error(server, name, args, fragment):
    async def go():
        async with Client(server) as c:
            r = await c.call_tool(name, args)
            assert r.is_error
            assert fragment in r.content[0].text, r.content[0].text
            ok = await c.call_tool("predict", {"prompt": P, "top_k": 2})
            assert not ok.is_error
    asyncio.run(go())
