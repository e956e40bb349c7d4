"""The viewer's attribution-graph page: `/api/graph/{name}` serves exactly the graph the
graph tools saved (and nothing outside the workspace's graph exports), and `/graph/{name}`
draws it in a real browser (layers x positions, a click shows a node's edges)."""

from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient

from tdb_agent.engine import DEFAULT_MODEL
from tdb_agent.engine.transcoder import BUNDLED_TRANSCODERS
from tdb_agent.ops.graph.export import validate
from tdb_agent.server.http import HttpSettings, http_app
from tdb_agent.service.catalog import tool
from tdb_agent.service.graph_tools import ExportArgs, GraphArgs
from tdb_agent.session import open_workbench
from tdb_agent.workbench import Workbench
from tests.test_graph import attached, random_transcoders
from tests.test_server_tools import P
from tests.test_viewer_browser import BROWSER_ARGS, Page, find_chromium
from tests.viewer_fixtures import viewer_process

BASE = "http://127.0.0.1:8765"


def build(bench: Workbench, name: str):
    return tool("attribution_graph").run(bench, GraphArgs(prompt=P, target="Mary", distractor="John", name=name))


def test_graph_route_serves_the_saved_graph(tiny_engines, tmp_path):
    e = tiny_engines["gpt2"]
    bench = Workbench(e, workspace=tmp_path / "ws")
    with attached(e, random_transcoders(e, n=16)):
        r = build(bench, "ioi")
        tool("graph_export").run(bench, ExportArgs(name="ioi", pruned=False))
    saved = json.loads((bench.workspace / r.export_path).read_text())
    assert not validate(saved) and saved["nodes"] and saved["links"]
    # a graph an earlier server saved (on disk only) is served too; one linking out of the workspace is not
    other = bench.workspace / "exports" / "graphs" / "old"
    other.mkdir(parents=True)
    (other / "old-full.json").write_text(json.dumps(saved | {"nodes": saved["nodes"][:1], "links": []}))
    outside = tmp_path / "secret.json"
    outside.write_text(json.dumps(saved))
    (bench.workspace / "exports" / "graphs" / "leak").mkdir()
    (bench.workspace / "exports" / "graphs" / "leak" / "leak.json").symlink_to(outside)

    app, _ = http_app(bench, HttpSettings())
    with TestClient(app, base_url=BASE) as c:
        d = c.get("/api/graph/ioi").json()
        assert d["path"] == r.export_path == "exports/graphs/ioi/ioi.json"  # the pruned graph, not ioi-full
        assert d["graph"]["nodes"] == saved["nodes"] and d["graph"]["links"] == saved["links"]
        assert d["graph"]["metadata"] == saved["metadata"] and len(d["graph"]["nodes"]) == r.nodes
        assert len(d["graph"]["links"]) == r.edges
        old = c.get("/api/graph/old").json()
        assert old["path"].endswith("old-full.json") and len(old["graph"]["nodes"]) == 1
        for bad in ("leak", "nope", "..", "%2e%2e", "ioi%2F..%2F..%2Fsecret", "a b"):
            resp = c.get(f"/api/graph/{bad}")
            assert resp.status_code == 404, (bad, resp.text)
        missing = c.get("/api/graph/nope").json()["error"]
        assert "'nope'" in missing and "ioi" in missing and "old" in missing and "leak" not in missing
        assert c.get("/api/model").json()["graphs"] == ["ioi", "old"]
        page = c.get("/graph/ioi")
        assert page.status_code == 200 and "app.js" in page.text


@pytest.fixture(scope="module")
def graph_server(tmp_path_factory):
    """A bundled-model graph saved in a workspace, and `tdb-agent view` serving that workspace."""
    if not (DEFAULT_MODEL / "config.json").exists() or not BUNDLED_TRANSCODERS.is_dir():
        pytest.skip("the bundled model or its transcoders are not built")
    root = tmp_path_factory.mktemp("graphview")
    bench = open_workbench(workspace=root / "ws")
    r = build(bench, "ioi")
    saved = json.loads((bench.workspace / r.export_path).read_text())
    (root / "empty").mkdir()
    with viewer_process(root / "empty", root / "server.log", env={"TDB_WORKSPACE": str(root / "ws")}) as base:
        yield base, saved


