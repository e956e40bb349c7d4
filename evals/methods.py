"""The discovery methods compared on every case, and how one (case, method) is scored.

Ranking methods score every head and MLP block (the universe the faithfulness check
ablates) by |mean effect| over the case's first `n_rank` prompt pairs:

* `direct_effect`  ops.attribute(method="direct_effect")
* `act_times_grad` ops.attribute(method="act_times_grad", reference = the corrupted prompt)
* `ablation_sweep` ops.ablation_sweep(kind head and mlp, mode="resample", every position)

A ranking method's circuit is its smallest top-k whose faithfulness reaches 0.8 (under
the case's selection mode; the largest-faithfulness k when none does). The faithfulness
curve over k = 0..N gives CPR and CMD. The scripted planner and the LLM agent return a
circuit (nodes and edges), which is re-validated here on the case's pairs.
`scripted_planner_both` is the same planner required to reach the threshold under mean AND
resample ablation while it grows and prunes (`tdb-agent discover --ablation both`).
"""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
import traceback
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from evals.cost import Cost, count_passes
from evals.edge_methods import EDGE_METHODS, score_edges
from evals.scoring import SetScores, cpr_cmd, first_reaching, ranking, roc_auc, set_scores
from tdb_agent import ops
from tdb_agent.circuits import Evaluator, PromptPair, keep_set
from tdb_agent.engine import Engine
from tdb_agent.session import EngineSpec, open_session

Mode = Literal["mean", "resample"]
RANKING_METHODS = ("direct_effect", "act_times_grad", "ablation_sweep")
AGENT_METHODS = ("scripted_planner", "scripted_planner_both", "llm_agent")
THRESHOLD = 0.8


class Case(BaseModel):
    """One scored case: a model, its prompt pairs and the truth about them."""

    tier: str
    name: str
    model_dir: str | None = Field(None, description="HF folder; None = the bundled model")
    task: str | None = Field(None, description="bundled task name (the planner runs it as `discover --task`)")
    pairs: list[PromptPair]
    n_rank: int = 4
    truth_nodes: list[str]
    truth_edges: list[tuple[str, str]] = []
    truth_neurons: list[str] = []
    modes: list[Mode] = ["mean", "resample"]
    select_mode: Mode = "mean"
    note: str = ""
    edge_axis: bool = True  # also put the node rankings' curves on the edge axis (evals/edge_methods.py)


class MethodResult(BaseModel):
    tier: str
    case: str
    method: str
    status: str = "ok"  # "ok", "failed: ...", "not run: ..."
    found: list[str] = []
    nodes: SetScores | None = None
    edges: SetScores | None = None
    auc: float | None = None
    neuron_auc: float | None = None
    k: int | None = None
    faithfulness: dict[str, float] = {}
    cpr: dict[str, float] = {}
    cmd: dict[str, float] = {}
    cost: Cost = Cost()
    detail: dict = {}


def universe(engine: Engine) -> list[str]:
    s = engine.spec
    heads = [f"L{l}.H{h}" for l in range(s.n_layers) for h in range(s.n_heads)]
    return heads + [f"L{l}.MLP" for l in range(s.n_layers)]


def _mean(per_pair: list[dict[str, float]]) -> dict[str, float]:
    keys = set().union(*per_pair)
    return {k: sum(d.get(k, 0.0) for d in per_pair) / len(per_pair) for k in keys}


def rank(engine: Engine, method: str, pairs: list[PromptPair], neurons: bool = False) -> dict[str, float]:
    """|mean effect| per component over the pairs (heads and MLP blocks, or neurons)."""
    return {k: abs(v) for k, v in support(engine, method, pairs, neurons).items()}


def support(engine: Engine, method: str, pairs: list[PromptPair], neurons: bool = False) -> dict[str, float]:
    """Mean signed effect per component over the pairs, positive where the component moves the
    metric toward its clean value: direct effect and act×grad as they are ((a − a_ref) · ∂m/∂a),
    the ablation sweep's −(m(ablated) − m(clean))."""
    per_pair = []
    for p in pairs:
        if method in ("direct_effect", "act_times_grad"):
            r = ops.attribute(engine, p.prompt, p.target, p.distractor, method=method,
                              corrupted_prompt=p.corrupted_prompt if method == "act_times_grad" else None,
                              kinds=["neuron"] if neurons else ["head", "mlp"], top_k=None)
            per_pair.append({row.id: row.effect for row in r.rows})
        elif method == "ablation_sweep":
            d = {}
            for kind in (["neuron"] if neurons else ["head", "mlp"]):
                r = ops.ablation_sweep(engine, p.prompt, kind, p.target, p.distractor, mode="resample",
                                       corrupted_prompt=p.corrupted_prompt)
                d |= {row.id: -row.delta for row in r.rows}
            per_pair.append(d)
        else:
            raise ValueError(method)
    return _mean(per_pair)


