"""Explanations: the heuristic and its offline simulator, the LLM path against a fake
OpenAI-compatible server on loopback (real `openai` client, real HTTP), the disk cache,
and the MCP tools top_examples / explain_component."""

import asyncio
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import numpy as np
import pytest
from mcp import Client
from mcp.server import MCPServer

from tdb_agent.datasets import ActivationDataset, BuildConfig, build, documents_from_corpus
from tdb_agent.datasets.store import Example
from tdb_agent.engine.sae import SAESet
from tdb_agent.explain import Explainer, ExplainerLLM
from tdb_agent.explain.heuristic import correlation, heuristic_explanation, simulate_offline
from tdb_agent.server.sae_tools import register_sae_tools
from tdb_agent.tasks import vocab as V
from tests.test_sae import random_sae


def ex(tokens, acts, pos, **kw):
    return Example(tokens=tokens, token_ids=list(range(len(tokens))), activations=acts, position=pos,
                   activation=acts[pos], document=0, **kw)


def test_heuristic_names_category_and_simulator():
    # names after 'and' fire; other tokens after 'and' do not, nor names elsewhere (much)
    top = [ex(["and", "the", "When", "Mary", "and", "John"], [0, 0, 0, 0.1, 0, 3.0], 5),
           ex(["and", "a", "and", "Anna"], [0, 0, 0, 2.0], 3), ex(["Bob", "and", "Peter"], [0.2, 0, 2.5], 2),
           ex(["gave", "it"], [0.3, 1.0], 1)]
    text, ev = heuristic_explanation(top, boosts=["gave", "to"])
    assert text.startswith("fires on names (e.g. 'John', 'Anna', 'Peter') after 'and'"), text
    assert text.endswith("boosts 'gave', 'to'") and ev["top_tokens"]["John"] == 1
    assert ev["fit"]["reading"].startswith("names") and ev["fit"]["detection"] == 1.0
    sim = simulate_offline(text, ["When", "Mary", "and", "John", "Bob", "store"])
    assert sim == [0, 0.5, 0, 1, 0.5, 0]  # names; 1 after 'and', 0.5 elsewhere
    single = [ex(["the", "store"], [0, 1.0], 1)] * 3
    t2, _ = heuristic_explanation(single)
    assert t2 == "fires on the token 'store' after 'the'"
    assert simulate_offline(t2, ["the", "store", "a", "store"]) == [0, 1, 0, 0.5]
    # contexts by category, and any token after a context (0 without it)
    assert simulate_offline("fires on any token after names", ["Mary", "went", "home", "John", "ran"]) == [0, 1, 0, 0, 1]
    assert simulate_offline("fires on any token after 'the'; attends to 'x'", ["the", "cat", "a", "the"]) == [0, 1, 0, 0]
    heads = [ex(["a", "b", "c"], [0, 0, 1.0], 2, attended_token="b", attended_offset=-1)] * 2
    assert "attends to the previous token" in heuristic_explanation(heads)[0]
    # induction: the query token 'x' attends to the token after its earlier copy
    ind = [ex(["x", "y", "q", "r", "x"], [0, 0, 0, 0, 1.0], 4, attended_token="y", attended_offset=-3)] * 3
    assert "attends to the token after an earlier copy of the current token (induction)" in heuristic_explanation(ind)[0]
    back = [ex(["Mary", "p", "q", "r", "to"], [0, 0, 0, 0, 1.0], 4, attended_token="Mary", attended_offset=-4),
            ex(["John", "p", "q", "r", "s", "to"], [0, 0, 0, 0, 0, 1.0], 5, attended_token="John", attended_offset=-5)]
    assert "attends to names (typically 4 tokens back)" in heuristic_explanation(back)[0]
    assert heuristic_explanation([ex(["a"], [-0.1], 0)])[0] == "rarely or never active on the dataset"
    # no reading fits: the same tokens fire and stay silent at random -> no claim is made
    rng = np.random.default_rng(0)
    noisy = [ex(toks, [float(rng.random() < 0.3) * 2 for _ in toks], 0) for toks in [["the", "cat", "sat", "on"]] * 12]
    noisy = [e.model_copy(update={"position": int(np.argmax(e.activations)), "activation": max(e.activations)})
             for e in noisy]
    refused, ev = heuristic_explanation(noisy)
    assert refused.startswith("no reading fits above chance"), (refused, ev["fit"])
    assert simulate_offline(refused, ["the", "cat"]) == [0, 0]
    a, b = [0, 1, 0, 1, 2], [0.1, 0.9, 0.2, 1.1, 2.5]
    assert correlation(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1])
    assert correlation([1, 1, 1], b[:3]) == 0.0
    # hand-computed Pearson values, independent of the implementation: for x=[1,2,3], y=[1,2,4]
    # the deviations are [-1,0,1] and [-4/3,-1/3,5/3]: cov sum 3, sums of squares 2 and 14/3
    assert correlation([1, 2, 3], [1, 2, 4]) == pytest.approx(3 / (2 * 14 / 3) ** 0.5)
    assert correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert correlation([0, 2, 4, 6], [1, 2, 3, 4]) == pytest.approx(1.0)  # invariant to scale and shift
    # edge cases the function defines: 0 when either side is constant or has fewer than two points
    assert correlation([0.1, 0.9, 0.2], [2, 2, 2]) == 0.0
    assert correlation([5], [3]) == 0.0


