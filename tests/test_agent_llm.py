"""The LLM loop end to end: real openai client -> local fake OpenAI server over HTTP;
tools through the real MCP client; malformed calls are reported back, never a crash."""

import asyncio
import json

from mcp import Client

from tdb_agent.agent.llm import Budgets, LLMSettings, openai_tools, run_llm_loop, sanitize_tool_name
from tdb_agent.agent.runstore import RunStore
from tdb_agent.server import build_server
from tdb_agent.workbench import Workbench
from tests.fake_openai import FakeOpenAI, text_response, tool_call_response

P = "When Mary and John went to the store , John gave a drink to"


def test_sanitize_names():
    assert sanitize_tool_name("circuit.add/nodes") == "circuit_add_nodes"
    assert len(sanitize_tool_name("x" * 100)) == 64

    class T:
        def __init__(self, name):
            self.name, self.description, self.input_schema = name, "d", {"type": "object"}
    tools, names = openai_tools([T("a.b"), T("a_b")])
    assert [t["function"]["name"] for t in tools] == ["a_b", "a_b_1"] and names == {"a_b": "a.b", "a_b_1": "a_b"}


def test_llm_loop_plays_a_scripted_conversation(gpt2_tiny, tmp_path):
    script = [
        429,  # rate limited once: the client retries with backoff
        tool_call_response([("predict", json.dumps({"prompt": P, "target": "Mary", "distractor": "John"}))]),
        tool_call_response([("no_such_tool", "{}"), ("attribute", "{not json"),
                            ("ablate", json.dumps({"prompt": P, "components": "L0.H1", "target": 5}))]),
        500,  # a server error, retried
        tool_call_response([("attribute", json.dumps({"prompt": P, "target": "Mary", "distractor": "John",
                                                      "top_k": 3}))]),
        text_response("The circuit is L1.H2 -> LOGITS."),
    ]
    server = build_server(Workbench(gpt2_tiny))
    store = RunStore(tmp_path / "run")
    with FakeOpenAI(script) as fake:
        settings = LLMSettings(base_url=fake.url, model="fake-model", api_key="x", max_retries=3)

        async def go():
            async with Client(server) as c:
                return await run_llm_loop(c, store, "Explain IOI on: " + P, settings, Budgets(max_steps=10))
        outcome = asyncio.run(go())

    assert outcome.stopped_because == "answered" and outcome.final_message.startswith("The circuit")
    assert outcome.steps == 4
    # the model saw the tools and every tool result, including the errors
    first = fake.requests[0]
    assert {t["function"]["name"] for t in first["tools"]} >= {"predict", "attribute", "ablate"}
    tool_msgs = [m for m in fake.requests[-1]["messages"] if m["role"] == "tool"]
    assert len(tool_msgs) == 5
    texts = [m["content"] for m in tool_msgs]
    assert "metric" in texts[0]
    assert texts[1].startswith("ERROR: unknown tool 'no_such_tool'")
    assert "not a valid JSON object" in texts[2]
    assert texts[3].startswith("ERROR")  # wrong argument types: the server's validation message
    assert '"rows"' in texts[4]
    # the transcript has every message and tool call
    kinds = [e["kind"] for e in store.events()]
    assert kinds.count("tool_call") == 5 and kinds.count("message") == 2 + 4


def test_llm_loop_respects_the_step_budget(gpt2_tiny, tmp_path):
    script = [tool_call_response([("model_info", "{}")]) for _ in range(5)]
    server = build_server(Workbench(gpt2_tiny))
    with FakeOpenAI(script) as fake:
        settings = LLMSettings(base_url=fake.url, model="m", api_key="x")

        async def go():
            async with Client(server) as c:
                return await run_llm_loop(c, RunStore(tmp_path / "r"), "go", settings, Budgets(max_steps=2))
        outcome = asyncio.run(go())
    assert outcome.stopped_because == "max_steps" and outcome.steps == 2
