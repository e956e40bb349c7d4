"""Querying a stored attribution graph: its strongest paths from the embeddings to a
target, pruning it again, grouping its features into supernodes. Numbers come from
`tdb_agent.ops.graph`."""

from __future__ import annotations

import json
from typing import Annotated

from pydantic import BaseModel, Field

from tdb_agent.ops.graph.views import pruned_of, scores_of, square_of
from tdb_agent.ops.graph.paths import strongest_paths_k
from tdb_agent.datasets.store import EXPLANATIONS, read_member
from tdb_agent.ops.graph.query import find_row, sq_tid
from tdb_agent.ops.graph.supernodes import agglomerate, profiles
from tdb_agent.service.annotations import READ_ONLY, WRITES_RESULT
from tdb_agent.service.graph_tools import GraphName, NodeId, PruneSettings, graph_of, pruning
from tdb_agent.service.tool import Job, Tool, ToolArgs
from tdb_agent.workbench import Workbench


class PathsArgs(ToolArgs):
    name: GraphName
    target: NodeId = "LOGIT"
    k: Annotated[int, Field(ge=1, le=50, description="how many paths")] = 5
    pruned: Annotated[bool, Field(description="only the pruned graph's edges (its last pruning)")] = True


class GraphPath(BaseModel):
    nodes: list[str] = Field(description="from an embedding to the target")
    strength: float = Field(description="product of the normalised edge weights (each edge's share of its "
                            "target's inputs)")
    weights: list[float] = Field(description="the raw edge weights along the path")


class PathsResult(BaseModel):
    target: str
    paths: list[GraphPath]


def graph_paths(bench: Workbench, args: PathsArgs, job: Job) -> PathsResult:
    """How does the prompt reach the target? The k strongest paths from the token embeddings
    to the target (or to a feature node), strength = product of normalised edge weights,
    exact (not greedy). Example: graph_paths(name="ioi", k=5)"""
    g = graph_of(bench, args.name)
    sq = square_of(g)
    row = find_row(g, args.target)
    n_src = len(sq.cols)
    t = n_src + row - len(g.rows) if row >= len(g.rows) else row  # feature rows come first in both
    mask = None
    if args.pruned:
        s = pruning(g)
        mask = pruned_of(g, s.node_threshold, s.edge_threshold, s.max_feature_nodes).edge_rows
    out = []
    for strength, path in strongest_paths_k(sq, t, args.k, mask):
        out.append(GraphPath(nodes=[sq_tid(g, sq, i) for i in path], strength=strength,
                             weights=[sq.weight(b, a) for a, b in zip(path, path[1:])]))
    return PathsResult(target=sq_tid(g, sq, t), paths=out)


class PruneArgs(ToolArgs, PruneSettings):
    name: GraphName
    top_k: Annotated[int, Field(ge=0, le=200, description="kept nodes to list (by influence)")] = 12


class KeptNode(BaseModel):
    id: str
    influence: float


class PruneResult(BaseModel):
    name: str
    node_threshold: float
    edge_threshold: float
    max_feature_nodes: int | None
    features: int = Field(description="feature nodes kept")
    errors: int = Field(description="error nodes kept")
    nodes: int = Field(description="all nodes kept (embeddings and targets included)")
    edges: int
    replacement_score: float
    completeness_score: float
    top_nodes: list[KeptNode]


