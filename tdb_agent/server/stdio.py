"""The stdio transport, answering lines the SDK cannot parse.

The SDK's stdio reader turns a line that is not JSON, or not a JSON-RPC message, into an
exception on the read stream, which the server only logs: the client gets no reply and
waits for its timeout. JSON-RPC 2.0 says such a line gets an error response (-32700 parse
error, -32600 invalid request; id null unless one can be read). `AnswerUnparsable` wraps
the read stream to send that response on the write stream; the SDK is not changed.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
from mcp.server import MCPServer
from mcp.server.stdio import stdio_server
from mcp.shared.message import SessionMessage
from mcp.types import INVALID_REQUEST, PARSE_ERROR, ErrorData, JSONRPCError
from pydantic import ValidationError

log = logging.getLogger(__name__)


def error_reply(e: ValidationError) -> JSONRPCError | None:
    """The JSON-RPC error answering a line that failed to parse as a message (None for a blank line)."""
    errors = e.errors()
    if errors and errors[0]["type"] == "json_invalid":
        if not str(errors[0].get("input", "")).strip():
            return None
        return JSONRPCError(jsonrpc="2.0", id=None, error=ErrorData(code=PARSE_ERROR, message="Parse error: "
                                                                   "the line is not JSON"))
    ids = [x["input"].get("id") for x in errors if isinstance(x.get("input"), dict)]
    rid = next((i for i in ids if isinstance(i, str) or (isinstance(i, int) and not isinstance(i, bool))), None)
    return JSONRPCError(jsonrpc="2.0", id=rid, error=ErrorData(
        code=INVALID_REQUEST, message="Invalid Request: not a JSON-RPC 2.0 message"))


class AnswerUnparsable:
    """The read stream, less the parse failures, which are answered on `write` instead."""

    def __init__(self, read: Any, write: Any):
        self.read, self.write = read, write

    @property
    def last_context(self) -> Any:  # the SDK reads the sender's context from the stream
        return getattr(self.read, "last_context", None)

    def __aiter__(self) -> AnswerUnparsable:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def receive(self) -> Any:
        while True:
            item = await self.read.receive()
            if not isinstance(item, ValidationError):
                return item
            reply = error_reply(item)
            if reply is not None:
                log.warning("answered an unparsable stdin line with %s", reply.error.message)
                try:
                    await self.write.send(SessionMessage(reply))
                except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                    pass

    async def aclose(self) -> None:
        await self.read.aclose()

    def close(self) -> None:
        self.read.close()

    async def __aenter__(self) -> AnswerUnparsable:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


async def serve_stdio(mcp: MCPServer) -> None:
    """`mcp.run("stdio")`, with unparsable lines answered."""
    server = mcp._lowlevel_server  # what MCPServer.run_stdio_async runs; only the read stream differs
    async with stdio_server() as (read, write):
        await server.run(AnswerUnparsable(read, write), write, server.create_initialization_options())


def run_stdio(mcp: MCPServer) -> None:
    anyio.run(serve_stdio, mcp)
