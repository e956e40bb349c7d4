"""Calling MCP tools from the planner: logged, timed, and replayable for --resume.

Every call is appended to the run transcript. On resume, read-only calls already in the
transcript are answered from it (the planner is deterministic, so it asks the same
questions in the same order), and state-changing calls (the circuit_* editors) are sent
again, which rebuilds the server's circuit state in a fresh process.
"""

from __future__ import annotations

import json
import time
from typing import Any

from tdb_agent.agent.runstore import RunStore
from tdb_agent.errors import TdbError

EDITING_TOOLS = ("circuit_create", "circuit_add", "circuit_prune", "circuit_validate", "circuit_export")


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
                if name not in EDITING_TOOLS:
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

    async def has(self, name: str) -> bool:
        """Whether the server offers this tool (explanations need a dataset, for example)."""
        if not hasattr(self, "_names"):
            self._names = {t.name for t in (await self.client.list_tools()).tools}
        return name in self._names

    def note(self, text: str, **data: Any) -> None:
        self.store.append("note", text=text, **data)
