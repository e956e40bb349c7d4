"""MCP wiring: tools, resources, prompts and transports over `tdb_agent.ops`."""

from tdb_agent.server.app import build_server

__all__ = ["build_server"]
