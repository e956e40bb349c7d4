"""The viewer's JSON API without a browser: its endpoints return exactly what the ops (and
the MCP tools and resources) return, read run folders as written, and keep the HTTP
transport's protection (Host check, bearer token) while the MCP endpoint keeps working."""

import json
import math

import pytest
from starlette.testclient import TestClient

from tdb_agent import ops
from tdb_agent.engine import DEFAULT_MODEL, Engine
from tdb_agent.engine.sae import attach_saes
from tdb_agent.circuits import add_edge, add_node, new_circuit
from tdb_agent.server.http import HttpSettings, http_app
from tdb_agent.server.resources import circuit_json
from tdb_agent.service.examples import top_examples_of
from tdb_agent.viewer.api import RunIndex, example_text
from tdb_agent.workbench import Workbench, component_page
from tests.viewer_fixtures import ioi_example, make_run

TOKEN = "viewer-test-token-0123456789abcdef"
BASE = "http://127.0.0.1:8765"
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def same(a, b, path="result"):
    """Equal JSON, floats to 1e-6 relative (the server's activation cache may reorder nothing
    numerically, but a fresh forward pass is not guaranteed bit-identical)."""
    if isinstance(a, float) or isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6), f"{path}: {a} != {b}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def bench():
    if not (DEFAULT_MODEL / "config.json").exists():
        pytest.skip("the bundled model is not built")
    engine = Engine.load()
    attach_saes(engine, [], bundled=True)
    return Workbench(engine)


@pytest.fixture(scope="module")
def run_dir(bench, tmp_path_factory):
    return make_run(bench.engine, tmp_path_factory.mktemp("runs") / "ioi-test")


@pytest.fixture(scope="module")
def client(bench, run_dir):
    app, _ = http_app(bench, HttpSettings(), runs=RunIndex(run_dir.parent))
    with TestClient(app, base_url=BASE) as c:
        yield c


def post(client, path, body):
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_tool_endpoints_return_the_ops_numbers(client, bench):
    engine, ex = bench.engine, ioi_example()
    base = {"prompt": ex.prompt, "target": ex.target, "distractor": ex.distractor}
    same(post(client, "/api/predict", {**base, "top_k": 7}),
         ops.predict(engine, ex.prompt, top_k=7, target=ex.target, distractor=ex.distractor).model_dump(mode="json"))
    for method in ("direct_effect", "act_times_grad"):
        got = post(client, "/api/attribute", {**base, "method": method, "kinds": ["head", "mlp"], "top_k": 12})
        want = ops.attribute(engine, ex.prompt, ex.target, ex.distractor, method=method, kinds=["head", "mlp"], top_k=12)
        same(got, want.model_dump(mode="json"))
    got = post(client, "/api/ablate", {**base, "components": ["L3.H1", "L2.MLP"], "mode": "mean"})
    same(got, ops.ablate(engine, ex.prompt, ["L3.H1", "L2.MLP"], ex.target, ex.distractor, mode="mean")
         .model_dump(mode="json"))
    assert got["delta"] == pytest.approx(got["after"] - got["before"])
    same(post(client, "/api/attention_pattern", {"prompt": ex.prompt, "component": "L3.H1"}),
         ops.attention_pattern(engine, ex.prompt, "L3.H1").model_dump(mode="json"))


def test_component_endpoint_is_the_resource_page(client, bench):
    d = client.get("/api/component/L3.H1").json()
    same(d["page"], json.loads(component_page(bench, "L3.H1").model_dump_json()))  # = tdb://component/L3.H1
    assert d["page"]["sections"]["explanation"]["explanation"]
    same(d["random"], top_examples_of(bench.dataset, "L3.H1", 5, "random").model_dump(mode="json"))
    top = d["page"]["sections"]["top_examples"]["examples"][0]
    same(d["attention"], ops.attention_pattern(bench.engine, example_text(bench, top["token_ids"]), "L3.H1")
         .model_dump(mode="json"))
    assert d["attention"]["tokens"][d["attention_query"]] == top["tokens"][top["position"]]
    neuron = client.get("/api/component/L1.N7").json()
    assert neuron["attention"] is None and neuron["page"]["sections"]["top_examples"]["examples"]
    mlp = client.get("/api/component/L2.MLP").json()
    assert mlp["page"]["kind"] == "mlp" and mlp["random"] is None