class Curves:
    """Faithfulness of any node list under each mode, on the case's pairs (memoised)."""

    def __init__(self, engine: Engine, case: Case):
        self.engine = engine
        self.evaluators = {m: Evaluator(engine, case.pairs, mode=m) for m in case.modes}

    def of(self, node_lists: list[list[str]]) -> dict[str, list[float]]:
        out = {}
        for m, ev in self.evaluators.items():
            rows = ev.metric_rows([keep_set(n, self.engine.spec) for n in node_lists])
            out[m] = [ev.faithfulness(r) for r in rows]
        return out


def score_ranking(engine: Engine, case: Case, curves: Curves, method: str) -> MethodResult:
    res = MethodResult(tier=case.tier, case=case.name, method=method)
    uni = universe(engine)
    with count_passes() as cost:
        signed = support(engine, method, case.pairs[:case.n_rank])
    res.cost = cost
    scores = {k: abs(v) for k, v in signed.items()}
    order = ranking(scores, uni)
    curve = curves.of([order[:k] for k in range(len(uni) + 1)])
    sel = curve[case.select_mode]
    k = first_reaching(sel, THRESHOLD)
    if k is None:
        k = max(range(len(sel)), key=lambda i: sel[i])
        res.detail["threshold_reached"] = False
    res.k = k
    res.found = order[:k]
    res.nodes = set_scores(res.found, case.truth_nodes)
    res.auc = roc_auc(scores, case.truth_nodes, uni)
    for m, c in curve.items():
        res.faithfulness[m] = c[k]
        res.cpr[m], res.cmd[m] = cpr_cmd(c)
    res.detail["top5"] = [(u, round(scores.get(u, 0.0), 4)) for u in order[:5]]
    if case.edge_axis:
        from evals.edge_methods import node_ranking_on_edges
        res.detail["edge_axis"] = node_ranking_on_edges(engine, case, signed)
    if case.truth_neurons:
        with count_passes() as ncost:
            nscores = rank(engine, method, case.pairs[:case.n_rank], neurons=True)
        res.cost = res.cost + ncost
        s = engine.spec
        nuni = [f"L{l}.N{n}" for l in range(s.n_layers) for n in range(s.d_mlp)]
        res.neuron_auc = roc_auc(nscores, case.truth_neurons, nuni)
        res.detail["top_neuron"] = ranking(nscores, nuni)[0]
    return res


def _strip(cid: str) -> str:
    return cid.split("@")[0]


async def _planner_run(case: Case, workdir: Path, both: bool = False) -> tuple[list[str], list[tuple[str, str]], dict]:
    """The scripted planner through `tdb_agent.agent.discover`: `discover.run` for a bundled
    task (as `tdb-agent discover --task`), otherwise an in-process MCP session on the case's
    model with the case's pairs. `both`: the threshold must hold under mean and resample
    ablation (`--ablation both`; the case's selection mode first)."""
    from tdb_agent.agent import discover, planner
    from tdb_agent.agent.runstore import RunConfig, RunStore
    from tdb_agent.agent.toolbox import Toolbox

    if case.task is not None and case.model_dir is None:
        summary = await discover.run(RunConfig(task=case.task, ablation="both" if both else "mean"), workdir / "run",
                                     echo=lambda *_: None)
        graph = RunStore(workdir / "run").load_graph() or {}
        edges = [(_strip(e["source"]), _strip(e["target"])) for e in graph.get("links", graph.get("edges", []))]
        return [_strip(n) for n in summary.nodes], edges, {"planner_faithfulness": summary.faithfulness,
                                                           "planner_faithfulness_other": summary.faithfulness_other,
                                                           "tool_calls": summary.tool_calls}
    async with open_session(EngineSpec(model=case.model_dir), workspace=workdir / "workspace") as client:
        tb = Toolbox(client, RunStore(workdir / "run"))
        pairs = [p.model_dump() for p in case.pairs[:8]]
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", case.name).strip("-")
        modes = [case.select_mode] + ([m for m in ("mean", "resample") if m != case.select_mode] if both else [])
        result = await planner.discover(tb, None, pairs, name, modes=modes)
        show = await tb("circuit_show", name=name)
    edges = [(_strip(e["source"]), _strip(e["target"])) for e in show["edges"]]
    return [_strip(n) for n in result.nodes if n != "LOGITS"], edges, {
        "planner_faithfulness": result.faithfulness, "planner_faithfulness_other": result.faithfulness_other,
        "tool_calls": result.tool_calls}


