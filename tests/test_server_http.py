"""The server over streamable HTTP as a real subprocess (`tdb-agent serve --transport http`),
talked to by the SDK's real client: conformance, concurrent load, and bearer-token auth."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tdb_agent.server.http import HttpSettings, InsecureBind, check_bind
from tests.test_server_tools import CALLS, C, P, check_conformance
from tests.viewer_fixtures import stop_process

TOKEN = "s3cret-token-for-the-tests-0123456789"
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "raw", "version": "0"}}}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if k != "TDB_AGENT_TOKEN"}
    return {**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TDB_WORKSPACE": str(tmp_path), **extra}


@contextmanager
def http_server(model_dir, tmp_path, *flags, env=None):
    """Start `tdb-agent serve --transport http` on a free port; yield (port, process)."""
    port = _free_port()
    out, err = open(tmp_path / "stdout.txt", "w+"), open(tmp_path / "stderr.txt", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "tdb_agent.cli", "serve", "--transport", "http", "--port",
                             str(port), "--model", str(model_dir), *flags],
                            stdout=out, stderr=err, env=env or _env(tmp_path))
    try:
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None:
                err.seek(0)
                raise RuntimeError(f"the server exited ({proc.returncode}): {err.read()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise TimeoutError("the HTTP server did not start within 90 s")
                time.sleep(0.2)
        yield port, proc
    finally:
        stop_process(proc)
        out.seek(0)
        assert out.read() == "", "the server wrote to stdout: logs must go to stderr"
        out.close()
        err.close()


@pytest.fixture(scope="module")
def server_url(tiny_dirs, tmp_path_factory):
    with http_server(tiny_dirs["gpt2"], tmp_path_factory.mktemp("http")) as (port, _):
        yield f"http://127.0.0.1:{port}/mcp"


def test_conformance_over_http(server_url):
    async def go():
        async with Client(server_url, read_timeout_seconds=120) as c:
            results = await check_conformance(c)
            img = results["attention_pattern"]
            assert any(getattr(b, "type", "") == "image" and b.mime_type == "image/png" for b in img.content)
            bad = await c.call_tool("ablate", {**CALLS["ablate"], "components": ["L9.H1"]})
            assert bad.is_error and "layers are 0..1" in bad.content[0].text
            page = json.loads((await c.read_resource("tdb://component/L0.N5")).contents[0].text)
            assert page["weights"][0]["promotes"]
            prompt = await c.get_prompt("why_attends", {"prompt": P, "head": "L1.H2", "query_position": "14"})
            assert "L1.H2@14" in prompt.messages[0].content.text
    asyncio.run(go())


# ------------------------------------------------------------------ load
MIXED = [
    ("predict", {"prompt": P, "target": "Mary", "distractor": "John", "top_k": 5}),
    ("predict", {"prompt": C, "top_k": 3}),
    ("tokenize", {"text": C}),
    ("attribute", {"prompt": P, "target": "Mary", "distractor": "John", "top_k": 6}),
    ("attribute", {"prompt": C, "target": "Mary", "distractor": "John", "method": "act_times_grad",
                   "corrupted_prompt": P, "top_k": 6}),
    ("ablate", {"prompt": P, "components": ["L0.H1", "L1.N3@4"], "target": "Mary", "distractor": "John",
                "mode": "mean"}),
    ("ablate", {"prompt": C, "components": ["L1.H2"], "target": "Mary", "distractor": "John", "mode": "resample",
                "corrupted_prompt": P}),
    ("ablation_sweep", {"prompt": P, "kind": "head", "target": "Mary", "distractor": "John", "positions": "last"}),
    ("patch", {"clean_prompt": P, "corrupted_prompt": C, "components": ["L1.H2", "L0.MLP"], "target": "Mary",
               "distractor": "John"}),
    ("trace_upstream", {"prompt": P, "component": "L1.H2@14", "via": "k"}),
    ("attention_pattern", {"prompt": C, "component": "L0.H3"}),
    ("steer", {"prompt": P, "component": "L1.N7", "scale": 3.0, "max_new_tokens": 2}),
    ("ablate", {"prompt": P, "components": ["L7.H0"], "target": "Mary"}),  # a tool error, also deterministic
]


def _plan(client: int, n: int) -> list[tuple[str, dict]]:
    """Client i's calls: the mixed list rotated, so the clients hit different tools at once."""
    return [MIXED[(client * 5 + j) % len(MIXED)] for j in range(n)]


def _outcome(r):
    return ("error", r.content[0].text) if r.is_error else ("ok", r.structured_content)


def _load(url: str, n_clients: int, n_calls: int) -> None:
    async def one_at_a_time():
        async with Client(url, read_timeout_seconds=120) as c:
            return {i: _outcome(await c.call_tool(*call)) for i, call in enumerate(MIXED)}

    async def client(i: int):
        async with Client(url, read_timeout_seconds=300) as c:
            return [_outcome(await c.call_tool(*call)) for call in _plan(i, n_calls)]

    async def go():
        expected = await one_at_a_time()
        results = await asyncio.gather(*(client(i) for i in range(n_clients)))
        for i, got in enumerate(results):
            want = [expected[MIXED.index(call)] for call in _plan(i, n_calls)]
            assert len(got) == n_calls
            for g, w, call in zip(got, want, _plan(i, n_calls)):
                assert g == w, call
        assert sum(o[0] == "ok" for r in results for o in r) >= n_clients * n_calls * 0.8
    asyncio.run(go())