def test_run_and_model_endpoints_read_the_folder(client, run_dir):
    view = client.get("/api/run/ioi-test").json()
    same(view["graph"], json.loads((run_dir / "graph.json").read_text()))
    assert [e["tool"] for e in view["events"] if e["kind"] == "tool_call"] == [
        "predict", "attribute", "trace_upstream", "circuit_validate"]
    assert [e["kind"] for e in view["events"]][:2] == ["message", "message"]
    rows = {r["id"]: r for r in view["rows"]}
    assert rows["LOGITS"]["row"] == 0 and rows["LOGITS"]["label"] == "logits"
    assert view["report"].startswith("# ioi")
    model = client.get("/api/model").json()
    assert model["info"]["name"] == "tdb-tiny" and model["info"]["datasets"]
    [run] = model["runs"]
    assert run["name"] == "ioi-test" and run["faithfulness"] == view["graph"]["graph"]["faithfulness"]
    assert run["tool_calls"] == 4 and run["n_nodes"] == len(view["graph"]["nodes"]) - 1  # without LOGITS
    assert run["task"] == "ioi" and run["circuit"] == "ioi"
    assert {t["name"] for t in model["tasks"]["tasks"]} >= {"ioi", "induction"}


def test_circuit_endpoint_is_the_circuit_resource(client, bench):
    g = new_circuit("t", metric="logit_diff")
    add_node(g, "L3.H1", role="name mover")
    add_edge(g, "L3.H1", "LOGITS", weight=1.5)
    bench.circuits["t"] = g
    try:
        view = client.get("/api/circuit/t").json()
        assert view["graph"] == json.loads(circuit_json(bench, "t"))  # = tdb://circuit/t
        assert {r["id"]: r["row"] for r in view["rows"]} == {"LOGITS": 0, "L3.H1": 1}
        assert client.get("/api/model").json()["circuits"] == [{"name": "t", "nodes": 2, "edges": 1}]
    finally:
        del bench.circuits["t"]
    assert client.get("/api/circuit/t").status_code == 404


def test_errors_say_what_was_wrong(client):
    r = client.get("/api/component/L9.H1")
    assert r.status_code == 400 and "layers are 0..3" in r.json()["error"]
    assert client.get("/api/run/nope").status_code == 404
    r = client.post("/api/ablate", json={"prompt": "a", "components": ["L0.H0"], "target": "Mary", "bogus": 1})
    assert r.status_code == 422 and "bogus" in r.json()["error"]
    r = client.post("/api/predict", json={"prompt": "x " * 600, "top_k": 3})
    assert r.status_code == 400 and "max_prompt_tokens" in r.json()["error"]
    r = client.post("/api/predict", content=b'{"prompt": "a"}', headers={"Content-Type": "text/plain"})
    assert r.status_code == 400  # only JSON posts (no cross-site form posts)
    assert client.get("/api/model", headers={"Host": "evil.example"}).status_code == 421  # DNS rebinding
    for path in ("/", "/prompt", "/component/L3.H1", "/run/ioi-test", "/static/app.js", "/static/style.css"):
        assert client.get(path).status_code == 200, path
    assert client.get("/static/../api.py").status_code == 404


def test_token_protects_the_api_and_mcp_together(bench, run_dir):
    app, _ = http_app(bench, HttpSettings(token=TOKEN), runs=RunIndex(run_dir))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(app, base_url=BASE) as c:
        assert c.get("/api/model").status_code == 401
        assert c.get("/api/model", headers={"Authorization": "Bearer wrong-token-0123456789"}).status_code == 401
        assert c.get("/api/model", headers=auth).status_code == 200
        assert c.get("/api/run/ioi-test", headers=auth).status_code == 200
        assert c.get("/").status_code == 200  # the page holds no data; its script sends the token
        assert c.post("/mcp", json=INIT, headers=MCP_HEADERS).status_code == 401
        assert c.post("/mcp", json=INIT, headers={**MCP_HEADERS, **auth}).status_code == 200


