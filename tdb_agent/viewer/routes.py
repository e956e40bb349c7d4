"""Web wiring of the viewer: the pages (one HTML shell, the browser script routes by path),
the static files, and the JSON API of `viewer.api` under `/api/`. Added as custom routes of
the MCP server's HTTP app, so `tdb-agent serve --transport http` serves the MCP endpoint
and the viewer from one port.

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
from tdb_agent.viewer import api
from tdb_agent.workbench import Workbench

log = logging.getLogger(__name__)

STATIC = {"app.js": "text/javascript", "style.css": "text/css", "index.html": "text/html"}
PAGES = ["/", "/prompt", "/component/{id}", "/run/{name}", "/circuit/{name}"]
MAX_BODY = 1 << 20


def static_file(name: str) -> bytes:
    return resources.files("tdb_agent.viewer").joinpath("static", name).read_bytes()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


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
                    raw = await request.body()
                    if len(raw) > MAX_BODY:
                        return _error(413, f"request body over {MAX_BODY} bytes")
                    parsed = body.model_validate_json(raw or b"{}")
                result = await anyio.to_thread.run_sync(lambda: fn(request, parsed))
            except ValidationError as e:
                return _error(422, "; ".join(f"{'.'.join(map(str, x['loc'])) or 'body'}: {x['msg']}"
                                             for x in e.errors()))
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
    endpoint("POST", "/api/predict", lambda rq, r: api.predict(bench, r), api.PredictRequest)
    endpoint("POST", "/api/attribute", lambda rq, r: api.attribute(bench, r), api.AttributeRequest)
    endpoint("POST", "/api/ablate", lambda rq, r: api.ablate(bench, r), api.AblateRequest)
    endpoint("POST", "/api/attention_pattern", lambda rq, r: api.attention_pattern(bench, r), api.AttentionRequest)

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
