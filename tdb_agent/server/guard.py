"""Refuse tool calls with argument names the tool does not have.

The SDK's argument models ignore unknown fields, so a misspelt optional argument
(`topk=5`) would silently fall back to its default; for an LLM caller a tool error that
lists the valid names is far more useful."""

from __future__ import annotations

from difflib import get_close_matches
from typing import Any

from mcp.server import MCPServer
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.types import CallToolResult, TextContent


class UnknownArgumentGuard:
    """Server middleware (runs before argument validation) for `tools/call`."""

    def __init__(self) -> None:
        self.server: MCPServer | None = None

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        params = ctx.params
        if ctx.method == "tools/call" and self.server is not None and isinstance(params, dict):
            args = params.get("arguments")
            if isinstance(args, dict) and args:
                message = await self._check(str(params.get("name")), args)
                if message:
                    return CallToolResult(content=[TextContent(type="text", text=message)], is_error=True)
        return await call_next(ctx)

    async def _check(self, name: str, args: dict[str, Any]) -> str | None:
        tool = next((t for t in await self.server.list_tools() if t.name == name), None)
        if tool is None:
            return None  # the SDK answers an unknown tool itself
        valid = list((tool.input_schema or {}).get("properties", {}))
        unknown = [a for a in args if a not in valid]
        if not unknown:
            return None
        hints = []
        for a in unknown:
            close = get_close_matches(str(a), valid, n=1)
            hints.append(f"{a!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        return (f"Error executing tool {name}: unknown argument{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(hints)}; valid arguments: {', '.join(valid) or 'none'}")
