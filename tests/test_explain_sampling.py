"""The MCP client's own model as explainer and reader, through MCP sampling: a real MCP
client session (in-process, handshake protocol, which carries server-to-client requests)
whose sampling callback is scripted; refusals, malformed answers and timeouts; clients
without sampling fall back to the heuristic and say so."""

import asyncio
import json
import re
from types import SimpleNamespace

import pytest
from mcp import Client, types
from mcp.server import MCPServer
from mcp.shared.exceptions import MCPError

from tdb_agent.explain import ExplainerLLM
from tdb_agent.server.sae_tools import register_sae_tools
from tdb_agent.tasks import vocab as V
from tests.test_explain import setup  # noqa: F401  (the tiny model's dataset fixture)

OFF = ExplainerLLM(base_url=None, api_key=None)


def names_reader(prompt: str) -> str:
    """What a model that reads 'fires on names' literally would answer."""
    if "Predict its activation" in prompt:
        toks = re.findall(r"^\d+\t(.*)$", prompt, flags=re.M)
        return json.dumps([10 if t in V.NAMES else 0 for t in toks])
    if "Context 1:" in prompt:
        blocks = re.split(r"^Context \d+:\n", prompt, flags=re.M)[1:]
        return json.dumps([int(any(t.strip("<>") in V.NAMES for t in b.split("\n\n")[0].splitlines()))
                           for b in blocks])
    return "fires on names of people"


def scripted(answer=names_reader, model="scripted-model-1"):
    seen = []

    async def callback(context, params: types.CreateMessageRequestParams):
        prompt = params.messages[-1].content.text
        seen.append(params)
        reply = answer(prompt)
        if isinstance(reply, types.ErrorData):
            return reply
        if isinstance(reply, float):  # sleep, then answer
            await asyncio.sleep(reply)
            reply = names_reader(prompt)
        return types.CreateMessageResult(role="assistant", model=model,
                                         content=types.TextContent(type="text", text=reply))
    return callback, seen


def call(folder, e, tmp_path, args, callback=None, mode="legacy", timeout_s=30.0):
    mcp = MCPServer("t")
    register_sae_tools(mcp, SimpleNamespace(engine=e), dataset=folder, cache_dir=tmp_path, llm=OFF,
                       sampling_timeout_s=timeout_s)

    async def go():
        async with Client(mcp, sampling_callback=callback, mode=mode) as c:
            return await c.call_tool("explain_component", args)
    return asyncio.run(go())


def test_the_clients_model_writes_and_reads_the_explanation(setup, tmp_path):  # noqa: F811
    e, ds, folder, _ = setup
    cb, seen = scripted()
    r = call(folder, e, tmp_path, {"component": "L0.N5", "method": "auto"}, cb)
    assert not r.is_error, r.content
    out = r.structured_content
    assert out["method"] == "llm" and out["explanation"] == "fires on names of people"
    assert out["writer"] == out["simulator"] == "llm:scripted-model-1 (MCP client)"
    # the same prompts as the OpenAI path: the explanation prompt first, then one simulation per
    # held-out example, then batched detection and fuzzing requests
    prompts = [p.messages[-1].content.text for p in seen]
    assert prompts[0].startswith("We are studying a component (L0.N5)")
    top, rand = ds.examples("L0.N5", "top"), ds.examples("L0.N5", "random")
    assert sum("Predict its activation" in p for p in prompts) == len(top[1::2]) + len(rand)
    assert len(prompts) == 1 + out["cost"]["reader_calls"]
    assert all(p.temperature == 0 and p.max_tokens > 0 for p in seen)
    det, fuz, sim = out["scores"]
    assert det["reader"] == "llm:scripted-model-1 (MCP client)" and det["value"] is not None
    assert sim["value"] == pytest.approx(out["score"])


def test_refusal_timeout_and_malformed_answers_fall_back_and_say_so(setup, tmp_path):  # noqa: F811
    e, _, folder, _ = setup
    refuse, _ = scripted(lambda p: types.ErrorData(code=-1, message="User rejected sampling request"))
    r = call(folder, e, tmp_path, {"component": "L0.N6", "method": "auto"}, refuse)
    assert not r.is_error and r.structured_content["method"] == "heuristic"
    assert "declined" in r.structured_content["note"] and "User rejected" in r.structured_content["note"]
    r = call(folder, e, tmp_path, {"component": "L0.N6", "method": "llm"}, refuse)
    assert r.is_error and "declined the sampling request" in r.content[0].text
    slow, _ = scripted(lambda p: 5.0)
    r = call(folder, e, tmp_path, {"component": "L0.N7", "method": "auto"}, slow, timeout_s=0.3)
    assert r.structured_content["method"] == "heuristic" and "did not answer within 0.3 s" in r.structured_content["note"]
    garbage, _ = scripted(lambda p: "   \n")  # an empty explanation
    r = call(folder, e, tmp_path, {"component": "L0.N8", "method": "llm"}, garbage)
    assert r.is_error and "no usable explanation" in r.content[0].text
    # a reader that answers detection and fuzzing in prose: those scores are missing, and say why
    prose, _ = scripted(lambda p: "I think so." if "Context 1:" in p else names_reader(p))
    r = call(folder, e, tmp_path, {"component": "L0.N9", "method": "llm"}, prose)
    det, fuz, sim = r.structured_content["scores"]
    assert det["value"] is None and "malformed" in det["note"] and fuz["value"] is None
    assert sim["value"] is not None and r.structured_content["method"] == "llm"


