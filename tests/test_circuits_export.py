"""Circuit files: node-link JSON round-trips exactly; GraphML, DOT, circuit-tracer JSON, SVG
and HTML parse and carry every node, edge and explanation."""

import io
import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import networkx as nx
import pytest

from tdb_agent import circuits as C
from tdb_agent.errors import TdbError
from tdb_agent.ops.runs import RunCache

TRICKY = 'copies the <name> & "quotes" it — a long explanation ' * 4


@pytest.fixture(scope="module")
def graph(gpt2_tiny):
    g = C.new_circuit("ioi-test", behaviour=C.Behaviour(task="ioi", n=2), metric="logit_diff", model="tiny",
                      description="a test circuit")
    C.add_node(g, "L1.H2", role="name mover", explanation=TRICKY, effect=0.7,
               evidence=[{"tool": "attribute", "args": {"prompt": "x", "kinds": ["head"]}, "value": 0.7}])
    C.add_node(g, "L1.N5", role="booster", effect=-0.1)
    C.add_edge(g, "L0.H1@6", "L1.H2", weight=0.3, via="k", evidence=[{"tool": "trace_upstream", "value": {"w": 0.3}}])
    C.add_edge(g, "EMB", "L0.H1@6", weight=None)
    C.add_edge(g, "L1.H2", "LOGITS", weight=0.7)
    C.add_edge(g, "L1.N5", "LOGITS", weight=-0.1)
    C.validate(gpt2_tiny, g, cache=RunCache(gpt2_tiny))
    return g


def same(a: nx.DiGraph, b: nx.DiGraph) -> bool:
    return (list(a.nodes(data=True)) == list(b.nodes(data=True)) and list(a.edges(data=True)) ==
            list(b.edges(data=True)) and a.graph == b.graph)


def test_node_link_json_round_trips(graph, tmp_path):
    assert graph.graph["faithfulness"] == graph.graph["validation"]["faithfulness"]
    data = json.loads(json.dumps(C.to_json(graph)))
    assert {"nodes", "links", "graph", "directed"} <= set(data) and data["directed"] is True
    assert same(C.from_json(data), graph)
    path = C.save(graph, tmp_path / "sub" / "g.json")
    assert same(C.load(path), graph)
    with pytest.raises(TdbError, match="not a tdb circuit"):
        C.from_json(json.loads(json.dumps(nx.node_link_data(nx.DiGraph([(1, 2)]), edges="links"))))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(TdbError, match="cannot read"):
        C.load(tmp_path / "bad.json")


def test_graphml_reads_back(graph):
    h = nx.read_graphml(io.StringIO(C.to_graphml(graph)))
    assert list(h.nodes) == list(graph.nodes) and set(h.edges) == set(graph.edges)
    assert json.loads(h.nodes["L1.H2"]["evidence"]) == graph.nodes["L1.H2"]["evidence"]
    assert h.nodes["L1.H2"]["explanation"] == TRICKY and h.nodes["L1.H2"]["layer"] == 1
    assert h.edges["L0.H1@6", "L1.H2"]["weight"] == pytest.approx(0.3) and h.edges["L0.H1@6", "L1.H2"]["via"] == "k"
    assert "weight" not in h.edges["EMB", "L0.H1@6"]  # None is left out
    assert h.graph["faithfulness"] == pytest.approx(graph.graph["faithfulness"])
    assert json.loads(h.graph["behaviour"])["task"] == "ioi"