async def _llm_run(case: Case, workdir: Path) -> tuple[list[str], list[tuple[str, str]], dict]:
    from tdb_agent.agent import discover
    from tdb_agent.agent.runstore import RunConfig, RunStore

    p = case.pairs[0]
    cfg = (RunConfig(task=case.task, planner="llm") if case.task and case.model_dir is None else
           RunConfig(prompt=p.prompt, corrupted_prompt=p.corrupted_prompt, target=p.target, distractor=p.distractor,
                     model=case.model_dir, planner="llm"))
    summary = await discover.run(cfg, workdir / "run", echo=lambda *_: None)
    graph = RunStore(workdir / "run").load_graph() or {}
    edges = [(_strip(e["source"]), _strip(e["target"])) for e in graph.get("links", graph.get("edges", []))]
    return [_strip(n) for n in summary.nodes], edges, {"agent_faithfulness": summary.faithfulness,
                                                       "tool_calls": summary.tool_calls,
                                                       "stopped_because": summary.stopped_because}


def score_agent(engine: Engine, case: Case, curves: Curves, method: str, keep_runs: Path | None = None) -> MethodResult:
    res = MethodResult(tier=case.tier, case=case.name, method=method)
    if method == "llm_agent" and not os.environ.get("OPENAI_BASE_URL"):
        res.status = "not run: no endpoint (set OPENAI_BASE_URL)"
        return res
    run = {"scripted_planner": _planner_run, "scripted_planner_both": lambda c, w: _planner_run(c, w, both=True),
           "llm_agent": _llm_run}[method]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(keep_runs) / f"{case.tier}-{case.name}-{method}" if keep_runs else Path(tmp)
            with count_passes() as cost:
                nodes, edges, detail = asyncio.run(run(case, workdir))
    except Exception as e:  # a failed run stays in the table
        while len(getattr(e, "exceptions", ())) == 1:  # the MCP session's task group
            e = e.exceptions[0]
        res.status = f"failed: {type(e).__name__}: {str(e)[:200]}"
        res.detail["traceback"] = traceback.format_exc()[-2000:]
        return res
    res.cost = cost
    res.detail |= detail
    uni = set(universe(engine))
    found = [n for n in dict.fromkeys(nodes) if n not in ("LOGITS", "EMB")]
    res.found = found
    # the node set at the universe's granularity: a neuron or latent counts as its MLP block
    blocks = list(dict.fromkeys(n if n in uni else _block_of(n) for n in found))
    res.nodes = set_scores(blocks, case.truth_nodes)
    res.k = len(blocks)
    if case.truth_edges:
        res.edges = set_scores({(_block_of(a), _block_of(b)) for a, b in edges}, case.truth_edges)
    valid = [n for n in blocks if n in uni]
    for m, c in curves.of([valid]).items():
        res.faithfulness[m] = c[0]
    if case.truth_neurons:
        res.detail["neurons_found"] = [n for n in found if ".N" in n]
    return res


def _block_of(cid: str) -> str:
    """L1.N5 -> L1.MLP; heads, blocks and LOGITS unchanged."""
    if ".N" in cid or ".mlp.F" in cid:
        return cid.split(".")[0] + ".MLP"
    return cid


def score_case(case: Case, methods: list[str], keep_runs: Path | None = None, log=print) -> list[MethodResult]:
    engine = Engine.load(case.model_dir, device="cpu")
    curves = Curves(engine, case)
    truth = MethodResult(tier=case.tier, case=case.name, method="(truth)", found=case.truth_nodes,
                         k=len(case.truth_nodes))
    truth.faithfulness = {m: c[0] for m, c in curves.of([case.truth_nodes]).items()}
    out = [truth]
    for method in methods:
        try:
            if method in RANKING_METHODS:
                r = score_ranking(engine, case, curves, method)
            elif method in EDGE_METHODS:
                r = score_edges(engine, case, curves, method)
            else:
                r = score_agent(engine, case, curves, method, keep_runs)
        except Exception as e:
            r = MethodResult(tier=case.tier, case=case.name, method=method,
                             status=f"failed: {type(e).__name__}: {str(e)[:200]}",
                             detail={"traceback": traceback.format_exc()[-2000:]})
        log(f"  {case.tier}/{case.name} {method}: {r.status}"
            + (f", node F1 {r.nodes.f1:.2f}" if r.nodes else "")
            + (f", f {r.faithfulness}" if r.faithfulness else "") + f" [{r.cost.short()}]")
        out.append(r)
    return out
