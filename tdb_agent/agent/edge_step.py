"""The scripted planner's edge step: which edges between the circuit's components carry the
behaviour, and how faithful an edge circuit is.

After the node circuit is found, the planner scores every edge of the model's edge graph
with EAP-IG against the corrupted prompts over the task's pairs (`edge_circuit`, which keeps
the fewest top edges that reach the threshold, ties at the cut taken whole, then drops the
jointly unneeded ones by exact patching, and stores them as their own circuit), then
measures that edge circuit's faithfulness curve over the MIB edge budgets
(`edge_faithfulness`: CPR, CMD). The node circuit gains the top edges that join two of its
components (or one of them and the logits), each with its score and the curve behind it as
evidence; its nodes are left as they are. A model whose family the edge methods refuse gets
a note, and the run goes on.
"""

from __future__ import annotations

import re

from pydantic import BaseModel

from tdb_agent.agent.toolbox import Toolbox, ToolCallFailed

#: the edge method's settings: EAP-IG over inputs, the MIB circuit track's recommendation
METHOD = {"method": "eap-ig", "steps": 5, "reference": "corrupted"}
#: the task pairs the edges are scored and the curve measured on
N_PAIRS = 8


class EdgeFinding(BaseModel):
    edge: str  # SENDER->RECEIVER, the receiver a head's q/k/v input, an MLP or LOGITS
    source: str
    target: str
    via: str
    score: float  # EAP-IG: the metric's estimated change when this edge alone carries the reference


class EdgeFindings(BaseModel):
    """The measurement behind the discovered circuit's edges."""
    circuit: str  # the edge circuit's name (stored beside the node circuit)
    method: dict
    n_pairs: int
    n_edges: int  # the fewest top edges reaching the threshold (or all of them), less the unneeded ones
    n_edges_total: int
    threshold: float
    faithfulness: float  # of exactly those edges, by exact edge patching
    budget: float  # n_edges / n_edges_total: the edge budget where the curve reaches the threshold
    cpr: float | None = None  # area under the faithfulness curve over the MIB budgets (higher is better)
    cmd: float | None = None  # area between the curve and 1 (0 is best)
    curve: list[tuple[float, float]] = []  # (budget, faithfulness)
    edges: list[EdgeFinding]  # the edge circuit's top edges, ranked by |score|
    added: list[str] = []  # the edges stated on the node circuit (source->target)
    removed: list[str] = []  # direct-effect edges into the logits that the faithful edge circuit does without


def _behaviour(task: str | None, pairs: list[dict]) -> dict:
    if task:
        return {"task": task, "n_pairs": N_PAIRS}
    return {"pairs": pairs[:N_PAIRS]}


async def edge_step(tb: Toolbox, task: str | None, pairs: list[dict], circuit: str, nodes: list[str],
                    threshold: float, notes: list[str]) -> EdgeFindings | None:
    """Score the edges, build and measure the edge circuit, and state the edges among `nodes`
    on `circuit`. Returns None (with a note) where the edge tools are missing or refuse."""
    if not await tb.has("edge_circuit"):
        notes.append("no edge_circuit tool on this server: the circuit's edges come from traces only")
        return None
    name = f"{circuit}-edges"[:64]
    behaviour = _behaviour(task, pairs)
    try:
        ec = await tb("edge_circuit", name=name, **behaviour, **METHOD, threshold=threshold, prune=True,
                      overwrite=True)
        curve = await tb("edge_faithfulness", circuit=name, **behaviour, **METHOD)
    except ToolCallFailed as e:
        notes.append(f"no edge-level analysis: {e}")
        return None
    found = EdgeFindings(
        circuit=name, method=METHOD, n_pairs=curve["n_pairs"], n_edges=ec["n_edges"],
        n_edges_total=ec["n_edges_total"], threshold=threshold, faithfulness=ec["faithfulness"],
        budget=ec["n_edges"] / ec["n_edges_total"], cpr=curve["cpr"], cmd=curve["cmd"],
        curve=[(p["budget"], p["faithfulness"]) for p in curve["points"]],
        edges=[EdgeFinding(**{k: r[k] for k in ("edge", "source", "target", "via", "score")}) for r in ec["edges"]])
    reached = "reaches" if found.faithfulness >= threshold else "stays below"
    notes.append(f"edges (EAP-IG, corrupted reference, {found.n_pairs} pair{'s' if found.n_pairs != 1 else ''}): the top {found.n_edges} of "
                 f"{found.n_edges_total} edges ({100 * found.budget:.2f} %) have faithfulness "
                 f"{found.faithfulness:.3f} ({reached} {threshold}); faithfulness curve CPR {found.cpr:.3f}, "
                 f"CMD {found.cmd:.3f}; stored as circuit {name!r}")
    await _state_edges(tb, circuit, nodes, found, notes)
    return found


