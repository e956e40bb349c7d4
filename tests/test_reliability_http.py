"""Issue #18 over real transports: a client whose HTTP connection drops does not keep the
engine (the call stops as if cancelled), and malformed circuit files do not stop the server
from starting (stdio and HTTP)."""

import asyncio
import json
import os
import sys

import httpx
from mcp import Client, StdioServerParameters

from tests.test_server_http import INIT, MCP_HEADERS, http_server
from tests.test_server_tools import P

SWEEP = {"prompt": P, "kind": "neuron", "target": "Mary", "distractor": "John", "positions": "all"}
GONE = "ablation_sweep: the client disconnected; stopping at the next batch"


def _sse_messages(lines):
    """JSON-RPC messages from an SSE stream's lines."""
    for line in lines:
        if line.startswith("data:") and line[5:].strip():
            yield json.loads(line[5:])


def test_dropped_http_connection_stops_the_call_and_frees_the_engine(tiny_dirs, tmp_path):
    with http_server(tiny_dirs["gpt2"], tmp_path, "--batch-size", "1") as (port, _):
        url = f"http://127.0.0.1:{port}/mcp"
        with httpx.Client(timeout=60) as raw:
            init = raw.post(url, json=INIT, headers=MCP_HEADERS)
            sid = init.headers["mcp-session-id"]
            headers = {**MCP_HEADERS, "mcp-session-id": sid, "mcp-protocol-version": "2025-06-18"}
            raw.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers)
            call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                    "params": {"name": "ablation_sweep", "arguments": SWEEP, "_meta": {"progressToken": 7}}}
            with raw.stream("POST", url, json=call, headers=headers) as resp:
                for msg in _sse_messages(resp.iter_lines()):  # wait until the sweep is running
                    assert msg.get("method") == "notifications/progress", msg
                    done, total = msg["params"]["progress"], msg["params"]["total"]
                    break
            assert done < total
        # the connection is closed (the response and the client): nobody can receive the answer

        async def go():
            async with Client(url, read_timeout_seconds=120) as c:
                return await c.call_tool("predict", {"prompt": P, "top_k": 3})
        pred = asyncio.run(go())
        assert not pred.is_error
        stderr = (tmp_path / "stderr.txt").read_text()
        # the stop flag was set while the sweep was running (the watcher lives only as long as the work)
        assert GONE in stderr


def _stdio(model_dir, workspace) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable,
                                 args=["-m", "tdb_agent.cli", "serve", "--model", str(model_dir)],
                                 env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                                      "TDB_WORKSPACE": str(workspace)})


def _bad_workspace(root):
    """A workspace with one good circuit and every kind of malformed circuit file."""
    from tdb_agent import circuits as C
    folder = root / "circuits"
    folder.mkdir(parents=True)
    C.save(C.new_circuit("good"), folder / "good.json")
    good = json.loads((folder / "good.json").read_text())
    (folder / "nodes5.json").write_text(json.dumps({**good, "nodes": 5}))
    (folder / "nested.json").write_text("[" * 100_000 + "]" * 100_000)
    (folder / "utf8.json").write_bytes(b'{"graph": {"format": "tdb-circuit/1"}, "nodes": ["\xff\xfe"]}')
    (folder / "linkbad.json").write_text(json.dumps({**good, "links": [{"source": "LOGITS"}]}))
    (folder / "nodebad.json").write_text(json.dumps({**good, "nodes": [{"id": "LOGITS", "kind": [1]}]}))
    (folder / "idbad.json").write_text(json.dumps({**good, "nodes": [*good["nodes"], {"id": "L99.QQ"}]}))
    (folder / "graphlist.json").write_text(json.dumps({**good, "graph": [1, 2]}))
    return ["graphlist.json", "idbad.json", "linkbad.json", "nested.json", "nodebad.json", "nodes5.json",
            "utf8.json"]


def test_malformed_circuit_files_do_not_stop_the_stdio_server(tiny_dirs, tmp_path):
    bad = _bad_workspace(tmp_path)

    async def go():
        async with Client(_stdio(tiny_dirs["gpt2"], tmp_path), read_timeout_seconds=120) as c:
            listed = await c.call_tool("circuit_list", {})
            shows = [await c.call_tool("circuit_show", {"name": f[:-5]}) for f in bad]
            added = await c.call_tool("circuit_add", {"name": "good", "nodes": [{"id": "L0.H1"}]})
            return listed, shows, added
    listed, shows, added = asyncio.run(go())
    assert [r["name"] for r in listed.structured_content["circuits"]] == ["good"]
    for f, show in zip(bad, shows):  # each bad file is reported as unreadable, by name
        assert show.is_error and "unreadable" in show.content[0].text and f in show.content[0].text, f
    assert not added.is_error


def test_malformed_circuit_files_do_not_stop_the_http_server(tiny_dirs, tmp_path):
    bad = _bad_workspace(tmp_path / "ws")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TDB_WORKSPACE": str(tmp_path / "ws")}
    env.pop("TDB_AGENT_TOKEN", None)
    with http_server(tiny_dirs["gpt2"], tmp_path, env=env) as (port, _):
        async def go():
            async with Client(f"http://127.0.0.1:{port}/mcp", read_timeout_seconds=120) as c:
                return await c.call_tool("circuit_list", {})
        listed = asyncio.run(go())
        assert [r["name"] for r in listed.structured_content["circuits"]] == ["good"]
        stderr = (tmp_path / "stderr.txt").read_text()
        for name in bad:  # each skipped file is named in a warning
            assert name in stderr, name