def test_graph_page_draws_and_clicks(graph_server):
    playwright = pytest.importorskip("playwright.sync_api", reason="the test extra installs playwright")
    path = find_chromium()
    if path is None:
        pytest.skip("no chromium found (install Debian's chromium or set TDB_CHROMIUM)")
    base, saved = graph_server
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=BROWSER_ARGS)
        try:
            tab = Page(b, base)
            page = tab.open("/graph/ioi")
            nodes = saved["nodes"]
            assert page.locator("svg#agraph g.node").count() == len(nodes)
            assert page.locator("svg#agraph line.edge").count() == len(saved["links"])
            # the target on top, the embeddings at the bottom
            ys = {n["feature_type"]: [] for n in nodes}
            for n in nodes:
                box = page.locator(f'svg#agraph g.node[data-id="{n["node_id"]}"]').bounding_box()
                ys[n["feature_type"]].append(box["y"])
            assert max(ys["logit"]) < min(y for t, v in ys.items() if t != "logit" for y in v)
            assert min(ys["embedding"]) > max(y for t, v in ys.items() if t != "embedding" for y in v)
            # click the feature with the most edges: its in/out tables list exactly its edges
            feats = [n for n in nodes if n["feature_type"] == "cross layer transcoder"]
            deg = lambda n: sum(n["node_id"] in (ln["source"], ln["target"]) for ln in saved["links"])  # noqa: E731
            f = max(feats, key=deg)
            page.locator(f'svg#agraph g.node[data-id="{f["node_id"]}"]').click()
            page.wait_for_selector("#detail-id")
            assert page.inner_text("#detail-id") == f["tdb_id"]
            n_in = sum(ln["target"] == f["node_id"] for ln in saved["links"])
            n_out = sum(ln["source"] == f["node_id"] for ln in saved["links"])
            assert page.locator("#detail table.edges-edges-in tr").count() == n_in + (1 if n_in else 0)
            assert page.locator("#detail table.edges-edges-out tr").count() == n_out + (1 if n_out else 0)
            assert page.locator("#detail a.open-page").get_attribute("href") == "/component/" + f["tdb_id"].split("@")[0]
            assert page.locator("svg#agraph line.edge.on").count() == n_in + n_out
            tab.shot("graph")
            page = tab.open("/")
            assert page.locator('a[href="/graph/ioi"]').count() == 1
            page.close()
            assert not tab.problems, tab.problems
        finally:
            b.close()


# Neuronpedia's published graph schema (apps/webapp/app/api/graph/graph-schema.json in
# hijohnnylin/neuronpedia), its constraints written out here as a JSON Schema for the
# `jsonschema` library: an independent check of `validate`, which implements them by hand.
def _obj(required, props):
    return {"type": "object", "required": required, "properties": props}