def test_clients_without_sampling_get_the_heuristic_and_are_told(setup, tmp_path):  # noqa: F811
    e, _, folder, _ = setup
    r = call(folder, e, tmp_path, {"component": "L1.N3"})  # no sampling callback
    assert r.structured_content["method"] == "heuristic"
    assert "does not offer sampling" in r.structured_content["note"]
    r = call(folder, e, tmp_path, {"component": "L1.N3", "method": "llm"})
    assert r.is_error and "does not offer sampling" in r.content[0].text
    cb, seen = scripted()
    r = call(folder, e, tmp_path, {"component": "L1.N3", "method": "heuristic"}, cb)
    assert r.structured_content["note"] is None or "fallback" not in r.structured_content["note"]
    assert not seen  # heuristic never asks the client


@pytest.mark.slow  # two server subprocesses loading the bundled model (~50 s on a shared CPU)
def test_explain_component_over_stdio_with_and_without_sampling(bundled, tmp_path):
    """`tdb-agent serve` (bundled model and dataset) as a subprocess: a client without
    sampling gets the heuristic and is told why; a client with sampling (handshake
    protocol, as today's desktop clients speak) gets its own model's explanation."""
    import os
    import sys

    from mcp import StdioServerParameters

    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "TDB_EXPLAINER_"))}
    params = StdioServerParameters(command=sys.executable, args=["-m", "tdb_agent.cli", "serve"],
                                   env={**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                                        "TDB_WORKSPACE": str(tmp_path / "ws"), "TDB_CACHE_DIR": str(tmp_path)})
    cb, seen = scripted()

    async def go():
        async with Client(params, read_timeout_seconds=120) as c:
            plain = await c.call_tool("explain_component", {"component": "L0.resid.F15"})
        async with Client(params, read_timeout_seconds=120, sampling_callback=cb, mode="legacy") as c:
            sampled = await c.call_tool("explain_component", {"component": "L0.resid.F15"})
        return plain, sampled

    plain, sampled = asyncio.run(go())
    assert not plain.is_error and plain.structured_content["method"] == "heuristic"
    assert "does not offer sampling" in plain.structured_content["note"]
    assert [s["name"] for s in plain.structured_content["scores"]] == ["detection", "fuzzing", "simulation"]
    assert not sampled.is_error, sampled.content
    assert sampled.structured_content["writer"] == "llm:scripted-model-1 (MCP client)" and seen


def rounds_of(seen):
    """The prompts each sampling round carried (the scripted callback records them in order;
    a round's requests are dispatched concurrently, so rounds are told apart by content)."""
    prompts = [p.messages[-1].content.text for p in seen]
    return [p for p in prompts if p.startswith("We are studying")], [p for p in prompts if not p.startswith("We are")]


def test_newest_protocol_asks_in_input_required_rounds(setup, tmp_path):  # noqa: F811
    """2026-07-28: no mid-call requests; the tool returns InputRequiredResult twice (the
    explanation, then every scorer prompt at once), the SDK's client answers each round
    through its sampling callback and calls again; the result says which model wrote and
    scored it, and matches the older protocol's exactly."""
    e, ds, folder, _ = setup
    rounds = []

    cb, seen = scripted()

    async def counting(context, params):
        rounds.append(params.messages[-1].content.text[:20])
        return await cb(context, params)
    r = call(folder, e, tmp_path, {"component": "L0.N5", "method": "auto"}, counting, mode="auto")
    assert not r.is_error, r.content
    out = r.structured_content
    assert out["method"] == "llm" and out["explanation"] == "fires on names of people"
    assert out["writer"] == out["simulator"] == "llm:scripted-model-1 (MCP client)"
    explain, scoring = rounds_of(seen)
    assert len(explain) == 1 and len(scoring) == out["cost"]["reader_calls"]
    assert rounds[0].startswith("We are studying")  # the explanation first, alone
    top, rand = ds.examples("L0.N5", "top"), ds.examples("L0.N5", "random")
    assert sum("Predict its activation" in p for p in scoring) == len(top[1::2]) + len(rand)
    # the same prompts, answers and scores as over the older protocol (mid-call sampling)
    cb2, seen2 = scripted()
    legacy = call(folder, e, tmp_path / "legacy", {"component": "L0.N5", "method": "auto"}, cb2)
    assert sorted(p.messages[-1].content.text for p in seen2) == sorted(p.messages[-1].content.text for p in seen)
    assert legacy.structured_content["scores"] == out["scores"]