def test_8_concurrent_clients_x_50_calls_get_the_same_results(server_url):
    _load(server_url, n_clients=8, n_calls=50)


@pytest.mark.slow
def test_heavier_load_32_clients_x_100_calls(server_url):
    _load(server_url, n_clients=32, n_calls=100)


def test_cancelled_call_over_http_leaves_the_server_consistent(tiny_dirs, tmp_path):
    sweep = {"prompt": P, "kind": "neuron", "target": "Mary", "distractor": "John", "positions": "all"}
    with http_server(tiny_dirs["gpt2"], tmp_path, "--batch-size", "1") as (port, _):
        url = f"http://127.0.0.1:{port}/mcp"

        async def go():
            async with Client(url, read_timeout_seconds=120) as c:
                ref = [_outcome(await c.call_tool(*call)) for call in MIXED[:6]]
                started = asyncio.Event()
                seen = []

                async def on_progress(progress, total, message):
                    seen.append((progress, total))
                    started.set()

                task = asyncio.create_task(c.call_tool("ablation_sweep", sweep, progress_callback=on_progress))
                await asyncio.wait_for(started.wait(), 60)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert seen[-1][0] < seen[-1][1]
                # the server finishes the abandoned batch, then answers as before
                again = [_outcome(await c.call_tool(*call)) for call in MIXED[:6]]
                assert again == ref
                done = await c.call_tool("ablation_sweep", {**sweep, "kind": "head"})
                assert not done.is_error
        asyncio.run(go())


# ------------------------------------------------------------------ auth and binding
def test_non_loopback_bind_without_token_refuses_to_start(tiny_dirs, tmp_path):
    r = subprocess.run([sys.executable, "-m", "tdb_agent.cli", "serve", "--transport", "http", "--host", "0.0.0.0",
                        "--port", str(_free_port()), "--model", str(tiny_dirs["gpt2"])],
                       capture_output=True, text=True, timeout=120, env=_env(tmp_path))
    assert r.returncode == 2 and "without a bearer token" in r.stderr and "TDB_AGENT_TOKEN" in r.stderr, r.stderr
    assert r.stdout == ""


def test_help_and_a_refused_bind_load_no_model_library(tmp_path):
    """`tdb-agent --help` and a bind refused for want of a token answer without importing torch
    or transformers (they took 9 s here when every flag's module loaded the engine)."""
    code = ("import sys\n"
            "from tdb_agent.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "rc = main(['serve', '--transport', 'http', '--host', '0.0.0.0', '--port', '1'])\n"
            "loaded = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
            "print('RESULT', rc, loaded)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env(tmp_path))
    assert "RESULT 2 []" in r.stdout, (r.stdout[-2000:], r.stderr[-2000:])
    assert "build-dataset" in r.stdout and "graphs" in r.stdout and "without a bearer token" in r.stderr


@pytest.mark.parametrize("host,token,fragment", [
    ("0.0.0.0", None, "without a bearer token"), ("::", "", "without a bearer token"),
    ("192.168.1.7", "short", "at least 16"), ("gpu-box.lan", None, "not a loopback address"),
])
def test_bind_checks(host, token, fragment):
    with pytest.raises(InsecureBind, match=fragment):
        check_bind(HttpSettings(host=host, token=token))


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_needs_no_token(host):
    check_bind(HttpSettings(host=host))


def test_token_is_checked_on_every_request(tiny_dirs, tmp_path):
    env = _env(tmp_path, TDB_AGENT_TOKEN=TOKEN)
    with http_server(tiny_dirs["gpt2"], tmp_path, "--host", "0.0.0.0", env=env) as (port, _):
        url = f"http://127.0.0.1:{port}/mcp"
        with httpx.Client(timeout=30) as h:
            assert h.post(url, json=INIT, headers=MCP_HEADERS).status_code == 401
            wrong = h.post(url, json=INIT, headers={**MCP_HEADERS, "Authorization": "Bearer " + TOKEN[:-1] + "x"})
            assert wrong.status_code == 401 and "invalid_token" in wrong.text
            assert h.post(url, json=INIT, headers={**MCP_HEADERS, "Authorization": TOKEN}).status_code == 401
            ok = h.post(url, json=INIT, headers={**MCP_HEADERS, "Authorization": f"Bearer {TOKEN}"})
            assert ok.status_code == 200, ok.text
            # DNS-rebinding protection stays on behind the token
            evil = h.post(url, json=INIT, headers={**MCP_HEADERS, "Authorization": f"Bearer {TOKEN}",
                                                   "Host": "evil.example"})
            assert evil.status_code == 421

        async def go():
            async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as http:
                async with Client(streamable_http_client(url, http_client=http), read_timeout_seconds=60) as c:
                    r = await c.call_tool("predict", {"prompt": P, "top_k": 2})
                    assert not r.is_error and len(r.structured_content["top"]) == 2
            with pytest.raises(Exception):  # noqa: B017 - the SDK raises its own error for a 401
                async with Client(url, read_timeout_seconds=20) as c:
                    await c.list_tools()
        asyncio.run(go())


def test_loopback_rejects_foreign_host_headers(server_url):
    with httpx.Client(timeout=30) as h:
        assert h.post(server_url, json=INIT, headers={**MCP_HEADERS, "Host": "attacker.example:80"}).status_code == 421
        assert h.post(server_url, json=INIT, headers=MCP_HEADERS).status_code == 200
