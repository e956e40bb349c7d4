"""Attribution-graph tools: build a graph over transcoder features (or residual SAE
latents), ask which heads carried an edge and why a head attended, export for
circuit-tracer / Neuronpedia viewers. Numbers come from `tdb_agent.ops.graph`."""

from __future__ import annotations

import json
from typing import Annotated

import torch
from pydantic import BaseModel, Field

from tdb_agent import jsonsafe
from tdb_agent.errors import TdbError
from tdb_agent.ops.graph import GraphTarget, build_graph
from tdb_agent.ops.graph.export import to_json, validate
from tdb_agent.ops.graph.heads import head_split, qk_decompose, qk_pairs
from tdb_agent.ops.graph.views import pruned_of, scores_of, square_of
from tdb_agent.ops.graph.intervene import InterventionCheck, check
from tdb_agent.ops.graph.paths import layer_position
from tdb_agent.ops.graph.query import col_tid, find_col, find_row, row_tid, strongest_paths
from tdb_agent.service.annotations import READ_ONLY, WRITES_RESULT
from tdb_agent.service.exports import write_export
from tdb_agent.service.fields import Distractor, Prompt, TopK
from tdb_agent.service.tool import Job, Tool, ToolArgs
from tdb_agent.workbench import Workbench

GraphName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$",
                                 description="the graph's name (as given to attribution_graph)")]
NodeId = Annotated[str, Field(min_length=1, max_length=80, description="a graph node id: L1.tc.F7@4, ERR.L1.mlp@4, "
                              "EMB@2, or LOGIT / LOGIT[label] for a target")]


class PruneSettings(BaseModel):
    """Pruning arguments; left out, the graph's last pruning (attribution_graph / graph_prune) holds."""

    node_threshold: Annotated[float | None, Field(ge=0, le=1, description="keep the nodes covering this share "
                                                  "of the influence on the target")] = None
    edge_threshold: Annotated[float | None, Field(ge=0, le=1, description="keep the edges covering this "
                                                  "share")] = None
    max_feature_nodes: Annotated[int | None, Field(ge=1, le=20000, description="at most this many feature "
                                                   "nodes kept (by influence)")] = None


class Pruning(BaseModel):
    node_threshold: float = 0.8
    edge_threshold: float = 0.98
    max_feature_nodes: int | None = None


def pruning(g, args: PruneSettings | None = None, store: bool = False) -> Pruning:
    """The graph's pruning settings with the given ones replacing them (saved on the graph if `store`)."""
    old = Pruning.model_validate(g.stats.get("pruning", {}))
    new = old.model_copy(update={k: v for k, v in (args.model_dump() if args else {}).items()
                                 if k in Pruning.model_fields and v is not None})
    if store:
        g.stats["pruning"] = new.model_dump()
    return new


class GraphArgs(ToolArgs):
    prompt: Prompt
    target: Annotated[str | None, Field(max_length=200, description="a single token to explain (its logit); "
                                        "without it, the top logits covering `mass`")] = None
    distractor: Distractor = None
    mass: Annotated[float, Field(gt=0, le=1, description="without a target: probability mass the top logits "
                                 "cover")] = 0.95
    name: GraphName = "graph"
    node_threshold: Annotated[float, Field(ge=0, le=1, description="keep the nodes covering this share of "
                                           "the influence on the target")] = 0.8
    edge_threshold: Annotated[float, Field(ge=0, le=1, description="keep the edges covering this share")] = 0.98
    max_feature_nodes: Annotated[int, Field(ge=1, le=20000, description="most features whose inputs are "
                                            "computed (chosen by influence)")] = 2048
    top_k: TopK(12, "nodes and edges to list")


class GraphNode(BaseModel):
    id: str
    influence: float = Field(description="influence on the target(s), from the normalised adjacency")
    activation: float | None


class GraphEdge(BaseModel):
    source: str
    target: str
    weight: float


class GraphResult(BaseModel):
    name: str
    prompt: str
    tokens: list[str]
    mode: str = Field(description="transcoders or saes: what the graph's feature nodes are")
    targets: list[str]
    active_features: int
    nodes: int = Field(description="nodes after pruning")
    edges: int = Field(description="edges after pruning")
    replacement_score: float = Field(description="share of the embeddings-to-target influence through features "
                                     "rather than error nodes (1 = fully explained)")
    completeness_score: float = Field(description="influence-weighted share of node inputs that are not errors")
    completeness_residual: float = Field(description="max |incoming edges + bias - value| over nodes (rounding)")
    top_nodes: list[GraphNode]
    top_edges_into_target: list[GraphEdge]
    paths: list[list[str]] = Field(description="strongest paths into the first target, start to target")
    export_path: str