@pytest.fixture(scope="module")
def setup(tiny_engines, tmp_path_factory):
    e = tiny_engines["gpt2"]
    saved = e.saes
    e.saes = SAESet()
    e.saes.add(random_sae(e.spec.d_model, 16, "blocks.1.hook_resid_post", seed=9), 2, e.spec.d_model)
    out = tmp_path_factory.mktemp("ds_explain")
    docs = documents_from_corpus(120, 5, e.tokenizer, e.spec.n_ctx)
    build(e, docs, out, BuildConfig(top_k=8, n_random=4, window=10, lead=6, batch_size=16, warmup_docs=32),
          progress=False)
    yield e, ActivationDataset.open(out, e), out, tmp_path_factory.mktemp("cache")
    e.saes = saved


def test_heuristic_score_is_the_correlation_on_held_out_examples(setup):
    e, ds, _, cache = setup
    x = Explainer(e, ds, llm=ExplainerLLM(), cache_dir=cache)
    r = x.explain("L1.resid.F2", "heuristic")
    top, rand = ds.examples("L1.resid.F2", "top"), ds.examples("L1.resid.F2", "random")
    want_text, _ = heuristic_explanation(top[0::2], r.evidence.get("boosts"), ds.examples("L1.resid.F2", "quantile"))
    assert r.explanation == want_text and r.method == "heuristic" and r.simulator == "offline"
    held = top[1::2] + rand
    true = [a for h in held for a in h.activations]
    pred = [a for h in held for a in simulate_offline(want_text, h.tokens)]
    assert r.score == pytest.approx(correlation(pred, true))
    assert r.scored_on == {"top": 4, "random": 4} and len(r.examples) == 8
    again = x.explain("L1.resid.F2", "heuristic")
    assert again.cached and again.score == r.score
    assert Explainer(e, ds, cache_dir=cache, llm=ExplainerLLM()).explain("L1.resid.F2", "heuristic").cached


