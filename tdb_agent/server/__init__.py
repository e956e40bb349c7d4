"""MCP wiring: tools, resources, prompts and transports over `tdb_agent.ops`.

`build_server` loads on first use (PEP 562): `tdb-agent serve --transport http` checks its
bind (server/http.py) before loading torch and the model."""

from __future__ import annotations

__all__ = ["build_server"]


def __getattr__(name: str):
    if name != "build_server":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from tdb_agent.server.app import build_server
    return build_server
