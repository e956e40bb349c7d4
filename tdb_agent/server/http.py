"""The streamable HTTP transport (the MCP endpoint and the viewer) and its protection.

Loopback binds need nothing. Binding any other address needs a bearer token, checked on
every request by the SDK's bearer middleware (a `TokenVerifier`); the server refuses to
start without one. DNS-rebinding protection stays on in both cases: only the Host and
Origin headers of the loopback names, the bound address, this machine's names and any
`--allowed-host` are accepted.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import socket

from mcp.server.auth.provider import AccessToken, TokenVerifier
from mcp.server.auth.settings import AuthSettings
from mcp.server.transport_security import TransportSecuritySettings
from pydantic import BaseModel, Field

from typing import TYPE_CHECKING

from tdb_agent.errors import TdbError

if TYPE_CHECKING:  # the bind checks below load without torch (`tdb-agent serve` refuses a bind first)
    from tdb_agent.workbench import Workbench

log = logging.getLogger(__name__)

TOKEN_ENV = "TDB_AGENT_TOKEN"
MIN_TOKEN_CHARS = 16
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "[::1]"]


class InsecureBind(TdbError):
    """A bind the server refuses: a non-loopback address without a (strong enough) token."""


class HttpSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535)
    token: str | None = Field(None, repr=False, description="bearer token clients must send")
    allowed_hosts: list[str] = Field([], description="extra Host header names (name or name:port)")
    path: str = "/mcp"


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(settings: HttpSettings) -> None:
    """Refuse a non-loopback bind without a token (before the model is even loaded)."""
    if is_loopback(settings.host):
        return
    if not settings.token:
        raise InsecureBind(
            f"refusing to serve on {settings.host!r}, which is not a loopback address, without a bearer token: "
            f"set {TOKEN_ENV} (or pass --token) so every request must carry 'Authorization: Bearer <token>', "
            "or bind --host 127.0.0.1")
    if len(settings.token) < MIN_TOKEN_CHARS:
        raise InsecureBind(f"the bearer token is {len(settings.token)} characters; a non-loopback bind needs at "
                           f"least {MIN_TOKEN_CHARS} (e.g. python -c 'import secrets; print(secrets.token_urlsafe())')")


class StaticTokenVerifier(TokenVerifier):
    """Accepts exactly one shared secret (compared in constant time)."""

    def __init__(self, token: str):
        self._token = token.encode()

    async def verify_token(self, token: str) -> AccessToken | None:
        if hmac.compare_digest(token.encode(), self._token):
            return AccessToken(token=token, client_id="tdb-agent-client", scopes=[])
        return None


def _host_entries(name: str) -> list[str]:
    """Allowed-hosts entries for a name: 'name' (any port, or none) or 'name:port' as given."""
    name = name.strip()
    if name.count(":") > 1 and not name.startswith("["):  # a bare IPv6 address
        name = f"[{name}]"
    if name.endswith(":*") or (name.startswith("[") and "]:" in name) or (":" in name and not name.startswith("[")):
        return [name]
    return [name, f"{name}:*"]


def security_settings(settings: HttpSettings) -> TransportSecuritySettings:
    hosts = list(LOOPBACK_HOSTS)
    if not is_loopback(settings.host):
        wildcard = settings.host in ("0.0.0.0", "::", "")
        if not wildcard:
            hosts.append(settings.host)
        names = {socket.gethostname(), socket.getfqdn()}
        if wildcard:
            try:
                names |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
            except OSError:
                pass
        hosts += sorted(n for n in names if n)
    hosts += settings.allowed_hosts
    entries = list(dict.fromkeys(e for h in hosts for e in _host_entries(h)))
    origins = [f"{scheme}://{e}" for e in entries for scheme in ("http", "https")]
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=entries,
                                     allowed_origins=origins)


def auth_for(settings: HttpSettings) -> tuple[TokenVerifier | None, AuthSettings | None]:
    if not settings.token:
        return None, None
    # A static token, not OAuth: no resource metadata is published (resource_server_url None),
    # so the issuer URL is never advertised; the SDK only requires one to be set.
    return StaticTokenVerifier(settings.token), AuthSettings(issuer_url="http://localhost", resource_server_url=None)


def http_app(bench: Workbench, settings: HttpSettings, runs=None):
    """The ASGI app: the MCP endpoint at `settings.path` and the viewer's pages and JSON API
    under `/` (tdb_agent.viewer), behind the same Host check and bearer token."""
    from tdb_agent.server.app import build_server
    from tdb_agent.viewer.routes import add_viewer_routes

    check_bind(settings)
    verifier, auth = auth_for(settings)
    mcp = build_server(bench, token_verifier=verifier, auth=auth)
    security = security_settings(settings)
    add_viewer_routes(mcp, bench, runs, security=security, token_required=verifier is not None)
    log.info("serving MCP on http://%s:%d%s and the viewer on http://%s:%d/ (token %s; allowed hosts %s)",
             settings.host, settings.port, settings.path, settings.host, settings.port,
             "required" if verifier else "not required", security.allowed_hosts)
    app = mcp.streamable_http_app(streamable_http_path=settings.path, transport_security=security,
                                  host=settings.host)
    return app, mcp


def serve_http(bench: Workbench, settings: HttpSettings, runs=None, on_started=None) -> None:
    """Check the bind, then serve streamable HTTP (and the viewer) until interrupted.
    `runs`: the run folders the viewer lists (a `viewer.api.RunIndex`); `on_started` is
    called once the socket listens (`tdb-agent view` opens the browser then)."""
    import threading
    import time

    import uvicorn

    app, mcp = http_app(bench, settings, runs)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port,
                                           log_level=mcp.settings.log_level.lower()))
    if on_started is not None:
        def watch():
            while not server.started and not server.should_exit:
                time.sleep(0.05)
            if server.started:
                on_started()
        threading.Thread(target=watch, daemon=True, name="on-started").start()
    server.run()


def token_from_env() -> str | None:
    return os.environ.get(TOKEN_ENV) or None
