"""Circuit files (docs/DESIGN.md §6): node-link JSON (the native format, round-trips exactly),
GraphML, Graphviz DOT, and the circuit-tracer / Neuronpedia graph JSON.

GraphML and DOT cannot hold lists or dicts, so evidence, behaviour and validation are
written there as JSON strings; None attributes are left out.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import networkx as nx

from tdb_agent import jsonsafe
from tdb_agent.circuits.model import FORMAT, SINK, EdgeRecord, NodeRecord, check_ids
from tdb_agent.components import parse_component
from tdb_agent.engine import Engine
from tdb_agent.errors import TdbError

log = logging.getLogger(__name__)

EDGES_KEY = "links"  # the node-link key networkx and d3 have long used


# ------------------------------------------------------------------ node-link JSON
def to_json(g: nx.DiGraph) -> dict[str, Any]:
    return nx.node_link_data(g, edges=EDGES_KEY)


def from_json(data: dict[str, Any], engine: Engine | None = None, source: str = "the circuit") -> nx.DiGraph:
    """A circuit from node-link JSON (checked to be one of ours; ids range-checked with `engine`).
    Every node and edge is checked against its record type, so a malformed file fails here
    with a TdbError, never later in a tool; NaN/inf values (which only old or hand-edited
    files hold) are dropped to null with a warning naming them."""
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
        raise TdbError("not a node-link circuit: expected an object with a 'nodes' list and 'links'")
    graph = data.get("graph")
    fmt = graph.get("format") if isinstance(graph, dict) else None
    if fmt != FORMAT:
        raise TdbError(f"not a tdb circuit (graph.format is {fmt!r}, expected {FORMAT!r})")
    key = EDGES_KEY if EDGES_KEY in data else "edges"
    try:
        bad = jsonsafe.non_finite(data)
        if bad:
            log.warning("%s: NaN/infinite values set to null: %s", source, jsonsafe.shown(bad))
            data = jsonsafe.drop_non_finite(data)
        g = nx.node_link_graph(data, directed=True, multigraph=False, edges=key)
        for n, a in g.nodes(data=True):
            parse_component(n)
            NodeRecord(id=n, **a)
        for u, v, a in g.edges(data=True):
            EdgeRecord(source=u, target=v, **a)
    except TdbError:
        raise
    except Exception as e:  # any shape networkx or the records refuse
        raise TdbError(f"not a valid node-link circuit ({type(e).__name__}: {str(e)[:200]})") from e
    if SINK not in g:
        raise TdbError("the circuit has no LOGITS sink node")
    if engine is not None:
        check_ids(g, engine)
    return g


def write_atomic(path: str | Path, text: str) -> Path:
    """Write a file so that no reader ever sees it half written or empty: a temporary file with
    a name unique to this writer, fsynced, then renamed over the target (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def dumps(g: nx.DiGraph) -> str:
    """The node-link JSON text, standard JSON only (a NaN/inf anywhere is a TdbError naming it)."""
    try:
        return jsonsafe.dumps(to_json(g), indent=1)
    except ValueError as e:
        raise TdbError(f"the circuit holds values JSON cannot: {e}; nothing was saved") from e


def save(g: nx.DiGraph, path: str | Path) -> Path:
    """Write node-link JSON atomically (a reader never sees half a file)."""
    return write_atomic(path, dumps(g))


def load(path: str | Path, engine: Engine | None = None) -> nx.DiGraph:
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or bad UTF-8
        raise TdbError(f"cannot read circuit file {path.name}: {type(e).__name__}: {str(e)[:200]}") from e
    try:
        return from_json(data, engine, source=path.name)
    except TdbError as e:
        raise TdbError(f"circuit file {path.name}: {e}") from e


# ------------------------------------------------------------------ GraphML and DOT
def _flat(attrs: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in attrs.items():
        if v is None:
            continue
        out[k] = json.dumps(v) if isinstance(v, (list, dict, tuple)) else v
    return out


def flat_copy(g: nx.DiGraph) -> nx.DiGraph:
    """The circuit with scalar attributes only (lists and dicts as JSON strings)."""
    h = nx.DiGraph(**_flat(g.graph))
    for n, a in g.nodes(data=True):
        h.add_node(n, **_flat(a))
    for s, t, a in g.edges(data=True):
        h.add_edge(s, t, **_flat(a))
    return h


def to_graphml(g: nx.DiGraph) -> str:
    buf = io.BytesIO()
    nx.write_graphml(flat_copy(g), buf)
    return buf.getvalue().decode()


def _dot_str(s: Any) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _row(node: str) -> str:
    c = parse_component(node)
    if c.kind in ("emb", "logits"):
        return c.kind
    return f"L{c.layer}"


def to_dot(g: nx.DiGraph) -> str:
    """Graphviz DOT, bottom (EMB) to top (LOGITS), one rank per layer; edge pen width by |weight|."""
    lines = [f"digraph {_dot_str(g.graph.get('name') or 'circuit')} {{", "  rankdir=BT;",
             '  node [shape=box, style="rounded,filled", fillcolor="#f4f4f8", fontname="Helvetica"];']
    f = g.graph.get("faithfulness")
    if f is not None:
        lines.append(f"  label={_dot_str(f'faithfulness {f:.3f}')}; labelloc=t;")
    ranks: dict[str, list[str]] = {}
    for n, a in g.nodes(data=True):
        label = n + (f"\n{a['role']}" if a.get("role") else "")
        tip = a.get("explanation") or ""
        lines.append(f"  {_dot_str(n)} [label={_dot_str(label)}, tooltip={_dot_str(tip)}];")
        ranks.setdefault(_row(n), []).append(n)
    for nodes in ranks.values():
        lines.append("  { rank=same; " + " ".join(_dot_str(n) for n in nodes) + " }")
    wmax = max([abs(a["weight"]) for *_, a in g.edges(data=True) if a.get("weight") is not None] or [1.0]) or 1.0
    for s, t, a in g.edges(data=True):
        w = a.get("weight")
        attrs = [f"penwidth={1 + 4 * abs(w) / wmax:.2f}" if w is not None else "style=dashed"]
        if a.get("via", "direct") != "direct":
            attrs.append(f"label={_dot_str(a['via'])}")
        if w is not None and w < 0:
            attrs.append('color="#c0392b"')
        lines.append(f"  {_dot_str(s)} -> {_dot_str(t)} [{', '.join(attrs)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ circuit-tracer / Neuronpedia
_FEATURE_TYPE = {"emb": "embedding", "logits": "logit", "head": "attention head", "attn": "attention block",
                 "mlp": "mlp block", "neuron": "mlp neuron", "sae": "sae latent",
                 "transcoder": "cross layer transcoder"}  # circuit-tracer's type for transcoder features
_KIND_OFFSET = {"head": 0, "attn": 1, "mlp": 2, "neuron": 3, "sae": 4, "transcoder": 7}  # sae: 4, 5, 6 by site
_OFFSET = 10_000_000  # feature index = offset of the kind + unit index: unique within a layer


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def to_circuit_tracer(g: nx.DiGraph, prompt_tokens: list[str] | None = None, prompt: str | None = None,
                      n_layers: int | None = None) -> dict[str, Any]:
    """The graph JSON that circuit-tracer writes and Neuronpedia's attribution-graph viewer reads:
    {metadata, qParams, nodes[{node_id, feature, layer, ctx_idx, feature_type, clerp, ...}],
    links[{source, target, weight}]}. Node ids are `{layer}_{feature}_{ctx_idx}` ('E' for the
    embedding layer, n_layers + 1 for the logit); unpinned nodes sit at the last position;
    `clerp` carries our id, role and explanation, and `tdb_id` our id."""
    layers = [a["layer"] for _, a in g.nodes(data=True) if a.get("layer") is not None]
    n_layers = n_layers if n_layers is not None else (max(layers) + 1 if layers else 0)
    last = len(prompt_tokens) - 1 if prompt_tokens else max(
        [a["position"] for _, a in g.nodes(data=True) if a.get("position") is not None] or [0])
    ids: dict[str, str] = {}
    nodes = []
    for n, a in g.nodes(data=True):
        c = parse_component(n)
        pos = c.position if c.position is not None else last
        if c.kind == "emb":
            layer, feature = "E", pos
        elif c.kind == "logits":
            layer, feature = str(n_layers + 1), 0
        else:
            layer = str(c.layer)
            sae = ("resid", "mlp", "attn").index(c.sae_site) if c.kind == "sae" else 0
            feature = (_KIND_OFFSET[c.kind] + sae) * _OFFSET + (c.index or 0)
        node_id = f"{layer}_{feature}_{pos}"
        ids[n] = node_id
        clerp = n + (f" [{a['role']}]" if a.get("role") else "")
        clerp += f": {a['explanation']}" if a.get("explanation") else ""
        value = _cantor(int(layer), feature) if c.kind not in ("emb", "logits") else feature
        nodes.append({"node_id": node_id, "jsNodeId": node_id, "feature": value, "layer": layer, "ctx_idx": pos,
                      "feature_type": _FEATURE_TYPE[c.kind], "token_prob": 0.0, "is_target_logit": c.kind == "logits",
                      "run_idx": 0, "reverse_ctx_idx": 0, "clerp": clerp, "influence": a.get("effect"),
                      "activation": None, "tdb_id": n})
    links = [{"source": ids[s], "target": ids[t], "weight": float(a["weight"]) if a.get("weight") is not None else 0.0,
              "via": a.get("via", "direct")} for s, t, a in g.edges(data=True)]
    behaviour = g.graph.get("behaviour") or {}
    if prompt is None and behaviour.get("pairs"):
        prompt = behaviour["pairs"][0]["prompt"]
    meta = {"slug": g.graph.get("name") or "circuit", "scan": g.graph.get("model") or "tdb-agent",
            "transcoder_list": [], "prompt_tokens": prompt_tokens or [], "prompt": prompt or "",
            "schema_version": 1, "faithfulness": g.graph.get("faithfulness")}  # node_threshold: a number or absent
    qparams = {"pinnedIds": [ids[n] for n in g.nodes if n != SINK], "supernodes": [], "linkType": "both",
               "clickedId": "", "sg_pos": ""}
    return {"metadata": meta, "qParams": qparams, "nodes": nodes, "links": links}