NUM, INT, STR, ARR = {"type": "number"}, {"type": "integer"}, {"type": "string"}, {"type": "array"}
SCHEMA = _obj(["metadata", "qParams", "nodes", "links"], {
    "metadata": _obj(["slug", "scan", "prompt_tokens", "prompt"], {
        "slug": STR, "scan": STR, "prompt": STR, "prompt_tokens": {"type": "array", "items": STR},
        "node_threshold": NUM, "feature_details": {"type": "object"}, "info": {"type": "object"},
        "generation_settings": {"type": "object"}, "pruning_settings": {"type": "object"}}),
    "qParams": _obj([], {"pinnedIds": {"type": "array", "items": STR}, "supernodes": ARR, "linkType": STR,
                         "clickedId": STR, "sg_pos": STR}),
    "nodes": {"type": "array", "items": _obj(
        ["node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "clerp"],
        {"node_id": STR, "feature": {"type": ["integer", "null"]}, "layer": {"type": ["string", "integer"]},
         "ctx_idx": INT, "feature_type": STR, "jsNodeId": STR, "clerp": STR,
         "influence": {"type": ["number", "null"]}, "activation": {"type": ["number", "null"]}})},
    "links": {"type": "array", "items": _obj(["source", "target", "weight"], {"source": STR, "target": STR,
                                                                            "weight": NUM})}})


def schema_ok(d) -> bool:
    import jsonschema
    return jsonschema.Draft7Validator(SCHEMA).is_valid(d)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_export_round_trips_and_follows_neuronpedias_schema(tiny_engines, family):
    from tdb_agent import jsonsafe
    from tdb_agent.ops.graph import build_graph
    from tdb_agent.ops.graph.build import GraphTarget
    from tdb_agent.ops.graph.export import to_json
    from tdb_agent.ops.graph.influence import prune, scores, square

    e = tiny_engines[family]
    with attached(e, random_transcoders(e, n=12, cross_layer=family == "llama")):
        g = build_graph(e, P, GraphTarget(kind="logit_diff", token="Mary", distractor="John"))
    sq = square(g)
    for pruned in (None, prune(sq, 0.8, 0.98)):
        data = to_json(g, sq, pruned, slug="rt", scan=e.name, scores=scores(sq), explanations={})
        back = json.loads(jsonsafe.dumps(data))
        assert back == data  # every field survives strict JSON exactly (floats by repr)
        assert validate(back) == [] and schema_ok(back)
        ids = {n["node_id"] for n in back["nodes"]}
        assert len(ids) == len(back["nodes"]) and all({ln["source"], ln["target"]} <= ids for ln in back["links"])
        assert {n["feature_type"] for n in back["nodes"]} >= {"embedding", "logit", "cross layer transcoder"}

    # each schema rule broken once: validate and the JSON Schema agree, and name the field
    def broken(edit):
        d = json.loads(json.dumps(data))
        edit(d)
        return d

    node, link = 0, 0
    cases = {
        "lacks 'clerp'": lambda d: d["nodes"][node].pop("clerp"),
        "lacks 'jsNodeId'": lambda d: d["nodes"][node].pop("jsNodeId"),
        "'feature' is string": lambda d: d["nodes"][node].update(feature="7"),
        "'layer' is number": lambda d: d["nodes"][node].update(layer=1.5),
        "'ctx_idx' is null": lambda d: d["nodes"][node].update(ctx_idx=None),
        "'influence' is string": lambda d: d["nodes"][node].update(influence="high"),
        "metadata lacks 'scan'": lambda d: d["metadata"].pop("scan"),
        "'node_threshold' is null": lambda d: d["metadata"].update(node_threshold=None),
        "prompt_tokens are not all strings": lambda d: d["metadata"]["prompt_tokens"].append(3),
        "'linkType' is integer": lambda d: d["qParams"].update(linkType=1),
        "'weight' is string": lambda d: d["links"][link].update(weight="0.5"),
        "lacks 'target'": lambda d: d["links"][link].pop("target"),
        "graph lacks 'qParams'": lambda d: d.pop("qParams"),
    }
    for what, edit in cases.items():
        d = broken(edit)
        problems = validate(d)
        assert problems and not schema_ok(d), what
        assert any(what in x for x in problems), (what, problems)
    # what the schema allows: a null feature, an integer layer, integer weights, absent optional fields
    for edit in (lambda d: d["nodes"][node].update(feature=None), lambda d: d["nodes"][node].update(layer=3),
                 lambda d: d["links"][link].update(weight=2), lambda d: d["nodes"][node].pop("influence"),
                 lambda d: d["metadata"].update(node_threshold=0.8), lambda d: d.update(qParams={})):
        d = broken(edit)
        assert validate(d) == [] and schema_ok(d)
