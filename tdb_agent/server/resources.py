"""Resources: `tdb://model`, `tdb://component/{id}` (a component's page), `tdb://circuits`
and `tdb://circuit/{name}`.

A component page reports only what is computed (`workbench.component_page`): the id's parts,
the hook site it reads, statistics of its weights (`ops.weights`), and whatever sections the
workbench's page hooks add (`Workbench.add_page_section`: explanations, top examples)."""

from __future__ import annotations

import json
import logging

import networkx as nx
from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError

from tdb_agent.circuits.io import to_json
from tdb_agent.errors import TdbError
from tdb_agent.service.catalog import tool
from tdb_agent.service.tool import NoArgs
from tdb_agent.workbench import Workbench, component_page

log = logging.getLogger(__name__)


def circuit_json(bench: Workbench, name: str) -> str:
    circuits: dict[str, nx.DiGraph] = getattr(bench, "circuits", None) or {}
    graph = circuits.get(name)
    if graph is None:
        have = ", ".join(sorted(circuits)) or "none exist yet"
        raise ResourceNotFoundError(f"no circuit named {name!r}; circuits: {have}")
    return json.dumps(to_json(graph), default=str)


def register_resources(mcp: MCPServer, bench: Workbench) -> None:
    engine = bench.engine

    @mcp.resource("tdb://model", name="model", mime_type="application/json",
                  description="The loaded model (what the model_info tool returns): architecture, sizes, device, "
                              "component id grammar, SAEs and datasets.")
    def model() -> str:
        with engine.lock:
            return tool("model_info").call(bench, NoArgs()).model_dump_json()

    @mcp.resource("tdb://component/{id}", name="component", mime_type="application/json",
                  description="A component's page: kind, layer, hook site, weight statistics (norms, rank in its "
                              "layer; for neurons the tokens its output weights promote and suppress), and "
                              "explanations and top examples where they exist. Example: tdb://component/L1.H2")
    def component(id: str) -> str:  # noqa: A002 (the URI variable's name)
        try:
            with engine.lock:
                return component_page(bench, id).model_dump_json()
        except TdbError as e:
            raise ResourceNotFoundError(str(e)) from e

    @mcp.resource("tdb://circuits", name="circuits", mime_type="application/json",
                  description="Names of the circuit hypotheses built in this session, with node and edge counts.")
    def circuits() -> str:
        graphs: dict[str, nx.DiGraph] = getattr(bench, "circuits", None) or {}
        return json.dumps({"circuits": [{"name": n, "nodes": g.number_of_nodes(), "edges": g.number_of_edges()}
                                        for n, g in sorted(graphs.items())]})

    @mcp.resource("tdb://circuit/{name}", name="circuit", mime_type="application/json",
                  description="A circuit hypothesis graph as networkx node-link JSON (nodes, links and the evidence "
                              "on each). Example: tdb://circuit/ioi")
    def circuit(name: str) -> str:
        try:
            return circuit_json(bench, name)
        except ResourceError:
            raise
        except Exception as e:  # a graph attribute that does not serialise
            log.exception("circuit %s could not be serialised", name)
            raise ResourceError(f"circuit {name!r} could not be serialised: {e}") from e