async def _state_edges(tb: Toolbox, circuit: str, nodes: list[str], found: EdgeFindings, notes: list[str]) -> None:
    """Add to the node circuit the edge circuit's edges between its components (and into the
    logits): one edge per pair of components, its weight the strongest score, its via that
    of an edge the circuit already has for the pair (a circuit keeps one per pair), every
    q/k/v score as evidence beside the curve's measurement."""
    show = await tb("circuit_show", name=circuit)
    have = {(e["source"], e["target"]): e["via"] for e in show["edges"]}
    inside = set(nodes) | {"LOGITS"}
    curve_ev = {"tool": "edge_faithfulness", "args": {"circuit": found.circuit, "n_edges": found.n_edges,
                                                      "budget": round(found.budget, 6), "cpr": round(found.cpr, 4),
                                                      "cmd": round(found.cmd, 4), **found.method},
                "value": round(found.faithfulness, 4)}
    by_pair: dict[tuple[str, str], dict] = {}
    for e in found.edges:  # ranked: the first row of a pair is its strongest
        if e.source not in inside or e.target not in inside:
            continue
        key = (e.source, e.target)
        ev = {"tool": "edge_circuit", "args": {"edge": e.edge, "circuit": found.circuit, **found.method},
              "value": round(e.score, 6)}
        if key not in by_pair:
            # a pair the circuit has keeps its weight (another measurement); a new one weighs its score
            by_pair[key] = {"source": e.source, "target": e.target, "weight": None if key in have else e.score,
                            "via": have.get(key, e.via), "evidence": [ev]}
        else:
            by_pair[key]["evidence"].append(ev)
    edges = sorted(by_pair.values(), key=lambda x: (x["source"], x["target"]))
    for x in edges:
        x["evidence"].append(curve_ev)
    # a direct effect is no evidence that an edge into the logits is needed: where the edge
    # circuit (complete in hand, and reaching the threshold by exact patching) does without
    # one, the node circuit drops it
    into = {e.source for e in found.edges if e.target == "LOGITS"}
    if found.faithfulness >= found.threshold and len(found.edges) == found.n_edges:
        drop = [{"source": s, "target": t} for (s, t) in have if t == "LOGITS" and s in inside and s not in into
                and re.fullmatch(r"L\d+\.(H\d+|MLP)", s)]  # a neuron or latent is not a sender of the graph
        if drop:
            await tb("circuit_remove", name=circuit, edges=drop)
            found.removed = [f"{d['source']}->LOGITS" for d in drop]
            notes.append(f"edges into the logits without an edge in the edge circuit removed: "
                         f"{', '.join(found.removed)} (their direct effect is not needed for faithfulness "
                         f"{found.faithfulness:.3f})")
    if not edges:
        notes.append(f"none of the top {len(found.edges)} edges joins two of the circuit's components")
        return
    await tb("circuit_add", name=circuit, edges=edges)
    found.added = [f"{x['source']}->{x['target']}" for x in edges]


def report_lines(found: EdgeFindings | None) -> list[str]:
    """The report's edge section: the edge circuit's curve and its top edges with their scores."""
    if found is None:
        return []
    m = found.method
    lines = ["", "## Edge circuit", "",
             f"`{found.circuit}`: {m['method']} ({m['steps']} steps, {m['reference']} reference, {found.n_pairs} "
             f"pair{'s' if found.n_pairs != 1 else ''}). The top **{found.n_edges}** of {found.n_edges_total} edges (budget "
             f"{100 * found.budget:.2f} %) have faithfulness **{found.faithfulness:.3f}** (threshold "
             f"{found.threshold}, exact edge patching). Faithfulness curve over the MIB budgets: "
             f"**CPR {found.cpr:.3f}**, **CMD {found.cmd:.3f}**.", "",
             "| budget | " + " | ".join(f"{100 * b:g} %" for b, _ in found.curve) + " |",
             "|---|" + "---|" * len(found.curve),
             "| faithfulness | " + " | ".join(f"{f:.3f}" for _, f in found.curve) + " |",
             "", "| edge | via | score | on the node circuit |", "|---|---|---|---|"]
    if found.removed:
        lines[-3:-3] = ["", f"Removed from the node circuit (no edge of the edge circuit): "
                                f"{', '.join(found.removed)}."]
    added = set(found.added)
    for e in found.edges:
        lines.append(f"| {e.edge} | {e.via} | {e.score:.4f} | "
                     f"{'yes' if f'{e.source}->{e.target}' in added else ''} |")
    return lines
