"""Web wiring of the viewer: the pages (one HTML shell, the browser script routes by path),
the static files, and the JSON API of `viewer.api` under `/api/`. Added as custom routes of
the MCP server's HTTP app, so `tdb-agent serve --transport http` serves the MCP endpoint
and the viewer from one port.

The tool routes (`POST /api/{tool}`, `TOOL_ROUTES`) are the MCP tools themselves: a body is
validated with the tool's argument model, as this server specialises it (same fields,
limits, defaults), and runs through the same `Tool.run` (engine lock, errors). Bodies are
read as a stream and refused (413) as soon as they pass `MAX_BODY`.

Protection is the MCP endpoint's: every request passes the same Host/Origin check
(DNS rebinding) and JSON content type for POSTs; where the server has a bearer token, every
`/api/` request must carry it (the pages hold no data; the browser script sends the token
it was given in the URL fragment `#token=...`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from importlib import resources
from typing import Any

import anyio
from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecurityMiddleware, TransportSecuritySettings
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tdb_agent.errors import TdbError
from tdb_agent.service.catalog import tool
from tdb_agent.service.running import readable
from tdb_agent.service.tool import Tool, specialise
from tdb_agent.viewer import api
from tdb_agent.workbench import Workbench

log = logging.getLogger(__name__)

STATIC = {"app.js": "text/javascript", "style.css": "text/css", "index.html": "text/html"}
PAGES = ["/", "/prompt", "/component/{id}", "/run/{name}", "/circuit/{name}", "/graph/{name}"]
MAX_BODY = 1 << 20
#: the MCP tools the viewer's pages call, each at POST /api/{name}
TOOL_ROUTES = ("predict", "attribute", "ablate", "attention_pattern")


class BodyTooLarge(Exception):
    pass


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    """The request body, read chunk by chunk; refused as soon as it passes `limit` bytes
    (a declared Content-Length over it is refused before reading anything)."""
    declared = request.headers.get("content-length", "")
    if declared.isdecimal() and int(declared) > limit:
        raise BodyTooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def static_file(name: str) -> bytes:
    return resources.files("tdb_agent.viewer").joinpath("static", name).read_bytes()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def tool_body(t: Tool, bench: Workbench) -> type[BaseModel]:
    """What `POST /api/{t.name}` accepts: the tool's argument model with this server's limits,
    exactly what the MCP tool's input schema shows."""
    return specialise(t.args, bench.limits)


def add_viewer_routes(mcp: MCPServer, bench: Workbench, runs: api.RunIndex | None = None, *,
                      security: TransportSecuritySettings | None = None, token_required: bool = False) -> None:
    """Register the viewer on `mcp` (before its HTTP app is built)."""
    runs = runs or api.RunIndex()
    guard = TransportSecurityMiddleware(security) if security is not None else None

    async def checked(request: Request, *, needs_token: bool) -> Response | None:
        if guard is not None:
            bad = await guard.validate_request(request, is_post=request.method == "POST")
            if bad is not None:
                return bad
        user = request.scope.get("user")
        if needs_token and token_required and not getattr(user, "is_authenticated", False):
            return JSONResponse({"error": "this server requires a bearer token: open the viewer as "
                                          "http://HOST:PORT/#token=<token>"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        return None

    def endpoint(method: str, path: str, fn: Callable[[Request, Any], Any],
                 body: type[BaseModel] | None = None) -> None:
        """An /api/ route: check the request, parse the body into `body`, run fn in a worker
        thread (the engine work must not block the MCP sessions), return its JSON."""
        @mcp.custom_route(path, methods=[method], include_in_schema=False)
        async def handler(request: Request) -> Response:
            bad = await checked(request, needs_token=True)
            if bad is not None:
                return bad
            try:
                parsed = None
                if body is not None:
                    parsed = body.model_validate_json(await read_body(request) or b"{}")
                result = await anyio.to_thread.run_sync(lambda: fn(request, parsed))
            except BodyTooLarge:
                return _error(413, f"request body over {MAX_BODY} bytes")
            except ValidationError as e:
                return _error(422, readable(e))
            except api.NotFound as e:
                return _error(404, str(e))
            except (ToolError, TdbError) as e:
                return _error(400, str(e))
            except Exception as e:  # never a bare 500 page: the script shows the message
                log.exception("viewer %s failed", path)
                return _error(500, f"internal error ({type(e).__name__}: {str(e)[:300]})")
            data = result.model_dump(mode="json") if isinstance(result, BaseModel) else result
            return Response(json.dumps(data, default=str), media_type="application/json")

    endpoint("GET", "/api/model", lambda rq, _: api.model_page(bench, runs))
    endpoint("GET", "/api/component/{id}", lambda rq, _: api.component_view(bench, rq.path_params["id"]))
    endpoint("GET", "/api/run/{name}", lambda rq, _: runs.view(rq.path_params["name"]))
    endpoint("GET", "/api/circuit/{name}", lambda rq, _: api.circuit_view(bench, rq.path_params["name"]))
    endpoint("GET", "/api/graph/{name}", lambda rq, _: api.graph_view(bench, rq.path_params["name"]))
    for name in TOOL_ROUTES:
        t: Tool = tool(name)
        endpoint("POST", f"/api/{name}", lambda rq, args, t=t: t.run(bench, args), tool_body(t, bench))

    async def page(request: Request) -> Response:
        bad = await checked(request, needs_token=False)
        return bad or Response(static_file("index.html"), media_type="text/html")

    for path in PAGES:
        mcp.custom_route(path, methods=["GET"], include_in_schema=False)(page)

    @mcp.custom_route("/static/{name}", methods=["GET"], include_in_schema=False)
    async def static(request: Request) -> Response:
        bad = await checked(request, needs_token=False)
        if bad is not None:
            return bad
        name = request.path_params["name"]
        if name not in STATIC:
            return Response("not found", status_code=404)
        return Response(static_file(name), media_type=STATIC[name], headers={"Cache-Control": "no-cache"})