class FakeLLM(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint: explains every component as firing on names and
    simulates 10 on names, 0 elsewhere."""
    prompts: list[str] = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/v1/chat/completions"
        prompt = body["messages"][-1]["content"]
        FakeLLM.prompts.append(prompt)
        if "Predict its activation" in prompt:
            toks = re.findall(r"^\d+\t(.*)$", prompt, flags=re.M)
            text = json.dumps([10 if t in V.NAMES else 0 for t in toks])
        elif "Context 1:" in prompt:  # detection / fuzzing: 1 for a context holding a name
            blocks = re.split(r"^Context \d+:\n", prompt, flags=re.M)[1:]
            text = json.dumps([int(any(t.strip("<>") in V.NAMES for t in b.split("\n\n")[0].splitlines()))
                               for b in blocks])
        else:
            text = "fires on names of people"
        reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                 "choices": [{"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": text}}],
                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def fake_llm():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeLLM)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    FakeLLM.prompts = []
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def test_llm_explanation_and_simulation_over_http(setup, fake_llm, tmp_path):
    e, ds, _, _ = setup
    settings = ExplainerLLM(base_url=fake_llm, model="fake-model", api_key="k")
    x = Explainer(e, ds, llm=settings, cache_dir=tmp_path)
    comp = "L0.N5"
    r = x.explain(comp, "auto")  # auto = llm when configured
    assert r.method == "llm" and r.explanation == "fires on names of people" and r.simulator == "llm:fake-model"
    top, rand = ds.examples(comp, "top"), ds.examples(comp, "random")
    # the explainer saw the even-ranked top examples, activations on the 0-10 scale
    explain_prompt = FakeLLM.prompts[0]
    peak = max(t.activation for t in top[0::2])
    first = top[0]
    assert f"{first.tokens[first.position].strip()}\t{round(10 * first.activation / peak)}" in explain_prompt
    assert "Example 4:" in explain_prompt and "Example 5:" not in explain_prompt
    held = top[1::2] + rand
    sims = [p for p in FakeLLM.prompts if "Predict its activation" in p]
    assert len(sims) == len(held)  # one simulation per held-out example
    assert len(FakeLLM.prompts) == 1 + r.cost["reader_calls"]  # the explanation + every reader call, counted
    det, fuz, sim = r.scores
    assert (det.name, fuz.name, sim.name) == ("detection", "fuzzing", "simulation")
    assert det.reader == fuz.reader == "llm:fake-model" and r.writer == "llm:fake-model"
    assert det.value is not None and det.calls >= 1 and fuz.calls >= 1 and sim.calls == len(held)
    assert sim.value == pytest.approx(r.score) and det.n == det.n_positive + det.n_negative
    true = [a for h in held for a in h.activations]
    pred = [10.0 if t.strip() in V.NAMES else 0.0 for h in held for t in h.tokens]
    assert r.score == pytest.approx(correlation(pred, true))
    n = len(FakeLLM.prompts)
    assert x.explain(comp, "llm").cached and len(FakeLLM.prompts) == n
    off = Explainer(e, ds, llm=ExplainerLLM(base_url=None, api_key=None), cache_dir=tmp_path)
    assert off.explain(comp, "auto").method == "heuristic"
    with pytest.raises(Exception, match="no LLM is configured"):
        off.explain("L0.N6", "llm")


def test_mcp_tools(setup, tmp_path):
    e, ds, folder, _ = setup
    mcp = MCPServer("t")
    register_sae_tools(mcp, SimpleNamespace(engine=e), dataset=folder, cache_dir=tmp_path,
                       llm=ExplainerLLM(base_url=None, api_key=None))

    async def go():
        async with Client(mcp) as c:
            r = await c.call_tool("top_examples", {"component": "L1.H2", "k": 3})
            assert not r.is_error, r.content
            exs = r.structured_content["examples"]
            assert len(exs) == 3 and all(len(x["tokens"]) == len(x["activations"]) for x in exs)
            maxima = [max(x["activations"]) for x in exs]
            assert maxima == sorted(maxima, reverse=True)
            assert exs[0]["attended_token"] is not None
            want = ds.examples("L1.H2", "top")[0]
            assert exs[0]["tokens"] == want.tokens
            r = await c.call_tool("top_examples", {"component": "L1.resid.F3", "k": 2, "random": True})
            assert r.structured_content["group"] == "random"
            bad = await c.call_tool("top_examples", {"component": "L1.resid.F99"})
            assert bad.is_error and "0..15" in bad.content[0].text
            r = await c.call_tool("explain_component", {"component": "L0.N3", "method": "heuristic"})
            assert not r.is_error and r.structured_content["explanation"].startswith(("fires on", "rarely"))
            assert -1 <= r.structured_content["score"] <= 1

    asyncio.run(go())


def test_component_page_sections(setup, tmp_path):
    from tdb_agent.components import parse_component
    from tdb_agent.workbench import Workbench

    e, ds, folder, _ = setup
    bench = Workbench(e, workspace=tmp_path / "ws")
    register_sae_tools(MCPServer("t"), bench, dataset=folder, cache_dir=tmp_path,
                       llm=ExplainerLLM(base_url=None, api_key=None))
    assert bench.dataset is not None and bench.saes is e.saes
    page = bench.page_sections["top_examples"](parse_component("L1.N4@3"))
    assert page.component == "L1.N4" and len(page.examples) == 5
    assert page.stats.max == pytest.approx(float(ds.a["stats.max"][ds.column("L1.N4")]))
    expl = bench.page_sections["explanation"](parse_component("L1.resid.F2"))
    assert expl["method"] == "heuristic" and expl["explanation"]
    assert bench.page_sections["explanation"](parse_component("L1.MLP")) is None