def graph_prune(bench: Workbench, args: PruneArgs, job: Job) -> PruneResult:
    """Prune a stored graph again (thresholds on the cumulative influence on the target, a
    cap on feature nodes) and keep the settings for graph_paths, graph_to_circuit and
    graph_supernodes. Scores are of the whole graph. Example:
    graph_prune(name="ioi", node_threshold=0.6, max_feature_nodes=30)"""
    g = graph_of(bench, args.name)
    s = pruning(g, args, store=True)
    sq = square_of(g)
    p = pruned_of(g, s.node_threshold, s.edge_threshold, s.max_feature_nodes)
    nf, ne = sq.n_feat, sq.n_err
    n_src = len(sq.cols)
    kept = p.node_mask[:n_src].nonzero(as_tuple=True)[0]
    order = kept[p.node_influence[kept].argsort(descending=True)][: args.top_k].tolist()
    rep, comp = scores_of(g)
    return PruneResult(name=args.name, **s.model_dump(), features=int(p.node_mask[:nf].sum()),
                       errors=int(p.node_mask[nf:nf + ne].sum()), nodes=int(p.node_mask.sum()),
                       edges=int(p.edge_rows.sum()), replacement_score=rep, completeness_score=comp,
                       top_nodes=[KeptNode(id=sq_tid(g, sq, i), influence=float(p.node_influence[i]))
                                  for i in order])


def shipped_explanations(bench: Workbench) -> dict[str, str]:
    """Component id -> explanation text shipped next to the loaded dataset (empty without one)."""
    ds = getattr(bench, "dataset", None)
    raw = read_member(ds.folder, EXPLANATIONS) if ds is not None and getattr(ds, "folder", None) else None
    if raw is None:
        return {}
    data = json.loads(raw)
    return {k: v["explanation"] for k, v in data.items() if isinstance(v, dict) and v.get("explanation")}


class SupernodeArgs(ToolArgs):
    name: GraphName
    threshold: Annotated[float, Field(ge=-1, le=1, description="merge groups while their average cosine "
                                      "similarity of attribution profiles is at least this")] = 0.8
    max_features: Annotated[int, Field(ge=2, le=2000, description="group at most this many kept features "
                                       "(by influence)")] = 300


class Supernode(BaseModel):
    id: str
    label: str = Field(description="the explanation of its most influential member with one, else its ids")
    influence: float = Field(description="sum of its members' influence on the target")
    members: list[str]
    explanations: dict[str, str] = Field(description="member -> explanation, where one exists")


class SupernodeResult(BaseModel):
    name: str
    features: int = Field(description="feature nodes grouped (the pruned graph's, capped)")
    supernodes: list[Supernode] = Field(description="largest attribution first; singletons included")


def graph_supernodes(bench: Workbench, args: SupernodeArgs, job: Job) -> SupernodeResult:
    """Which features of the graph play the same part? Groups the pruned graph's feature
    nodes by their attribution profiles (where their influence on the target flows:
    cosine similarity, average-linkage clustering above `threshold`), labelled with the
    members' explanations where the dataset ships them. Example:
    graph_supernodes(name="ioi", threshold=0.8)"""
    g = graph_of(bench, args.name)
    sq = square_of(g)
    s = pruning(g)
    p = pruned_of(g, s.node_threshold, s.edge_threshold, s.max_feature_nodes)
    feats = p.node_mask[:sq.n_feat].nonzero(as_tuple=True)[0]
    feats = feats[p.node_influence[feats].argsort(descending=True)][: args.max_features]
    groups = agglomerate(profiles(sq, feats), args.threshold)
    expl = shipped_explanations(bench)
    infl = p.node_influence[feats].tolist()
    out = []
    for j, grp in enumerate(groups):
        grp = sorted(grp, key=lambda i: -infl[i])
        ids = [sq_tid(g, sq, int(feats[i])) for i in grp]
        ex = {n: expl[n.split("@")[0]] for n in ids if n.split("@")[0] in expl}
        label = next((ex[n] for n in ids if n in ex), ", ".join(ids[:4]) + (" ..." if len(ids) > 4 else ""))
        out.append(Supernode(id=f"S{j}", label=label, influence=sum(infl[i] for i in grp), members=ids,
                             explanations=ex))
    return SupernodeResult(name=args.name, features=len(feats), supernodes=out)


TOOLS: list[Tool] = [
    Tool("graph_paths", PathsArgs, graph_paths, READ_ONLY),
    Tool("graph_prune", PruneArgs, graph_prune, WRITES_RESULT),
    Tool("graph_supernodes", SupernodeArgs, graph_supernodes, READ_ONLY),
]