def test_newest_protocol_refusal_and_malformed_answers(setup, tmp_path):  # noqa: F811
    e, _, folder, _ = setup
    # a refusal ends the call on the client's side: the SDK's client raises and never calls again
    refuse, _ = scripted(lambda p: types.ErrorData(code=-1, message="User rejected sampling request"))
    with pytest.raises(BaseException) as info:
        call(folder, e, tmp_path, {"component": "L0.N6", "method": "auto"}, refuse, mode="auto")
    refused = info.value.subgroup(lambda x: isinstance(x, MCPError)) if isinstance(info.value, BaseExceptionGroup) \
        else info.value
    assert refused is not None and "User rejected" in repr(refused), info.value
    # an unusable explanation: auto falls back to the heuristic and says why; llm is an error
    garbage, seen = scripted(lambda p: "   \n")
    r = call(folder, e, tmp_path, {"component": "L0.N8", "method": "auto"}, garbage, mode="auto")
    assert not r.is_error and r.structured_content["method"] == "heuristic"
    assert "no usable explanation" in r.structured_content["note"] and len(seen) == 1
    r = call(folder, e, tmp_path, {"component": "L0.N8", "method": "llm"}, garbage, mode="auto")
    assert r.is_error and "no usable explanation" in r.content[0].text
    # a reader answering detection and fuzzing in prose: those scores are missing, and say why
    prose, _ = scripted(lambda p: "I think so." if "Context 1:" in p else names_reader(p))
    r = call(folder, e, tmp_path, {"component": "L0.N9", "method": "llm"}, prose, mode="auto")
    det, fuz, sim = r.structured_content["scores"]
    assert det["value"] is None and "malformed" in det["note"] and fuz["value"] is None
    assert sim["value"] is not None and r.structured_content["writer"] == "llm:scripted-model-1 (MCP client)"


def test_newest_protocol_state_is_sealed(setup, tmp_path):  # noqa: F811
    """The answers so far ride in requestState sealed by the SDK (not readable, not forgeable)."""
    e, _, folder, _ = setup
    mcp = MCPServer("t")
    register_sae_tools(mcp, SimpleNamespace(engine=e), dataset=folder, cache_dir=tmp_path, llm=OFF)
    args = {"component": "L0.N5", "method": "llm"}

    async def go():
        async with Client(mcp, mode="auto", sampling_callback=scripted()[0]) as c:
            first = await c.session.call_tool("explain_component", args, allow_input_required=True)
            assert isinstance(first, types.InputRequiredResult) and len(first.input_requests) == 1
            (key, req), = first.input_requests.items()
            answer = {key: types.CreateMessageResult(role="assistant", model="m", content=types.TextContent(
                type="text", text="fires on names of people"))}
            second = await c.session.call_tool("explain_component", args, input_responses=answer,
                                               request_state=first.request_state, allow_input_required=True)
            assert isinstance(second, types.InputRequiredResult) and len(second.input_requests) > 10
            assert "fires on names" not in second.request_state and "answers" not in second.request_state
            with pytest.raises(MCPError, match="Invalid or expired requestState"):
                await c.session.call_tool("explain_component", args, input_responses=answer,
                                          request_state=second.request_state[:-6] + "AAAAAA", allow_input_required=True)
    asyncio.run(go())


def test_other_calls_run_while_the_clients_model_thinks(setup, tmp_path):  # noqa: F811
    """The engine lock is held for engine work only: while explain_component waits on the
    client's model (a sampling callback that blocks until told), predict completes."""
    from tdb_agent.service.model_tools import TOOLS as MODEL_TOOLS
    from tdb_agent.server.tools import add_tools
    from tdb_agent.workbench import Workbench

    e, _, folder, _ = setup
    mcp = MCPServer("t")
    bench = Workbench(e, workspace=tmp_path / "ws")
    add_tools(mcp, bench, [t for t in MODEL_TOOLS if t.name == "predict"])
    register_sae_tools(mcp, bench, dataset=folder, cache_dir=tmp_path, llm=OFF)

    async def go():
        asked, release = asyncio.Event(), asyncio.Event()
        cb, _ = scripted()

        async def waits(context, params):
            asked.set()
            await release.wait()  # the client's model is thinking
            return await cb(context, params)

        async with Client(mcp, sampling_callback=waits, mode="legacy") as c:
            explaining = asyncio.create_task(c.call_tool("explain_component", {"component": "L0.N5",
                                                                                "method": "llm"}))
            await asyncio.wait_for(asked.wait(), 60)
            assert e.lock.acquire(timeout=5)  # the explainer let go of the engine while it waits
            e.lock.release()
            predicted = await asyncio.wait_for(c.call_tool("predict", {"prompt": "John and Mary went"}), 60)
            assert not predicted.is_error and not explaining.done()
            release.set()
            explained = await asyncio.wait_for(explaining, 120)
        return explained
    out = asyncio.run(go())
    assert not out.is_error and out.structured_content["writer"] == "llm:scripted-model-1 (MCP client)"
