"""Resources (tdb://model, component pages, circuits) and prompts through the real client."""

import asyncio
import json

import networkx as nx
import pytest
import torch
from mcp import Client
from mcp.shared.exceptions import MCPError
from pydantic import BaseModel

from tdb_agent.server import build_server
from tdb_agent.server.prompts import load_templates, parse_template
from tdb_agent.workbench import Workbench


@pytest.fixture(scope="module")
def bench(gpt2_tiny):
    return Workbench(gpt2_tiny)


@pytest.fixture(scope="module")
def server(bench):
    return build_server(bench)


def _read(server, uri: str) -> dict:
    async def go():
        async with Client(server) as c:
            return json.loads((await c.read_resource(uri)).contents[0].text)
    return asyncio.run(go())


def _read_error(server, uri: str) -> str:
    async def go():
        async with Client(server) as c:
            with pytest.raises(MCPError) as e:
                await c.read_resource(uri)
            return str(e.value)
    return asyncio.run(go())


def test_listing(server):
    async def go():
        async with Client(server) as c:
            static = {str(r.uri) for r in (await c.list_resources()).resources}
            templates = {t.uri_template for t in (await c.list_resource_templates()).resource_templates}
            return static, templates
    static, templates = asyncio.run(go())
    assert {"tdb://model", "tdb://circuits"} <= static
    assert {"tdb://component/{id}", "tdb://circuit/{name}"} <= templates


def test_model_resource_equals_model_info(server, gpt2_tiny):
    from tdb_agent import ops
    assert _read(server, "tdb://model") == json.loads(ops.model_info(gpt2_tiny).model_dump_json())


def test_head_page_norms_from_the_weights(server, gpt2_tiny):
    page = _read(server, "tdb://component/L1.H2")
    assert (page["id"], page["kind"], page["layer"], page["index"]) == ("L1.H2", "head", 1, 2)
    assert page["hook_site"] == "blocks.1.attn.hook_z[2]"
    assert "attention_pattern" in page["related_tools"]
    # independently: GPT-2's c_proj is [n_heads*d_head, d_model]; head h owns rows h*d_head..
    w = gpt2_tiny.model.transformer.h[1].attn.c_proj.weight.detach()
    norms = torch.stack([w[h * 8:(h + 1) * 8].norm() for h in range(4)])
    (stats,) = page["weights"]
    assert stats["norm"] == pytest.approx(norms[2].item(), rel=1e-6)
    assert stats["layer_mean_norm"] == pytest.approx(norms.mean().item(), rel=1e-6)
    assert stats["rank_in_layer"] == int((norms > norms[2]).sum())
    assert stats["units_in_layer"] == 4


def test_neuron_page_tokens_it_promotes(server, gpt2_tiny):
    page = _read(server, "tdb://component/L0.N5@3")
    assert page["position"] == 3 and page["kind"] == "neuron"
    (stats,) = page["weights"]
    m = gpt2_tiny.model
    w_out = m.transformer.h[0].mlp.c_proj.weight[5].detach()
    assert stats["norm"] == pytest.approx(w_out.norm().item(), rel=1e-6)
    # direct logit effect of the output direction: centre (LayerNorm), final gain, tied unembedding
    logits = ((w_out - w_out.mean()) * m.transformer.ln_f.weight.detach()) @ m.lm_head.weight.detach().T
    top = logits.topk(3)
    assert [r["token"] for r in stats["promotes"][:3]] == gpt2_tiny.str_tokens(top.indices.tolist())
    assert stats["promotes"][0]["score"] == pytest.approx(top.values[0].item(), abs=1e-5)
    assert stats["suppresses"][0]["score"] == pytest.approx(logits.min().item(), abs=1e-5)


@pytest.mark.parametrize("cid,kind", [("EMB", "emb"), ("LOGITS", "logits"), ("L1.MLP", "mlp"), ("L0.ATTN", "attn")])
def test_other_pages(server, cid, kind):
    page = _read(server, f"tdb://component/{cid}")
    assert page["kind"] == kind and page["weights"] and all(w["norm"] > 0 for w in page["weights"])


@pytest.mark.parametrize("uri,fragment", [
    ("tdb://component/L9.H2", "layers are 0..1"),
    ("tdb://component/L0.N999", "neurons are 0..127"),
    ("tdb://component/L0.resid.F3", "no SAE is loaded"),
    ("tdb://component/banana", "ids look like"),
    ("tdb://circuit/ioi", "no circuit named 'ioi'"),
])
def test_unknown_resources_say_why(server, uri, fragment):
    assert fragment in _read_error(server, uri)