def attribution_graph(bench: Workbench, args: GraphArgs, job: Job) -> GraphResult:
    """Which features, through which paths, make the model say this? Builds the attribution
    graph of the prompt: MLPs replaced by the loaded transcoders plus error nodes (or the
    residual stream by SAE latents), attention patterns and norms frozen, so every edge is
    exact and each node's inputs sum to its value. Pruned by influence on the target; reports
    the replacement and completeness scores, the top nodes, the edges into the target and the
    strongest paths; saved under the name for the other graph tools. Example:
    attribution_graph(prompt="When Mary and John went to the store , John gave a drink to",
    target="Mary", distractor="John", name="ioi")"""
    if args.distractor and not args.target:
        raise TdbError("a distractor needs a target")
    kind = "logit_diff" if args.distractor else ("logit" if args.target else "top")
    tgt = GraphTarget(kind=kind, token=args.target, distractor=args.distractor, mass=args.mass)
    g = build_graph(bench.engine, args.prompt, tgt, max_feature_nodes=args.max_feature_nodes,
                    batch_size=bench.limits.batch_size, progress=job.progress, should_stop=job.should_stop)
    sq = square_of(g)
    p = pruned_of(g, args.node_threshold, args.edge_threshold)
    rep, comp = scores_of(g)
    g.stats["pruning"] = Pruning(node_threshold=args.node_threshold, edge_threshold=args.edge_threshold).model_dump()
    bench.graphs[args.name] = g
    data = to_json(g, sq, p, slug=args.name, scan=bench.engine.name, scores=(rep, comp))
    out = write_export(bench, "graphs", args.name, f"{args.name}.json", jsonsafe.dumps(data))
    n_src = len(sq.cols)
    keep = p.node_mask[:n_src].nonzero(as_tuple=True)[0]
    order = keep[p.node_influence[keep].argsort(descending=True)][: args.top_k].tolist()
    acts = {c: float(g.src.feat_act[c]) for c in sq.cols[order].tolist() if c < g.src.n_feat}
    top_nodes = [GraphNode(id=col_tid(g, int(sq.cols[k])), influence=float(p.node_influence[k]),
                           activation=acts.get(int(sq.cols[k]))) for k in order]
    row = len(g.rows)
    into = g.edges.row(row)
    top = into.abs().topk(min(args.top_k, into.numel())).indices.tolist()
    edges = [GraphEdge(source=col_tid(g, c), target=row_tid(g, row), weight=float(into[c])) for c in top
             if float(into[c]) != 0]
    return GraphResult(name=args.name, prompt=args.prompt, tokens=g.tokens, mode=g.mode,
                       targets=[ln.label for ln in g.logits], active_features=g.src.n_feat,
                       nodes=int(p.node_mask.sum()), edges=int(p.edge_rows.sum()), replacement_score=rep,
                       completeness_score=comp, completeness_residual=g.completeness_residual(), top_nodes=top_nodes,
                       top_edges_into_target=edges, paths=strongest_paths(g, row), export_path=out)


def graph_of(bench: Workbench, name: str):
    """The stored graph of that name, or a TdbError listing the stored ones."""
    if name not in bench.graphs:
        have = ", ".join(bench.graphs) or "none"
        raise TdbError(f"no attribution graph named {name!r}; graphs: {have} (build one with attribution_graph)")
    return bench.graphs[name]


class EdgeHeadsArgs(ToolArgs):
    name: GraphName
    source: NodeId
    target: NodeId = "LOGIT"
    top_k: TopK(8, "heads to list per layer")


class HeadShare(BaseModel):
    head: str
    weight: float


class LayerSplit(BaseModel):
    layer: int
    heads: list[HeadShare] = Field(description="the part of the edge carried by each head (largest first)")
    bypass: float = Field(description="the part that does not pass through this layer's attention")


class EdgeHeadsResult(BaseModel):
    source: str
    target: str
    edge: float
    layers: list[LayerSplit] = Field(description="per attention layer between them: heads + bypass = edge")


