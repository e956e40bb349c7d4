"""A pruned attribution graph as a circuit hypothesis (`tdb_agent.circuits`): the same nodes
and edge weights, stored with the workbench's other circuits so circuit_list / show /
export and circuit_validate work on it (circuit_validate ablates the features and MLP error
terms outside it in the spliced model: circuits/features.py). Node ids become component ids: features `L1.tc.F7@4` (or
residual latents `L1.resid.F7@4`) and `EMB@p` stay as they are, an MLP error node
`ERR.L1.mlp@4` becomes `L1.MLP@4` (role 'transcoder error': the part of that MLP's output
the transcoder misses; in a graph over residual SAE latents, the MLP's whole output), and
the explained target becomes the sink `LOGITS`. Residual-SAE error nodes have no component
id; their share of the influence is recorded in the circuit's description."""

from __future__ import annotations

from typing import Annotated

import networkx as nx
import torch
from pydantic import BaseModel, Field

from tdb_agent import circuits as C
from tdb_agent.errors import TdbError
from tdb_agent.ops.graph.build import AttributionGraph
from tdb_agent.ops.graph.influence import Pruned, SquareGraph
from tdb_agent.ops.graph.views import pruned_of, square_of
from tdb_agent.ops.graph.query import find_row, row_tid, sq_tid
from tdb_agent.service.annotations import WRITES_RESULT
from tdb_agent.service.circuit_tools import circuit_store
from tdb_agent.service.graph_tools import GraphName, NodeId, PruneSettings, graph_of, pruning
from tdb_agent.service.limits import LimitExceeded
from tdb_agent.service.tool import Job, Tool, ToolArgs
from tdb_agent.workbench import Workbench

CircuitName = Annotated[str, Field(min_length=1, max_length=64, description="the circuit's name (default: the "
                                   "graph's name)")]


def circuit_node_id(graph_id: str) -> str | None:
    """The component id of a graph node id (None: no component, i.e. a residual error node)."""
    if graph_id.startswith("LOGIT"):
        return C.SINK
    if graph_id.startswith("ERR."):
        body, _, pos = graph_id[4:].partition("@")
        layer, _, site = body.partition(".")
        return f"{layer}.MLP@{pos}" if site == "mlp" else None
    return graph_id


def _pair(engine, g: AttributionGraph, row: int) -> C.PromptPair:
    ln = g.logits[row - len(g.rows)]
    toks = [engine.tokenizer.decode([t]) for t in ln.token_ids]
    return C.PromptPair(prompt=g.prompt, target=toks[0], distractor=toks[1] if len(toks) > 1 else None)


def graph_to_networkx_circuit(engine, g: AttributionGraph, sq: SquareGraph, p: Pruned, target_row: int,
                              name: str, source: str) -> nx.DiGraph:
    """The pruned graph's nodes that reach the target (through kept edges) and those edges,
    weights as in the graph; each node's evidence is its activation and influence."""
    nf_rows = len(g.rows)
    sink = sq.N - sq.n_logit + (target_row - nf_rows)
    kept = torch.stack(p.edges(), 1).tolist()  # (target, source) in square indices
    dg = nx.DiGraph()
    dg.add_edges_from((s, t) for t, s in kept)
    if sink not in dg:
        raise TdbError(f"no kept edge reaches {row_tid(g, target_row)}; lower the pruning thresholds (graph_prune)")
    nodes = nx.ancestors(dg, sink) | {sink}
    pair = _pair(engine, g, target_row)
    ev_args = {"graph": source, "prompt": g.prompt, "target": row_tid(g, target_row)}
    skipped = float(sum(p.node_influence[i] for i in nodes if i < sq.N - sq.n_logit
                        and circuit_node_id(sq_tid(g, sq, i)) is None))
    desc = (f"attribution graph {source!r} of {g.prompt!r} -> {row_tid(g, target_row)} ({g.mode}); edge weights "
            f"are direct effects (activation x gradient through frozen attention and norms)")
    if skipped:
        desc += f"; residual error nodes (influence {skipped:.3g}) have no component id and are left out"
    out = C.new_circuit(name, behaviour=C.Behaviour(pairs=[pair]), metric="logit_diff" if pair.distractor else None,
                        model=engine.name, description=desc)
    infl, ids = p.node_influence.tolist(), {}
    for i in sorted(nodes):
        gid = row_tid(g, target_row) if i == sink else sq_tid(g, sq, i)
        cid = circuit_node_id(gid)
        if cid is None:
            continue
        ids[i] = cid
        if cid == C.SINK:
            continue
        col = int(sq.cols[i])
        act = float(g.src.feat_act[col]) if col < g.src.n_feat else None
        role = ("embedding" if gid.startswith("EMB") else None) if not gid.startswith("ERR.") else (
            "transcoder error" if g.mode == "transcoders" else "MLP output (no transcoder)")
        C.add_node(out, cid, role=role, effect=infl[i], engine=engine,
                   evidence=[C.Evidence(tool="attribution_graph", args={**ev_args, "node": gid},
                                        value={"activation": act, "influence": infl[i]})])
    for t, s in kept:
        if s in ids and t in ids:
            weight = sq.weight(t, s)
            C.add_edge(out, ids[s], ids[t], weight=weight, engine=engine,
                       evidence=[C.Evidence(tool="attribution_graph", args=ev_args, value=weight)])
    return out


class ToCircuitArgs(ToolArgs, PruneSettings):
    name: GraphName
    target: NodeId = "LOGIT"
    circuit: CircuitName | None = None
    overwrite: Annotated[bool, Field(description="replace a circuit of that name")] = False


class ToCircuitResult(BaseModel):
    circuit: str
    nodes: int = Field(description="components in the circuit (the sink not counted)")
    edges: int
    saved_to: str


def graph_to_circuit(bench: Workbench, args: ToCircuitArgs, job: Job) -> ToCircuitResult:
    """Turn a pruned attribution graph into a circuit hypothesis: its kept nodes that reach
    the target and their edges, with the graph's weights and each node's activation and
    influence as evidence, stored like any circuit (circuit_list, circuit_show,
    circuit_export, circuit_validate: the features and MLP error terms outside it ablated,
    attention live). Pruning: the graph's last graph_prune settings unless
    given here. Example: graph_to_circuit(name="ioi", circuit="ioi-features")"""
    g = graph_of(bench, args.name)
    row = find_row(g, args.target)
    if row < len(g.rows):
        raise TdbError("the target of a circuit is one of the graph's targets (LOGIT or LOGIT[label])")
    sq = square_of(g)
    s = pruning(g, args)
    p = pruned_of(g, s.node_threshold, s.edge_threshold, s.max_feature_nodes)
    name = args.circuit or args.name
    circ = graph_to_networkx_circuit(bench.engine, g, sq, p, row, name, args.name)
    store = circuit_store(bench)
    try:
        path = store.put(name, circ, overwrite=args.overwrite)
    except LimitExceeded as e:
        raise LimitExceeded(f"{e}; or keep fewer graph nodes: a lower node_threshold / edge_threshold or a "
                            "max_feature_nodes cap") from e
    return ToCircuitResult(circuit=name, nodes=len(C.components(circ)), edges=circ.number_of_edges(),
                           saved_to=str(path))


TOOLS: list[Tool] = [Tool("graph_to_circuit", ToCircuitArgs, graph_to_circuit, WRITES_RESULT)]