def test_page_sections_extend_pages(gpt2_tiny):
    class Explanation(BaseModel):
        explanation: str
        score: float

    bench = Workbench(gpt2_tiny)
    bench.add_page_section("explanation", lambda c: Explanation(explanation="fires on names", score=0.5)
                           if c.kind == "neuron" else None)
    with pytest.raises(ValueError, match="reserved"):
        bench.add_page_section("weights", lambda c: None)
    server = build_server(bench)
    assert _read(server, "tdb://component/L0.N1")["sections"] == {
        "explanation": {"explanation": "fires on names", "score": 0.5}}
    assert _read(server, "tdb://component/L0.H1")["sections"] == {}


def test_circuit_resource_reads_the_workbench(gpt2_tiny):
    bench = Workbench(gpt2_tiny)
    server = build_server(bench)
    assert _read(server, "tdb://circuits") == {"circuits": []}
    g = nx.DiGraph(behaviour="ioi", faithfulness=0.8)
    g.add_node("L1.H2", effect=1.5)
    g.add_node("LOGITS")
    g.add_edge("L1.H2", "LOGITS", weight=1.5, via="direct")
    bench.circuits["ioi"] = g
    data = _read(server, "tdb://circuit/ioi")
    back = nx.node_link_graph(data, directed=True, edges="links")
    assert nx.utils.graphs_equal(back, g) and back.edges["L1.H2", "LOGITS"]["weight"] == 1.5
    assert _read(server, "tdb://circuits") == {"circuits": [{"name": "ioi", "nodes": 2, "edges": 1}]}
    assert "circuits: ioi" in _read_error(server, "tdb://circuit/nope")


# ------------------------------------------------------------------ prompts
def test_prompts_listed_with_arguments(server):
    async def go():
        async with Client(server) as c:
            return {p.name: p for p in (await c.list_prompts()).prompts}
    prompts = asyncio.run(go())
    assert {"why_prefers", "why_attends", "explain_component", "find_circuit"} <= set(prompts)
    args = {a.name: a.required for a in prompts["why_prefers"].arguments}
    assert args == {"prompt": True, "target": True, "distractor": True, "corrupted_prompt": False}
    assert all(p.description for p in prompts.values())


def test_prompt_renders_arguments_and_optional_lines(server):
    base = {"prompt": "When Mary and John went to the store , John gave a drink to", "target": "Mary",
            "distractor": "John"}

    async def go():
        async with Client(server) as c:
            plain = await c.get_prompt("why_prefers", base)
            full = await c.get_prompt("why_prefers", {**base, "corrupted_prompt": "When Mary and John went to the "
                                                      "store , Tom gave a drink to"})
            with pytest.raises(MCPError, match="needs the argument"):
                await c.get_prompt("why_prefers", {"prompt": "x"})
            with pytest.raises(MCPError, match="unknown argument"):
                await c.get_prompt("why_prefers", {**base, "bogus": "1"})
            return plain.messages[0].content.text, full.messages[0].content.text
    plain, full = asyncio.run(go())
    assert "prefers Mary over John" in plain and base["prompt"] in plain
    assert "{{" not in plain and "corrupted" not in plain.split("Use the tdb-agent")[0]
    assert "Tom gave a drink" in full and "patch(clean_prompt=prompt" in full
    assert "\n\n\n" not in plain


def test_template_checks():
    ok = "---\nname: t\ndescription: d\narg a: first\narg b?: second\n---\nuse {{a}}\n?b: and {{b}}\n"
    t = parse_template(ok)
    assert t.render({"a": "X"}) == "use X\n" and t.render({"a": "X", "b": "Y"}) == "use X\nand Y\n"
    with pytest.raises(ValueError, match="not declared"):
        parse_template("---\nname: t\ndescription: d\n---\n{{x}}")
    with pytest.raises(ValueError, match="never used"):
        parse_template("---\nname: t\ndescription: d\narg a: x\n---\nno placeholders")
    with pytest.raises(ValueError, match="header"):
        parse_template("no header {{a}}")
    assert len(load_templates()) >= 4  # the shipped templates all pass these checks
