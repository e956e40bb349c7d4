"""The MCP server as a real subprocess, talked to by the SDK's real client over stdio."""

import asyncio
import json
import os
import sys

from mcp import Client, StdioServerParameters

from tests.test_server_tools import check_conformance

EXPECTED_TOOLS = {"model_info", "tokenize", "predict", "list_tasks", "attribute", "ablate", "ablation_sweep",
                  "patch", "trace_upstream", "attention_pattern", "steer"}


def _params(model_dir, workspace) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable,
                                 args=["-m", "tdb_agent.cli", "serve", "--model", str(model_dir)],
                                 env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                                      "TDB_WORKSPACE": str(workspace)})


def test_stdio_server_tools(tiny_dirs, tmp_path):
    async def go():
        async with Client(_params(tiny_dirs["gpt2"], tmp_path), read_timeout_seconds=120) as c:
            tools = {t.name: t for t in (await c.list_tools()).tools}
            assert EXPECTED_TOOLS <= set(tools)
            for name in EXPECTED_TOOLS:
                t = tools[name]
                assert t.description and t.input_schema and t.output_schema
                assert t.annotations.read_only_hint is True

            info = await c.call_tool("model_info", {})
            assert not info.is_error
            assert info.structured_content["spec"]["n_layers"] == 2

            toks = await c.call_tool("tokenize", {"text": "The capital of Zorvia is"})
            assert [t["token"] for t in toks.structured_content["tokens"]][0] == "<|endoftext|>"

            pred = await c.call_tool("predict", {"prompt": "When Mary and John went to the store , John gave a drink to",
                                                 "top_k": 5, "target": "Mary", "distractor": "John"})
            assert not pred.is_error
            rows = pred.structured_content["top"]
            assert len(rows) == 5 and {"token", "prob", "logit"} <= set(rows[0])
            assert pred.structured_content["metric"]["name"] == "logit_diff"

            bad = await c.call_tool("predict", {"prompt": "hello", "target": "Mary John"})
            assert bad.is_error
            assert "tokenizes as" in bad.content[0].text

            wrong_type = await c.call_tool("predict", {"prompt": "hello", "top_k": "many"})
            assert wrong_type.is_error

            tasks = await c.call_tool("list_tasks", {})
            names = [t["name"] for t in tasks.structured_content["tasks"]]
            assert names == ["ioi", "induction", "greater_than", "facts"]
            ex = tasks.structured_content["tasks"][0]["examples"][0]
            assert {"prompt", "corrupted_prompt", "target", "distractor"} <= set(ex)
            # the server still serves after errors
            again = await c.call_tool("predict", {"prompt": "hello", "top_k": 3})
            assert not again.is_error and json.loads(again.content[0].text)["top"]

            # conformance of the whole surface over the real stdio transport (stdout carries
            # only protocol messages: a stray print or log line there would break this)
            await check_conformance(c)
            assert "tdb://model" in [str(r.uri) for r in (await c.list_resources()).resources]
            page = json.loads((await c.read_resource("tdb://component/L1.H2")).contents[0].text)
            assert page["kind"] == "head" and page["weights"][0]["norm"] > 0
            assert {"why_prefers", "why_attends"} <= {p.name for p in (await c.list_prompts()).prompts}

    asyncio.run(go())
