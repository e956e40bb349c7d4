"""The edge tools: edge attribution (EAP, EAP-IG), edge circuits from a budget or a
faithfulness threshold (stored as circuit hypotheses), and faithfulness curves over edge
budgets scored like the MIB circuit track. The numbers come from `tdb_agent.ops.edges`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from tdb_agent import circuits as C
from tdb_agent.circuits.edges import circuit_edges, circuit_positions, edge_circuit, keep_mask
from tdb_agent.circuits.store import check_name
from tdb_agent.errors import TdbError
from tdb_agent.ops.edges.cache import pairs_key
from tdb_agent.ops.edges.eap import EdgeScores, edge_scores
from tdb_agent.ops.edges.faithfulness import MIB_BUDGETS, EdgeEvaluator, FaithfulnessCurve, close_ties, \
    faithfulness_curve, keep_masks, prune_unneeded, smallest_circuit
from tdb_agent.ops.edges.quadrature import Quadrature
from tdb_agent.service.annotations import READ_ONLY, WRITES_RESULT
from tdb_agent.service.circuit_tools import circuit_store
from tdb_agent.service.exports import in_workspace
from tdb_agent.service.fields import TopK
from tdb_agent.service.tool import Job, Tool, ToolArgs
from tdb_agent.workbench import Workbench

Task = Annotated[str | None, Field(description="a built-in task (see list_tasks) whose prompt pairs define the "
                                   "behaviour")]
Pairs = Annotated[list[C.PromptPair] | None, Field(max_length=64, description="explicit prompt pairs instead of a "
                                                   "task (each with a corrupted_prompt of the same length for "
                                                   "reference=corrupted)")]


class EdgeMethodArgs(ToolArgs):
    task: Task = None
    n_pairs: Annotated[int, Field(ge=1, le=64, description="how many pairs of the task")] = 8
    seed: Annotated[int, Field(ge=0, description="which pairs of the task")] = 0
    pairs: Pairs = None
    method: Annotated[Literal["eap", "eap-ig"], Field(
        description="eap: (reference − clean sender output) · gradient at the receiver's input (2 forwards + 1 "
                    "backward); eap-ig: the gradient averaged along a path from the reference to the clean run "
                    "(see ig), the MIB benchmark's recommended method")] = "eap-ig"
    steps: Annotated[int, Field(ge=1, le=64, description="eap-ig interpolation steps")] = 5
    reference: Annotated[Literal["corrupted", "mean"], Field(
        description="what a removed edge carries: the sender's output on the corrupted prompt, or its mean over "
                    "the reference corpus")] = "corrupted"
    metric: Annotated[Literal["logit_diff", "logprob"] | None, Field(
        description="default: logit_diff when every pair has a distractor, else logprob")] = None
    ig: Annotated[Literal["inputs", "activations"] | None, Field(
        description="eap-ig's path: inputs (token embeddings from the reference to the clean ones) or activations "
                    "(each sender group's output from its reference to its clean value, the rest recomputed: "
                    "1 + (2·layers + 1)·(steps − 1) passes); default inputs for reference=corrupted, activations "
                    "for reference=mean (the input path never visits mean-patched states)")] = None
    quadrature: Annotated[Quadrature, Field(
        description="eap-ig's rule for the integral over the path, at the same passes: riemann (MIB's right Riemann "
                    "sum, α = k/steps; error ~1/steps) or radau (right Gauss–Radau, the last node the clean run: "
                    "converges far faster where the path is smooth, e.g. over inputs)")] = "riemann"

    def behaviour(self) -> C.Behaviour:
        try:
            return C.Behaviour(task=self.task, n=self.n_pairs, seed=self.seed, pairs=self.pairs or [])
        except ValueError as e:
            raise TdbError(str(e)) from e

    def scores(self, bench: Workbench, per_position: bool = False) -> EdgeScores:
        """The edge scores of this behaviour, from the workbench's cache when a tool already
        computed them for the same pairs, method, steps, reference and model."""
        pairs = self.behaviour().resolve()
        batch = min(16, bench.limits.batch_size)
        key = (pairs_key(pairs), self.method, self.steps if self.method == "eap-ig" else None, self.reference,
               self.metric, per_position, batch, self.ig, self.quadrature if self.method == "eap-ig" else None)
        return bench.edge_scores.get(bench.engine, key, lambda: edge_scores(
            bench.engine, pairs, method=self.method, steps=self.steps, reference=self.reference, metric=self.metric,
            batch_size=batch, per_position=per_position, cache=bench.cache, ig=self.ig, quadrature=self.quadrature))

    def method_record(self, res: EdgeScores | None = None) -> dict:
        return {"method": self.method, "steps": self.steps if self.method == "eap-ig" else None,
                "reference": self.reference, "ig": res.ig if res is not None else self.ig,
                "quadrature": self.quadrature if self.method == "eap-ig" else None}


class EdgeRow(BaseModel):
    edge: str = Field(description="SENDER->RECEIVER[@t]; receivers are a head's q/k/v input (L1.H3.q), an MLP, "
                                  "LOGITS; @t: the token position (per_position)")
    source: str
    target: str = Field(description="the receiving component (for a shared key/value input: its first query head)")
    via: Literal["q", "k", "v", "direct"]
    score: float = Field(description="estimated change of the metric when this edge alone carries the reference")


class EdgeAttribution(BaseModel):
    method: str
    reference: str
    metric_name: str
    metric_clean: float = Field(description="mean metric over the pairs, unpatched")
    n_pairs: int
    n_edges_total: int
    forward_passes: int
    backward_passes: int
    edges: list[EdgeRow] = Field(description="ranked by |score|")


def _index(graph, edge: str) -> tuple[int, ...]:
    """Index of "SENDER->RECEIVER[@t]" in a [(s,) U, R] mask."""
    base, _, pos = edge.partition("@")
    return ((int(pos),) if pos else ()) + graph.parse_edge(base)


def _rows(res: EdgeScores, top_k: int, ranked: list[tuple[str, float]] | None = None) -> list[EdgeRow]:
    g = res.graph
    out = []
    for name, score in (ranked[:top_k] if ranked is not None else res.ranked(top_k)):
        s, r = g.parse_edge(name.split("@")[0])
        recv = g.receivers[r]
        out.append(EdgeRow(edge=name, source=g.senders[s], target=recv.heads[0], via=recv.via, score=score))
    return out


class EdgeAttributionArgs(EdgeMethodArgs):
    top_k: TopK(30, "how many edges to list")
    per_position: Annotated[bool, Field(description="score each edge at each token position (prompts of one "
                                        "length)")] = False


def edge_attribution(bench: Workbench, args: EdgeAttributionArgs, job: Job) -> EdgeAttribution:
    """Which edges between components carry the behaviour? Scores every edge of the model's
    edge graph (senders EMB, heads, MLPs -> receivers: each head's q, k and v input, MLPs,
    LOGITS) with EAP or EAP-IG in a handful of passes, averaged over prompt pairs, and lists
    the top ones. Example: edge_attribution(task="ioi", n_pairs=8, method="eap-ig")"""
    res = args.scores(bench, per_position=args.per_position)
    return EdgeAttribution(method=res.method, reference=res.reference, metric_name=res.metric_name,
                           metric_clean=res.metric_clean, n_pairs=res.n_pairs, n_edges_total=res.graph.n_edges,
                           forward_passes=res.forward_passes, backward_passes=res.backward_passes,
                           edges=_rows(res, args.top_k))


class EdgeCircuitArgs(EdgeMethodArgs):
    name: Annotated[str, Field(min_length=1, max_length=64, description="the circuit's name")]
    budget: Annotated[float | None, Field(gt=0, le=1, description="keep this fraction of all edges (top by "
                                          "|score|)")] = None
    n_edges: Annotated[int | None, Field(ge=1, le=4096, description="keep this many top edges")] = None
    threshold: Annotated[float | None, Field(gt=0, le=1.5, description="keep the fewest top edges whose "
                                             "faithfulness reaches this")] = None
    overwrite: Annotated[bool, Field(description="replace an existing circuit of that name")] = False
    per_position: Annotated[bool, Field(description="pin each edge to a token position (SENDER->RECEIVER@t; "
                                        "prompts of one token length): the budget counts edge-position pairs")] = False
    prune: Annotated[bool, Field(description="then drop the jointly unneeded edges: those whose removal, one at a "
                                 "time and all together, moves faithfulness by less than 0.05 (exact edge "
                                 "patching; backups that matter together stay)")] = False



class EdgeCircuitOut(BaseModel):
    name: str
    saved_to: str
    n_edges: int
    n_edges_total: int
    faithfulness: float = Field(description="of exactly these edges (every other edge carries the reference)")
    nodes: list[str] = Field(description="components the edges imply")
    edges: list[EdgeRow] = Field(description="the circuit's edges, ranked (at most 64 listed)")
    forward_passes: int


def edge_circuit_tool(bench: Workbench, args: EdgeCircuitArgs, job: Job) -> EdgeCircuitOut:
    """Build an edge circuit: score the edges (EAP/EAP-IG), keep the top ones by a budget, a
    count, or the fewest reaching a faithfulness threshold, measure the kept set's faithfulness
    by exact edge patching, and store it as a circuit hypothesis (edges with their scores as
    evidence; nodes implied). Example: edge_circuit(name="ioi_edges", task="ioi", threshold=0.8)"""
    engine = bench.engine
    if sum(x is not None for x in (args.budget, args.n_edges, args.threshold)) != 1:
        raise TdbError("give exactly one of budget, n_edges or threshold")
    store = circuit_store(bench)
    check_name(args.name)
    if not args.overwrite and args.name in bench.circuits:
        raise TdbError(f"a circuit named {args.name!r} exists; pick another name or pass overwrite=true")
    res = args.scores(bench, per_position=args.per_position)
    pairs = args.behaviour().resolve()
    job.progress(1, 3)
    positions = res.scores.shape[0] if args.per_position else None
    n_total = res.graph.n_edges * (positions or 1)
    passes = res.forward_passes
    ev = EdgeEvaluator(engine, pairs, args.reference, args.metric, bench.limits.batch_size, bench.cache)
    if args.threshold is not None:
        n, f, _ = smallest_circuit(engine, pairs, res.scores, args.threshold, evaluator=ev)
        tied = close_ties(res.graph, res.scores, n)  # never cut inside a group of equal scores
        if tied != n:
            n = tied
            (f,) = ev.faithfulness(keep_masks(res.graph, res.scores, [n]))
    else:
        n = args.n_edges if args.n_edges is not None else max(1, round(args.budget * n_total))
        n = min(n, n_total)
        (f,) = ev.faithfulness(keep_masks(res.graph, res.scores, [n]))
    ranked = res.ranked(n)
    if args.prune:
        keep, f, _ = prune_unneeded(ev, keep_masks(res.graph, res.scores, [n])[0])
        ranked = [(e, s) for e, s in ranked if keep[_index(res.graph, e)]]
        n = len(ranked)
    passes += ev.forward_passes
    job.progress(2, 3)
    g = edge_circuit(engine, args.name, ranked, behaviour=args.behaviour(), metric=res.metric_name,
                     method=args.method_record(res), positions=positions)
    g.graph["faithfulness"] = f
    g.graph["validation"] = {"granularity": "edge", "faithfulness": f, "n_edges": n, "n_edges_total": n_total,
                             "reference": args.reference, "metric_name": res.metric_name,
                             "metric": ev.m_empty + f * (ev.m_full - ev.m_empty)}
    path = store.put(args.name, g)
    return EdgeCircuitOut(name=args.name, saved_to=in_workspace(bench, path), n_edges=n, n_edges_total=n_total, faithfulness=f,
                          nodes=C.components(g), edges=_rows(res, min(n, 64), ranked), forward_passes=passes)


class EdgeFaithfulnessArgs(EdgeMethodArgs):
    circuit: Annotated[str | None, Field(max_length=64, description="an edge circuit to validate (its behaviour "
                                         "is used unless a task or pairs are given); its faithfulness is "
                                         "recorded")] = None
    budgets: Annotated[list[float] | None, Field(max_length=32, description="fractions of all edges (default the "
                                                 "MIB budgets 0.1 % … 100 %)")] = None


class EdgeFaithfulnessOut(FaithfulnessCurve):
    method: str
    circuit: str | None = None
    circuit_faithfulness: float | None = Field(None, description="of exactly the circuit's edges")
    circuit_n_edges: int | None = None
    circuit_metric: float | None = Field(None, description="mean metric with exactly the circuit's edges kept")


def edge_faithfulness(bench: Workbench, args: EdgeFaithfulnessArgs, job: Job) -> EdgeFaithfulnessOut:
    """Validate with edge granularity: the faithfulness curve of the method's edge ranking at
    edge budgets (MIB: 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100 %), its CPR (area under the
    curve, higher is better) and CMD (area between the curve and 1, 0 is best), each point by
    exact edge patching; with `circuit`, also the faithfulness of that edge circuit's edges.
    Example: edge_faithfulness(task="ioi", method="eap-ig")"""
    engine = bench.engine
    g = None
    if args.circuit is not None:
        store = circuit_store(bench)
        g = store.get(args.circuit)
        edges = circuit_edges(g)
        if args.task is None and not args.pairs:
            b = C.behaviour(g)
            if b is None:
                raise TdbError("the circuit has no behaviour; give a task or pairs")
            args = args.model_copy(update={"task": b.task, "n_pairs": b.n, "seed": b.seed, "pairs": b.pairs or None})
    res = args.scores(bench)
    job.progress(1, 3)
    ev = EdgeEvaluator(engine, args.behaviour().resolve(), args.reference, args.metric, bench.limits.batch_size,
                       bench.cache)
    curve = faithfulness_curve(engine, [], res.scores, budgets=args.budgets or MIB_BUDGETS, evaluator=ev)
    out = EdgeFaithfulnessOut(**curve.model_dump(), method=args.method)
    if g is not None:
        positions = circuit_positions(g)
        lengths = sorted({grp.ids.shape[1] for grp in ev.groups})
        if positions is not None and lengths != [positions]:
            raise TdbError(f"circuit {args.circuit!r} pins its edges to the positions of {positions}-token prompts; "
                           f"these pairs have {lengths} tokens")
        (f,) = ev.faithfulness(keep_mask(engine, edges, positions))
        out.circuit, out.circuit_faithfulness, out.circuit_n_edges = args.circuit, f, len(edges)
        out.circuit_metric = ev.m_empty + f * (ev.m_full - ev.m_empty)
        with store.edit(args.circuit) as h:
            h.graph["faithfulness"] = f
            h.graph["validation"] = {"granularity": "edge", "faithfulness": f, "n_edges": len(edges),
                                     "n_edges_total": curve.n_edges_total, "reference": args.reference,
                                     "metric_name": curve.metric_name, "cpr": curve.cpr, "cmd": curve.cmd,
                                     "metric": out.circuit_metric}
    out.forward_passes = ev.forward_passes + res.forward_passes
    job.progress(3, 3)
    return out


TOOLS: list[Tool] = [
    Tool("edge_attribution", EdgeAttributionArgs, edge_attribution, READ_ONLY, long=True),
    Tool("edge_circuit", EdgeCircuitArgs, edge_circuit_tool, WRITES_RESULT, long=True),
    Tool("edge_faithfulness", EdgeFaithfulnessArgs, edge_faithfulness, WRITES_RESULT, long=True),
]
