"""The scripted planner's graph step (`discover --graph`): a feature-level circuit for the
analysed prompt, checked by intervention before it is claimed.

1. attribution_graph on the first pair's prompt, target − distractor: the local replacement
   model over the server's transcoders (or residual SAEs), pruned by influence;
2. graph_intervene zeroes the graph's most influential features (up to `TOP_FEATURES`) together
   in the real model (dictionaries spliced, error terms kept) and measures the target's change
   with attention and norms frozen (as in the graph) and free;
3. the features are claimed only when the measurement agrees with the graph's propagated
   prediction: frozen within `TOLERANCE` of it (what is left is the real downstream MLPs'
   nonlinear response), and free in the same direction. Otherwise the report says why not;
4. once claimed, graph_to_circuit stores the pruned graph as the circuit `<circuit>-features`
   and circuit_validate measures its faithfulness on the analysed pair (the features and
   MLP error terms outside it ablated, attention live: circuits/features.py).
"""

from __future__ import annotations

from pydantic import BaseModel

from tdb_agent.agent.toolbox import Toolbox, ToolCallFailed

TOP_FEATURES = 5
TOLERANCE = 0.25  # |frozen measurement − prediction| <= TOLERANCE · |prediction|
NODE_THRESHOLD = 0.8
LISTED = 50  # top nodes asked for: embeddings and error nodes rank among the features


class FeatureCheck(BaseModel):
    nodes: list[str]
    predicted_direct: float
    predicted_total: float  # propagated through the graph
    measured_frozen: float  # attention patterns and norm scales frozen, as in the graph
    measured: float  # attention free


class GraphFindings(BaseModel):
    """The feature-level account of the analysed prompt and the check behind it."""
    graph: str
    prompt: str
    target: str
    replacement_score: float
    completeness_score: float
    features: list[str]  # the graph's most influential features, zeroed together by the check
    check: FeatureCheck
    tolerance: float = TOLERANCE
    claimed: bool
    why: str
    circuit: str | None = None  # the stored feature circuit (when claimed)
    circuit_nodes: int | None = None
    faithfulness: float | None = None  # of that circuit, on the analysed pair


def agrees(c: FeatureCheck, tolerance: float = TOLERANCE) -> tuple[bool, str]:
    p = c.predicted_total
    if abs(p) < 1e-6:
        return False, "the graph predicts no change for its top features"
    if abs(c.measured_frozen - p) > tolerance * abs(p):
        return False, (f"frozen measurement {c.measured_frozen:.3f} is more than {tolerance:.0%} off the "
                       f"prediction {p:.3f}")
    if c.measured * p <= 0:
        return False, f"with attention free the target moves the other way ({c.measured:.3f} vs {p:.3f})"
    return True, (f"frozen {c.measured_frozen:.3f} within {tolerance:.0%} of the prediction {p:.3f}; free "
                  f"{c.measured:.3f}, same direction")


async def graph_step(tb: Toolbox, ex: dict, circuit: str, notes: list[str]) -> GraphFindings | None:
    """Build, check and (when the check agrees) store the feature circuit of pair `ex`.
    Returns None (with a note) where the server has no graph tools or the graph fails."""
    if not await tb.has("attribution_graph"):
        notes.append("graph step skipped: the server has no attribution_graph tool (no transcoders or residual "
                     "SAEs loaded)")
        return None
    name = f"{circuit}-graph"
    try:
        g = await tb("attribution_graph", prompt=ex["prompt"], target=ex["target"], distractor=ex["distractor"],
                     name=name, node_threshold=NODE_THRESHOLD, top_k=LISTED)
        feats = [n["id"] for n in g["top_nodes"] if ".F" in n["id"]][:TOP_FEATURES]
        if not feats:
            notes.append(f"graph step: the graph {name!r} kept no feature nodes; nothing to claim")
            return None
        r = await tb("graph_intervene", name=name, nodes=feats, target="LOGIT")
    except ToolCallFailed as e:
        notes.append(f"graph step failed: {e}")
        return None
    check = FeatureCheck(**{k: r[k] for k in FeatureCheck.model_fields})
    ok, why = agrees(check)
    found = GraphFindings(graph=name, prompt=ex["prompt"], target=g["targets"][0],
                          replacement_score=g["replacement_score"], completeness_score=g["completeness_score"],
                          features=feats, check=check, claimed=ok, why=why)
    if not ok:
        notes.append(f"feature circuit not claimed: zeroing the graph's top {len(feats)} features: {why}")
        return found
    fc = f"{circuit}-features"
    try:
        made = await tb("graph_to_circuit", name=name, circuit=fc, overwrite=True)
        v = await tb("circuit_validate", name=fc, mode="mean", necessity=False)
    except ToolCallFailed as e:
        notes.append(f"feature circuit checked by intervention but not stored or validated: {e}")
        return found
    found.circuit, found.circuit_nodes, found.faithfulness = fc, made["nodes"], v["faithfulness"]
    notes.append(f"feature circuit `{fc}` ({made['nodes']} nodes) claimed: {why}; faithfulness "
                 f"{v['faithfulness']:.3f} (mean ablation of the features and MLP error terms outside it)")
    return found


def report_lines(found: GraphFindings | None) -> list[str]:
    """The report's feature-circuit section: the graph, the intervention check and the claim."""
    if found is None:
        return []
    c = found.check
    lines = ["", "## Feature circuit (attribution graph)", "",
             f"Graph `{found.graph}` of {found.prompt!r} -> {found.target}: replacement score "
             f"{found.replacement_score:.3f}, completeness {found.completeness_score:.3f}.", "",
             f"Check by intervention (graph_intervene): the top {len(found.features)} features "
             f"({', '.join(found.features)}) zeroed together in the real model.", "",
             "| | change of the target |", "|---|---|",
             f"| predicted, direct edges | {c.predicted_direct:.4f} |",
             f"| predicted, propagated through the graph | {c.predicted_total:.4f} |",
             f"| measured, attention and norms frozen | {c.measured_frozen:.4f} |",
             f"| measured, attention free | {c.measured:.4f} |", ""]
    if found.claimed and found.circuit:
        lines.append(f"**Claimed** ({found.why}): stored as circuit `{found.circuit}` ({found.circuit_nodes} "
                     f"nodes), faithfulness **{found.faithfulness:.3f}** (mean ablation of the features and MLP "
                     "error terms outside it, attention live; the analysed pair).")
    elif found.claimed:
        lines.append(f"Checked ({found.why}) but not stored: see the notes.")
    else:
        lines.append(f"**Not claimed**: {found.why} (tolerance {found.tolerance:.0%}).")
    return lines