def test_a_model_without_dataset_gets_weights_only_pages(gpt2_tiny):
    app, _ = http_app(Workbench(gpt2_tiny), HttpSettings(), runs=RunIndex())
    with TestClient(app, base_url=BASE) as c:
        model = c.get("/api/model").json()
        assert model["info"]["datasets"] == [] and model["runs"] == []
        d = c.get("/api/component/L1.H2").json()
        assert d["page"]["weights"] and d["page"]["sections"] == {} and d["random"] is None and d["attention"] is None
        assert c.get("/api/component/L1.N5").json()["page"]["weights"][0]["promotes"]


# ------------------------------------------------------------------ the tool routes are the MCP tools
def _mcp_tools(bench):
    import asyncio

    from mcp import Client

    from tdb_agent.server import build_server

    async def go():
        async with Client(build_server(bench)) as c:
            return {t.name: t for t in (await c.list_tools()).tools}
    return asyncio.run(go())


def test_tool_routes_accept_exactly_the_mcp_arguments(client, bench):
    """Every tool route takes the MCP tool's arguments: the same fields (names, types,
    limits, defaults, descriptions), no others."""
    from tdb_agent.service.catalog import tool
    from tdb_agent.viewer.routes import TOOL_ROUTES, tool_body

    mcp_tools = _mcp_tools(bench)
    for name in TOOL_ROUTES:
        accepted = tool_body(tool(name), bench).model_json_schema()
        schema = mcp_tools[name].input_schema
        assert set(accepted["properties"]) == set(schema["properties"]), name
        for field, spec in schema["properties"].items():
            assert accepted["properties"][field] == spec, (name, field)
        assert set(accepted.get("required", [])) == set(schema.get("required", [])), name
        r = client.post(f"/api/{name}", json={"nonexistent_field": 1})
        assert r.status_code == 422 and "nonexistent_field" in r.json()["error"], name


def test_tool_routes_no_longer_drift_from_the_tools(client, bench):
    """The drift issue #13 found: per_position was missing, components had no length limit,
    and empty strings were handled differently."""
    import asyncio

    from mcp import Client

    from tdb_agent.server import build_server

    ex = ioi_example()
    args = {"prompt": ex.prompt, "target": ex.target, "distractor": ex.distractor, "method": "act_times_grad",
            "kinds": ["head"], "top_k": 4, "per_position": True}
    got = post(client, "/api/attribute", args)
    assert any(row.get("position") is not None for row in got["rows"])

    too_many = {"prompt": ex.prompt, "components": ["L0.H0"] * (bench.limits.max_components + 1),
                "target": ex.target}
    r = client.post("/api/ablate", json=too_many)
    assert r.status_code == 400 and f"max_components={bench.limits.max_components}" in r.json()["error"]

    async def mcp(name, a):
        async with Client(build_server(bench)) as c:
            return await c.call_tool(name, a)
    empty_distractor = {"prompt": ex.prompt, "target": ex.target, "distractor": "", "top_k": 3}
    same(post(client, "/api/predict", empty_distractor),
         asyncio.run(mcp("predict", empty_distractor)).structured_content)
    assert client.post("/api/predict", json={"prompt": ""}).status_code == 422
    assert asyncio.run(mcp("predict", {"prompt": ""})).is_error


def test_a_huge_chunked_body_is_refused_without_reading_it(bench):
    """A 64 MiB chunked body (no Content-Length): 413 once 1 MiB has passed, with only
    about 1 MiB of it ever read."""
    import asyncio

    import httpx

    from tdb_agent.viewer.routes import MAX_BODY

    app, _ = http_app(bench, HttpSettings())
    chunk = b" " * (64 << 10)
    sent = []

    async def body():
        for _ in range(1024):
            sent.append(len(chunk))
            yield chunk

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE) as c:
            huge = await c.post("/api/predict", content=body(), headers={"Content-Type": "application/json"})
            declared = await c.post("/api/predict", content=b"{}", headers={
                "Content-Type": "application/json", "Content-Length": str(MAX_BODY + 1)})
            return huge, declared
    huge, declared = asyncio.run(go())
    assert huge.status_code == 413 and "request body over" in huge.json()["error"]
    assert sum(sent) <= MAX_BODY + 2 * len(chunk), sum(sent)
    assert declared.status_code == 413