def test_dot_text(graph):
    dot = C.to_dot(graph)
    assert dot.startswith('digraph "ioi-test" {') and dot.rstrip().endswith("}")
    assert dot.count("{") == dot.count("}")
    edges = re.findall(r'^\s*"([^"]+)" -> "([^"]+)" \[(.*)\];$', dot, flags=re.M)
    assert {(s, t) for s, t, _ in edges} == set(graph.edges)
    for n in graph.nodes:
        assert re.search(rf'^\s*"{re.escape(n)}" \[label=', dot, flags=re.M), n
    attrs = {(s, t): a for s, t, a in edges}
    assert 'label="k"' in attrs["L0.H1@6", "L1.H2"] and "penwidth=5.00" in attrs["L1.H2", "LOGITS"]
    assert "style=dashed" in attrs["EMB", "L0.H1@6"] and "color" in attrs["L1.N5", "LOGITS"]
    assert '\\"quotes\\"' in dot  # quotes are escaped inside strings


def test_circuit_tracer_graph(graph):
    tokens = [f"t{i}" for i in range(15)]
    d = json.loads(json.dumps(C.to_circuit_tracer(graph, prompt_tokens=tokens, prompt="p", n_layers=2)))
    assert set(d) == {"metadata", "qParams", "nodes", "links"}
    assert d["metadata"]["prompt_tokens"] == tokens and d["metadata"]["slug"] == "ioi-test"
    ids = [n["node_id"] for n in d["nodes"]]
    assert len(set(ids)) == len(ids) == graph.number_of_nodes()
    by_tdb = {n["tdb_id"]: n for n in d["nodes"]}
    for n in d["nodes"]:
        assert {"node_id", "feature", "layer", "ctx_idx", "feature_type", "clerp", "jsNodeId"} <= set(n)
        assert isinstance(n["layer"], str) and isinstance(n["ctx_idx"], int)
    assert by_tdb["LOGITS"]["feature_type"] == "logit" and by_tdb["LOGITS"]["is_target_logit"]
    assert by_tdb["LOGITS"]["layer"] == "3" and by_tdb["EMB"]["layer"] == "E"
    assert by_tdb["L0.H1@6"]["ctx_idx"] == 6 and by_tdb["L1.H2"]["ctx_idx"] == 14  # unpinned: last position
    assert by_tdb["L1.H2"]["clerp"].startswith("L1.H2 [name mover]: copies")
    assert by_tdb["L1.H2"]["node_id"] != by_tdb["L1.N5"]["node_id"]
    links = {(ln["source"], ln["target"]): ln["weight"] for ln in d["links"]}
    assert len(links) == graph.number_of_edges()
    assert links[by_tdb["L1.N5"]["node_id"], by_tdb["LOGITS"]["node_id"]] == pytest.approx(-0.1)
    assert all(isinstance(w, float) for w in links.values())


def test_svg_is_xml_with_every_node(graph):
    svg = C.to_svg(graph)
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    assert root.tag == ns + "svg"
    texts = ["".join(t.itertext()) for t in root.iter(ns + "text")]
    for n in graph.nodes:
        assert n in texts
    assert any("name mover" in t for t in texts) and any("copies the <name>" in t for t in texts)
    assert len(root.findall(f".//{ns}path")) == graph.number_of_edges()
    widths = {p.find(ns + "title").text.split(" via")[0]: float(p.get("stroke-width"))
              for p in root.iter(ns + "path")}
    assert widths["L1.H2 → LOGITS"] > widths["L0.H1@6 → L1.H2"] > widths["L1.N5 → LOGITS"]
    rows = {"".join(t.itertext()) for t in root.iter(ns + "text")}
    assert {"L0 attn", "L1 attn", "L1 mlp", "embed", "logits"} <= rows
    assert "<script" not in svg


def test_html_is_self_contained(graph):
    page = C.to_html(graph)

    class Tags(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags = []

        def handle_starttag(self, tag, attrs):
            self.tags.append((tag, dict(attrs)))

    p = Tags()
    p.feed(page)
    names = [t for t, _ in p.tags]
    assert "svg" in names and "table" in names and "script" not in names
    assert not [a for t, a in p.tags if t in ("link", "img") or "src" in a]  # nothing external
    assert "copies the &lt;name&gt; &amp;" in page and "faithfulness" in page and "name mover" in page
