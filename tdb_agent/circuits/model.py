"""The circuit hypothesis: a `networkx.DiGraph` whose every node and edge carries its evidence.

Nodes are component ids (docs/DESIGN.md §3, optionally `@t`); `LOGITS` is the sink. Attributes:

    node   kind, layer, index, position, role, explanation, effect, necessity, evidence
    edge   weight, via (q | k | v | direct), evidence
    graph  format, name, model, description, behaviour, metric, validation, faithfulness

Evidence is a list of {tool, args, value}: the tool call that measured the claim and what it
returned. The helpers below are the only writers, so every graph has the same typed shape
(the pydantic records) and the node-link JSON round-trips exactly. They check before they
write: a non-finite number (NaN/inf have no JSON form) or an oversized evidence item is
refused with the graph unchanged, and evidence is deduplicated and capped per node/edge
(`max_evidence`, newest kept) so repeated calls cannot grow a circuit without bound.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import networkx as nx
from pydantic import BaseModel, Field, ValidationError

from tdb_agent.circuits.pairs import Behaviour
from tdb_agent.components import Component, parse_component
from tdb_agent.engine import Engine
from tdb_agent.errors import TdbError
from tdb_agent.jsonsafe import non_finite, shown
from tdb_agent.ops import sae_ops
from tdb_agent.ops.metrics import MetricName

FORMAT = "tdb-circuit/1"
SINK = "LOGITS"
Via = Literal["q", "k", "v", "direct"]
MAX_EVIDENCE = 16  # evidence items kept per node or edge (the newest); Limits.max_evidence on a server
MAX_EVIDENCE_CHARS = 8000  # one evidence item, as JSON


class Evidence(BaseModel):
    """One measurement behind a node or an edge."""

    tool: str = Field(description="the tool or operation that measured it, e.g. 'attribute', 'trace_upstream'")
    args: dict[str, Any] = Field(default_factory=dict, description="its key arguments")
    value: Any = Field(None, description="what it returned that supports the claim (a number or a small object)")


class NodeRecord(BaseModel):
    id: str
    kind: str
    layer: int | None = None
    index: int | None = None
    position: int | None = None
    role: str | None = Field(None, description="a short label, e.g. 'name mover'")
    explanation: str | None = None
    effect: float | None = Field(None, description="the measured effect that put the node here")
    necessity: float | None = Field(None, description="faithfulness drop without this node (set by validation)")
    evidence: list[Evidence] = Field(default_factory=list)


class EdgeRecord(BaseModel):
    source: str
    target: str
    weight: float | None = None
    via: Via = "direct"
    evidence: list[Evidence] = Field(default_factory=list)


class CircuitInfo(BaseModel):
    """A whole circuit as one typed value (what `circuit_show` returns)."""

    name: str
    model: str | None = None
    description: str | None = None
    behaviour: Behaviour | None = None
    metric: MetricName | None = None
    faithfulness: float | None = Field(None, description="of the latest validation; None before any")
    validation: dict[str, Any] | None = Field(None, description="the latest validation record")
    nodes: list[NodeRecord]
    edges: list[EdgeRecord]


def new_circuit(name: str, *, behaviour: Behaviour | None = None, metric: MetricName | None = None,
                model: str | None = None, description: str | None = None) -> nx.DiGraph:
    """An empty circuit: just the sink, and the behaviour it is meant to explain."""
    g = nx.DiGraph(format=FORMAT, name=name, model=model, description=description,
                   behaviour=behaviour.model_dump(mode="json") if behaviour else None, metric=metric,
                   validation=None, faithfulness=None)
    g.add_node(SINK, **_node_attrs(NodeRecord(id=SINK, kind="logits")))
    return g


def _node_attrs(rec: NodeRecord) -> dict[str, Any]:
    return rec.model_dump(mode="json", exclude={"id"})


def _parse(node_id: str, engine: Engine | None) -> Component:
    if engine is None:
        c = parse_component(node_id)
    else:
        c = parse_component(node_id, engine.spec, sae_sizes=sae_ops.sae_sizes(engine))
    if c.kind == "logits" and c.position is not None:
        raise TdbError("LOGITS takes no position: it is the metric at the last position")
    return c


def _finite(what: str, **values: Any) -> None:
    """Refuse NaN/inf before anything is written (JSON cannot hold them; a circuit holding one
    could not be shown or saved as standard JSON)."""
    bad = non_finite(values)
    if bad:
        raise TdbError(f"{what}: {shown(bad)} is NaN or infinite; give a finite number (or leave it out)")


def _evidence(items: list[Evidence | dict] | None, what: str) -> list[Evidence]:
    out = []
    for i, e in enumerate(items or []):
        try:
            ev = e if isinstance(e, Evidence) else Evidence.model_validate(e)
        except ValidationError as err:
            raise TdbError(f"{what}: evidence[{i}] is not {{tool, args, value}}: {err.errors()[0]['msg']}") from err
        _finite(f"{what}: evidence[{i}]", args=ev.args, value=ev.value)
        size = len(json.dumps(ev.model_dump(mode="json"), default=str))
        if size > MAX_EVIDENCE_CHARS:
            raise TdbError(f"{what}: evidence[{i}] is {size} characters as JSON; at most {MAX_EVIDENCE_CHARS} "
                           "(keep the key numbers, not whole tensors or transcripts)")
        out.append(ev)
    return out


def merge_evidence(old: list[Evidence], new: list[Evidence], cap: int = MAX_EVIDENCE) -> list[Evidence]:
    """Old then new evidence, exact repeats dropped (the first kept), at most `cap` (the newest)."""
    seen, out = set(), []
    for e in [*old, *new]:
        key = json.dumps(e.model_dump(mode="json"), sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out[-cap:] if cap > 0 else []


def add_node(g: nx.DiGraph, node_id: str, *, role: str | None = None, explanation: str | None = None,
             effect: float | None = None, evidence: list[Evidence | dict] | None = None,
             engine: Engine | None = None, max_evidence: int = MAX_EVIDENCE) -> NodeRecord:
    """Add a component (or update it: given fields replace, evidence is merged: repeats
    dropped, the newest `max_evidence` kept). With `engine`, the id is range-checked against
    its model (and attached SAEs). Nothing is written when an argument is refused."""
    c = _parse(node_id, engine)
    _finite(f"node {c.id}", effect=effect)
    ev = _evidence(evidence, f"node {c.id}")
    if c.id in g:
        rec = get_node(g, c.id)
        update = {k: v for k, v in (("role", role), ("explanation", explanation), ("effect", effect))
                  if v is not None}
        rec = rec.model_copy(update={**update, "evidence": merge_evidence(rec.evidence, ev, max_evidence)})
    else:
        rec = NodeRecord(id=c.id, kind=c.kind, layer=c.layer, index=c.index, position=c.position, role=role,
                         explanation=explanation, effect=effect, evidence=merge_evidence([], ev, max_evidence))
    g.add_node(c.id, **_node_attrs(rec))
    return rec


def stream_order(c: Component, parallel_residual: bool = False) -> tuple[float, int]:
    """Where a component reads/writes along the residual stream: edges must go up this order."""
    if c.kind == "emb":
        return (-1, 0)
    if c.kind == "logits":
        return (float("inf"), 0)
    sub = {"head": 0, "attn": 0, "mlp": 1, "neuron": 1}.get(c.kind)
    if c.kind == "sae":
        sub = {"attn": 0, "mlp": 1, "resid": 2}[c.sae_site]
    if parallel_residual and sub == 1:
        sub = 0  # attention and MLP of a layer read the same stream
    return (c.layer, sub)


def add_edge(g: nx.DiGraph, source: str, target: str, *, weight: float | None = None, via: Via = "direct",
             evidence: list[Evidence | dict] | None = None, engine: Engine | None = None,
             max_evidence: int = MAX_EVIDENCE) -> EdgeRecord:
    """Add an edge source -> target (adding missing endpoints), or update it. Edges must go
    from an earlier to a later component, and q/k/v edges must end at an attention head."""
    s, t = _parse(source, engine), _parse(target, engine)
    _finite(f"edge {s.id} -> {t.id}", weight=weight)
    par = bool(engine and engine.spec.parallel_residual)
    if not stream_order(s, par) < stream_order(t, par):
        raise TdbError(f"edge {s.id} -> {t.id} goes against the residual stream: a component can only "
                       "influence components of later (sub)layers; EMB is the source and LOGITS the sink")
    if s.position is not None and t.position is not None and s.position > t.position:
        raise TdbError(f"edge {s.id} -> {t.id}: information cannot flow from position {s.position} to the "
                       f"earlier position {t.position}")
    if via not in ("q", "k", "v", "direct"):
        raise TdbError(f"via must be q, k, v or direct, not {via!r}")
    if via != "direct" and t.kind not in ("head", "attn"):
        raise TdbError(f"via={via} means the edge enters an attention head's {via} input, but {t.id} is "
                       f"a {t.kind}; use via='direct'")
    ev = _evidence(evidence, f"edge {s.id} -> {t.id}")
    for c in (s, t):
        if c.id not in g:
            add_node(g, c.id, engine=engine)
    if g.has_edge(s.id, t.id):
        old = get_edge(g, s.id, t.id)
        if old.via != via:
            raise TdbError(f"edge {s.id} -> {t.id} already exists with via={old.via}; a circuit keeps one edge "
                           "per pair: remove it first or add the evidence with the same via")
        rec = old.model_copy(update={"weight": weight if weight is not None else old.weight,
                                     "evidence": merge_evidence(old.evidence, ev, max_evidence)})
    else:
        rec = EdgeRecord(source=s.id, target=t.id, weight=weight, via=via,
                         evidence=merge_evidence([], ev, max_evidence))
    g.add_edge(s.id, t.id, **rec.model_dump(mode="json", exclude={"source", "target"}))
    return rec


def remove_node(g: nx.DiGraph, node_id: str) -> None:
    nid = _parse(node_id, None).id
    if nid == SINK:
        raise TdbError("LOGITS is the sink of every circuit and cannot be removed")
    if nid not in g:
        raise TdbError(f"{nid} is not in the circuit; nodes: {', '.join(g.nodes)}")
    g.remove_node(nid)


def remove_edge(g: nx.DiGraph, source: str, target: str) -> None:
    s, t = _parse(source, None).id, _parse(target, None).id
    if not g.has_edge(s, t):
        raise TdbError(f"there is no edge {s} -> {t} in the circuit")
    g.remove_edge(s, t)


def get_node(g: nx.DiGraph, node_id: str) -> NodeRecord:
    if node_id not in g:
        raise TdbError(f"{node_id} is not in the circuit")
    return NodeRecord(id=node_id, **g.nodes[node_id])


def get_edge(g: nx.DiGraph, source: str, target: str) -> EdgeRecord:
    return EdgeRecord(source=source, target=target, **g.edges[source, target])


def node_records(g: nx.DiGraph) -> list[NodeRecord]:
    return [get_node(g, n) for n in g.nodes]


def edge_records(g: nx.DiGraph) -> list[EdgeRecord]:
    return [get_edge(g, s, t) for s, t in g.edges]


def components(g: nx.DiGraph) -> list[str]:
    """The circuit's component nodes (everything but the sink), in insertion order."""
    return [n for n in g.nodes if n != SINK]


def behaviour(g: nx.DiGraph) -> Behaviour | None:
    b = g.graph.get("behaviour")
    return Behaviour.model_validate(b) if b else None


def check_ids(g: nx.DiGraph, engine: Engine) -> None:
    """Range-check every node id against a model (e.g. a circuit loaded from a file)."""
    for n in g.nodes:
        _parse(n, engine)


def info(g: nx.DiGraph) -> CircuitInfo:
    return CircuitInfo(name=g.graph.get("name", ""), model=g.graph.get("model"),
                       description=g.graph.get("description"), behaviour=behaviour(g),
                       metric=g.graph.get("metric"), faithfulness=g.graph.get("faithfulness"),
                       validation=g.graph.get("validation"), nodes=node_records(g), edges=edge_records(g))