def graph_edge_heads(bench: Workbench, args: EdgeHeadsArgs, job: Job) -> EdgeHeadsResult:
    """Which attention heads carried this graph edge? Splits the edge source -> target
    exactly across the heads of every attention layer it can pass (in each layer, the heads'
    parts plus the bypass equal the edge). Example: graph_edge_heads(name="ioi",
    source="EMB@2", target="LOGIT")"""
    g = graph_of(bench, args.name)
    col, row = find_col(g, args.source), find_row(g, args.target)
    sp, src = bench.engine.spec, g.src
    if col < src.n_feat:  # features and errors write after their layer's attention; embeddings before all
        first = int(src.feat[col, 0]) + 1
    elif col < src.n_feat + src.n_err:
        first = src.err_keys[(col - src.n_feat) // src.n_pos][1] + 1
    else:
        first = 0
    last = int(g.src.feat[int(g.rows[row]), 0]) if row < len(g.rows) else sp.n_layers - 1
    edge = float(g.edges.row(row)[col])
    layers = []
    for layer in range(first, last + 1):
        if job.should_stop():
            break
        split = head_split(g, row, layer)[:, col]
        order = split.abs().argsort(descending=True)[: args.top_k].tolist()
        layers.append(LayerSplit(layer=layer, heads=[HeadShare(head=f"L{layer}.H{h}", weight=float(split[h]))
                                                     for h in order], bypass=edge - float(split.sum())))
        job.progress(layer - first + 1, last - first + 1)
    return EdgeHeadsResult(source=args.source, target=row_tid(g, row), edge=edge, layers=layers)


class QKArgs(ToolArgs):
    name: GraphName
    head: Annotated[str, Field(pattern=r"^L[0-9]+\.H[0-9]+$", description="a head, e.g. L1.H2")]
    query: Annotated[int, Field(ge=0, description="query position")]
    key: Annotated[int, Field(ge=0, description="key position (at most the query position)")]
    top_k: TopK(10, "feature pairs to list")


class QKPairRow(BaseModel):
    query_node: str
    key_node: str
    contribution: float


class QKResult(BaseModel):
    head: str
    query: int
    key: int
    score: float = Field(description="the head's attention score (scaled q·k) on the clean run")
    total: float = Field(description="sum of every pair's contribution (equals score)")
    pairs: list[QKPairRow]


def graph_qk(bench: Workbench, args: QKArgs, job: Job) -> QKResult:
    """Why did this head attend from query to key? Decomposes the head's attention score into
    contributions of (query-side node, key-side node) pairs of the graph, with norms frozen:
    score = sum over pairs of scaling · q_a · k_b ('BIAS' = bias terms). Example:
    graph_qk(name="ioi", head="L1.H2", query=14, key=2)"""
    g = graph_of(bench, args.name)
    layer, h = (int(x) for x in args.head[1:].split(".H"))
    if layer >= bench.engine.spec.n_layers:
        raise TdbError(f"layer {layer} is out of range; layers are 0..{bench.engine.spec.n_layers - 1}")
    Qc, Kc, scaling, score = qk_decompose(g, layer, h, args.query, args.key)
    P, top = qk_pairs(Qc, Kc, scaling, args.top_k)
    name = lambda c: "BIAS" if c < 0 else col_tid(g, c)  # noqa: E731
    return QKResult(head=args.head, query=args.query, key=args.key, score=score, total=float(P.sum()),
                    pairs=[QKPairRow(query_node=name(t.query_source), key_node=name(t.key_source),
                                     contribution=t.contribution) for t in top])


class ExportArgs(ToolArgs):
    name: GraphName
    pruned: Annotated[bool, Field(description="export the pruned graph (else every node and non-zero edge)")] = True
    node_threshold: Annotated[float, Field(ge=0, le=1)] = 0.8
    edge_threshold: Annotated[float, Field(ge=0, le=1)] = 0.98


class ExportResult(BaseModel):
    path: str
    nodes: int
    links: int
    problems: list[str] = Field(description="validation problems against the viewer's fields (empty: valid)")


def graph_export(bench: Workbench, args: ExportArgs, job: Job) -> ExportResult:
    """Save a graph as circuit-tracer / Neuronpedia graph JSON (nodes, links, metadata),
    loadable in their attribution-graph viewers; node `tdb_id`s are this server's ids.
    Example: graph_export(name="ioi", pruned=True)"""
    g = graph_of(bench, args.name)
    sq = square_of(g)
    p = pruned_of(g, args.node_threshold, args.edge_threshold) if args.pruned else None
    data = to_json(g, sq, p, slug=args.name, scan=bench.engine.name, scores=scores_of(g))
    out = write_export(bench, "graphs", args.name, f"{args.name}{'' if args.pruned else '-full'}.json",
                       jsonsafe.dumps(data))
    return ExportResult(path=out, nodes=len(data["nodes"]), links=len(data["links"]), problems=validate(data))


class NodeArgs(ToolArgs):
    name: GraphName
    node: NodeId
    top_k: TopK(10, "edges to list each way")
    layer: Annotated[int | None, Field(ge=-1, description="only neighbours at this layer (-1: embeddings; "
                                       "the number of layers: targets)")] = None
    position: Annotated[int | None, Field(ge=0, description="only neighbours at this position")] = None


class NodeResult(BaseModel):
    node: str
    activation: float | None = Field(description="a feature's activation (None for other nodes)")
    value: float | None = Field(description="its pre-activation (features) or value (targets), when its inputs "
                                "were computed")
    bias: float | None = Field(description="its value with every source at zero: value = bias + sum of inputs")
    inputs: list[GraphEdge] = Field(description="strongest incoming edges (empty if not expanded)")
    outputs: list[GraphEdge] = Field(description="strongest outgoing edges into expanded nodes and targets")


def graph_node(bench: Workbench, args: NodeArgs, job: Job) -> NodeResult:
    """What feeds this graph node and what does it feed? Its strongest incoming and outgoing
    edges (optionally only neighbours at one layer and/or position), its activation, and its
    value = bias + the sum of all its inputs. Example: graph_node(name="ioi", node="LOGIT", layer=1)"""
    g = graph_of(bench, args.name)
    src = g.src
    row = find_row(g, args.node) if args.node.startswith("LOGIT") else None
    col = None if row is not None else find_col(g, args.node)
    if col is not None:
        row = g.row_of_feature(col) if col < src.n_feat else None
    k = args.top_k
    inputs, outputs = [], []
    col_keep, row_keep = _neighbour_filter(bench, g, args.layer, args.position)
    if row is not None:
        a = g.edges.row(row) * col_keep
        for c in a.abs().topk(min(k, a.numel())).indices.tolist():
            if float(a[c]) != 0:
                inputs.append(GraphEdge(source=col_tid(g, c), target=row_tid(g, row), weight=float(a[c])))
    if col is not None:
        a = g.edges.column(col) * row_keep
        for r in a.abs().topk(min(k, a.numel())).indices.tolist():
            if float(a[r]) != 0:
                outputs.append(GraphEdge(source=col_tid(g, col), target=row_tid(g, r), weight=float(a[r])))
    act = float(src.feat_act[col]) if col is not None and col < src.n_feat else None
    return NodeResult(node=row_tid(g, row) if row is not None else col_tid(g, col), activation=act,
                      value=None if row is None else float(g.value[row]),
                      bias=None if row is None else float(g.bias[row]), inputs=inputs, outputs=outputs)


def _neighbour_filter(bench: Workbench, g, layer: int | None, position: int | None):
    """0/1 masks over source columns and adjacency rows: the nodes at that layer and position."""
    lay, pos = layer_position(g)
    nl = len(g.logits)
    row_lay = torch.cat([lay[g.rows], lay.new_full((nl,), bench.engine.spec.n_layers)])
    row_pos = torch.cat([pos[g.rows], pos.new_full((nl,), g.n_pos - 1)])
    masks = []
    for la, po in ((lay, pos), (row_lay, row_pos)):
        m = torch.ones_like(la, dtype=torch.bool)
        if layer is not None:
            m &= la == layer
        if position is not None:
            m &= po == position
        masks.append(m.to(device=g.value.device, dtype=torch.float32))
    return masks


class InterveneArgs(ToolArgs):
    name: GraphName
    nodes: Annotated[list[NodeId], Field(min_length=1, max_length=256, description="feature nodes to zero")]
    target: NodeId = "LOGIT"


def graph_intervene(bench: Workbench, args: InterveneArgs, job: Job) -> InterventionCheck:
    """Does the graph's account hold in the real model? Zeroes the given feature nodes in the
    model with its transcoders (or SAEs) spliced, error terms kept, with attention patterns
    and norm scales frozen (as in the graph) and free, and compares the measured change of the target with the graph's
    predictions (direct edges only, and propagated through the graph). Example:
    graph_intervene(name="ioi", nodes=["L1.tc.F7@14", "L2.tc.F30@14"])"""
    g = graph_of(bench, args.name)
    return check(g, [find_col(g, n) for n in args.nodes], find_row(g, args.target))


TOOLS: list[Tool] = [
    Tool("attribution_graph", GraphArgs, attribution_graph, WRITES_RESULT, long=True),
    Tool("graph_node", NodeArgs, graph_node, READ_ONLY),
    Tool("graph_edge_heads", EdgeHeadsArgs, graph_edge_heads, READ_ONLY, long=True),
    Tool("graph_qk", QKArgs, graph_qk, READ_ONLY),
    Tool("graph_export", ExportArgs, graph_export, WRITES_RESULT),
    Tool("graph_intervene", InterveneArgs, graph_intervene, READ_ONLY),
]


def has_graph_features(bench: Workbench) -> bool:
    """Graph tools need transcoders or residual-stream SAEs."""
    e = bench.engine
    return e.transcoders is not None or any(site == "resid" for (_, site), _ in e.saes.items())

