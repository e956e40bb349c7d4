"""The circuit tools on an MCP server: wiring only (the tools are `service.circuit_tools`).
A server starting on a workspace loads the circuits saved there first."""

from __future__ import annotations

from mcp.server import MCPServer

from tdb_agent.server.tools import add_tools
from tdb_agent.service.catalog import CIRCUIT_TOOLS
from tdb_agent.service.circuit_tools import circuit_store
from tdb_agent.workbench import Workbench


def register_circuit_tools(mcp: MCPServer, bench: Workbench) -> None:
    circuit_store(bench).load_saved()
    add_tools(mcp, bench, CIRCUIT_TOOLS)
