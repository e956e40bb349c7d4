"""The LLM agent loop: an OpenAI-compatible chat model calling the MCP tools.

Chat completions with tools is the one API that vLLM, Ollama, llama.cpp and OpenAI all
serve, so that is what the loop speaks (through the `openai` client, which also retries
rate limits and server errors with backoff). Tools are the MCP server's, listed over an
MCP client session and converted to function tools; results go back as text. A malformed
call (unknown tool, bad JSON, wrong arguments) is answered with an error message the model
can act on, never a crash. Every message and tool call is appended to the run transcript,
which is also what `--resume` rebuilds the conversation from.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable

from pydantic import BaseModel, Field

from tdb_agent import PROMPTS
from tdb_agent.agent.runstore import RunStore

log = logging.getLogger(__name__)

MAX_RESULT_CHARS = 12000


class LLMSettings(BaseModel):
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint (env OPENAI_BASE_URL)")
    model: str = Field("gpt-4o-mini", description="model name (env TDB_AGENT_LLM_MODEL)")
    api_key: str | None = Field(None, description="API key (env OPENAI_API_KEY); local servers take any")
    max_retries: int = 5
    timeout_s: float = 120.0

    @classmethod
    def from_env(cls, **overrides) -> "LLMSettings":
        values = {"base_url": os.environ.get("OPENAI_BASE_URL"),
                  "model": os.environ.get("TDB_AGENT_LLM_MODEL", "gpt-4o-mini"),
                  "api_key": os.environ.get("OPENAI_API_KEY")}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


class Budgets(BaseModel):
    max_steps: int = Field(40, description="LLM turns")
    max_tokens: int = Field(400_000, description="total tokens reported by the API")
    max_seconds: float = Field(1800, description="wall-clock time")


class LoopOutcome(BaseModel):
    steps: int
    tokens: int
    seconds: float
    stopped_because: str
    final_message: str | None = None


def sanitize_tool_name(name: str) -> str:
    """Function names must match [a-zA-Z0-9_-]{1,64}."""
    return (re.sub(r"[^a-zA-Z0-9_-]", "_", name) or "tool")[:64]


def openai_tools(mcp_tools) -> tuple[list[dict], dict[str, str]]:
    """MCP tools -> chat-completions function tools, and sanitized name -> MCP name."""
    tools, names = [], {}
    for t in mcp_tools:
        safe = sanitize_tool_name(t.name)
        base, i = safe, 1
        while safe in names:  # keep names unique after sanitising
            suffix = f"_{i}"
            safe = base[: 64 - len(suffix)] + suffix
            i += 1
        names[safe] = t.name
        tools.append({"type": "function", "function": {
            "name": safe, "description": (t.description or "")[:1024],
            "parameters": t.input_schema or {"type": "object", "properties": {}}}})
    return tools, names


def result_text(result) -> str:
    parts = [getattr(b, "text", None) for b in result.content]
    text = "\n".join(p for p in parts if p) or json.dumps(result.structured_content)
    if result.is_error:
        text = "ERROR: " + text
    return text[:MAX_RESULT_CHARS]


def system_prompt() -> str:
    return (PROMPTS / "agent_system.md").read_text()


def rebuild_messages(store: RunStore) -> list[dict]:
    """The conversation so far, from the transcript (for --resume)."""
    return [e["message"] for e in store.events() if e["kind"] in ("message", "tool_result") and "message" in e]


async def run_llm_loop(client, store: RunStore, goal: str, settings: LLMSettings, budgets: Budgets,
                       on_tool_result: Callable[[str, dict, object], Awaitable[None]] | None = None) -> LoopOutcome:
    """Drive the MCP tools with the LLM until it answers without a tool call or a budget ends.

    client: an open `mcp.Client`. on_tool_result(name, args, result) is awaited after each
    tool call (the discover command checkpoints the graph there)."""
    from openai import AsyncOpenAI

    llm = AsyncOpenAI(base_url=settings.base_url, api_key=settings.api_key or "not-needed",
                      max_retries=settings.max_retries, timeout=settings.timeout_s)
    tools, names = openai_tools((await client.list_tools()).tools)
    messages = rebuild_messages(store)
    if not messages:
        for m in ({"role": "system", "content": system_prompt()}, {"role": "user", "content": goal}):
            messages.append(m)
            store.append("message", message=m)
    start, tokens, steps = time.time(), 0, 0
    final = None
    reason = "max_steps"
    while steps < budgets.max_steps:
        if time.time() - start > budgets.max_seconds:
            reason = "max_seconds"
            break
        if tokens > budgets.max_tokens:
            reason = "max_tokens"
            break
        t0 = time.time()
        resp = await llm.chat.completions.create(model=settings.model, messages=messages, tools=tools)
        steps += 1
        tokens += resp.usage.total_tokens if resp.usage else 0
        msg = resp.choices[0].message
        out = {"role": "assistant", "content": msg.content or ""}
        if msg.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                 for c in msg.tool_calls]
        messages.append(out)
        store.append("message", message=out, seconds=time.time() - t0,
                     usage=resp.usage.model_dump() if resp.usage else None)
        if not msg.tool_calls:
            final, reason = msg.content, "answered"
            break
        for call in msg.tool_calls:
            text, name, args, ok = await _call_tool(client, names, call.function.name, call.function.arguments,
                                                    store, on_tool_result)
            tool_msg = {"role": "tool", "tool_call_id": call.id, "content": text}
            messages.append(tool_msg)
            store.append("tool_result", message=tool_msg, tool=name, ok=ok)
    return LoopOutcome(steps=steps, tokens=tokens, seconds=time.time() - start, stopped_because=reason,
                       final_message=final)


async def _call_tool(client, names: dict[str, str], fn_name: str, raw_args: str | None, store: RunStore,
                     on_tool_result) -> tuple[str, str | None, dict | None, bool]:
    name = names.get(fn_name)
    if name is None:
        text = f"ERROR: unknown tool {fn_name!r}. Available tools: {', '.join(sorted(names))}"
        store.append("tool_call", tool=fn_name, arguments=raw_args, error=text)
        return text, None, None, False
    try:
        args = json.loads(raw_args or "{}")
        if not isinstance(args, dict):
            raise ValueError("arguments must be a JSON object")
    except ValueError as e:
        text = f"ERROR: the arguments of {fn_name} are not a valid JSON object ({e}); got: {raw_args!r}"
        store.append("tool_call", tool=name, arguments=raw_args, error=text)
        return text, name, None, False
    t0 = time.time()
    result = await client.call_tool(name, args)
    text = result_text(result)
    store.append("tool_call", tool=name, arguments=args, is_error=result.is_error, seconds=time.time() - t0,
                 result=result.structured_content if not result.is_error else text)
    if on_tool_result is not None and not result.is_error:
        await on_tool_result(name, args, result)
    return text, name, args, not result.is_error
