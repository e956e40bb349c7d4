"""Calling MCP tools from the planner: logged, timed, and replayable for --resume.

Every call is appended to the run transcript. On resume, read-only calls already in the
transcript are answered from it (the planner is deterministic, so it asks the same
questions in the same order), and state-changing calls (every tool whose annotations do not
say read-only: the circuit editors) are sent again, which rebuilds the server's circuit
state in a fresh process.
"""

from __future__ import annotations

import json
import time
from typing import Any

from tdb_agent.agent.runstore import RunStore
from tdb_agent.errors import TdbError


class ToolCallFailed(TdbError):
    pass


class Toolbox:
    def __init__(self, client, store: RunStore, on_step=None):
        self.client = client
        self.store = store
        self.on_step = on_step
        self._replay = [e for e in store.events() if e["kind"] == "tool_call" and not e.get("error")
                        and not e.get("is_error")]
        self.calls = 0
        self.replayed = 0

    async def __call__(self, name: str, /, **args: Any) -> dict:
        """Call a tool; return its structured result; raise ToolCallFailed on a tool error."""
        args = {k: v for k, v in args.items() if v is not None}
        if self._replay:
            prev = self._replay[0]
            if prev["tool"] == name and json.dumps(prev["arguments"], sort_keys=True) == json.dumps(args, sort_keys=True):
                self._replay.pop(0)
                if await self.read_only(name):
                    self.replayed += 1
                    self.calls += 1
                    return prev["result"]
                result = await self._send(name, args, log=False)
                await self._after(name)
                return result
            self._replay = []  # the run diverged: stop replaying
        result = await self._send(name, args, log=True)
        await self._after(name)
        return result

    async def _send(self, name: str, args: dict, log: bool) -> dict:
        t0 = time.time()
        r = await self.client.call_tool(name, args)
        self.calls += 1
        text = "\n".join(getattr(b, "text", "") or "" for b in r.content)
        if log:
            self.store.append("tool_call", tool=name, arguments=args, is_error=r.is_error,
                              seconds=round(time.time() - t0, 4),
                              result=r.structured_content if not r.is_error else text)
        if r.is_error:
            raise ToolCallFailed(f"{name} failed: {text}")
        return r.structured_content if r.structured_content is not None else {"text": text}

    async def _after(self, name: str) -> None:
        if self.on_step is not None:
            await self.on_step(name)

    async def _tools(self) -> dict:
        if not hasattr(self, "_listed"):
            self._listed = {t.name: t for t in (await self.client.list_tools()).tools}
        return self._listed

    async def has(self, name: str) -> bool:
        """Whether the server offers this tool (explanations need a dataset, for example)."""
        return name in await self._tools()

    async def read_only(self, name: str) -> bool:
        """Whether the tool says (in its MCP annotations) that it changes nothing, so that a
        resumed run may answer it from the transcript instead of calling it again."""
        return await read_only(self.client, name, await self._tools())

    def note(self, text: str, **data: Any) -> None:
        self.store.append("note", text=text, **data)


async def read_only(client, name: str, tools: dict | None = None) -> bool:
    """A tool's read-only annotation (False for a tool that does not say, or is unknown)."""
    tools = tools if tools is not None else {t.name: t for t in (await client.list_tools()).tools}
    ann = getattr(tools.get(name), "annotations", None)
    return bool(getattr(ann, "read_only_hint", False))


def replays_on_resume(tool) -> bool:
    """Whether a resumed run must call this tool again to rebuild the server's state: its
    annotations say it changes state and is not idempotent (circuit_create, circuit_add,
    circuit_remove: each call is an edit). Idempotent writers (validation, pruning, export)
    and read-only tools are not replayed."""
    ann = getattr(tool, "annotations", None)
    return ann is not None and ann.read_only_hint is False and ann.idempotent_hint is False
