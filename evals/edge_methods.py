"""Edge-level discovery methods (EAP, EAP-IG over inputs) scored beside the node methods.

Each method scores every edge of the model's edge graph (tdb_agent.ops.edges) on all the
case's pairs (a handful of batched passes, still fewer than the node methods spend on
`n_rank` pairs) against the corrupted prompts, as MIB does. Its circuit is the fewest top
edges whose exact edge-patched faithfulness, against the corrupted prompts, reaches 0.8.
(Against the corpus mean, an edge circuit must also keep every edge whose mean differs from
its clean value, which the truth does not list; the mean curves are reported beside.) Scored:

* edge P / R / F1: the circuit's edges collapsed to (sender, receiving component) pairs
  (q, k and v inputs of one head are one pair; EMB senders dropped, as the truth has none)
  against the case's true edges; ROC AUC of max |score| per pair over every possible pair;
* node P / R / F1 of the components the edges imply, and their node-level faithfulness (the
  same check as the node methods');
* CPR / CMD of the edge faithfulness curve at the MIB budgets (0.1 % … 100 % of edges), under
  mean and resample (corrupted) references.
"""

from __future__ import annotations

from evals.cost import count_passes
from evals.scoring import roc_auc, set_scores
from tdb_agent.engine import Engine
from tdb_agent.ops.edges.eap import edge_scores
from tdb_agent.ops.edges.faithfulness import EdgeEvaluator, faithfulness_curve, smallest_circuit

EDGE_METHODS = ("eap", "eap_ig")
THRESHOLD = 0.8
REFERENCE = {"mean": "mean", "resample": "corrupted"}


def _pair_scores(res) -> dict[tuple[str, str], float]:
    """max |score| per (sender, receiving component), EMB senders dropped."""
    g, s = res.graph, res.scores.abs()
    out: dict[tuple[str, str], float] = {}
    valid = g.valid
    for u in range(1, g.n_senders):
        for r in range(g.n_receivers):
            if not valid[u, r]:
                continue
            for node in g.receivers[r].heads:
                key = (g.senders[u], node)
                out[key] = max(out.get(key, 0.0), float(s[u, r]))
    return out


def score_edges(engine: Engine, case, curves, method: str):
    from evals.methods import MethodResult
    res = MethodResult(tier=case.tier, case=case.name, method=method)
    ref = "corrupted"
    kind = "eap-ig" if method == "eap_ig" else "eap"
    with count_passes() as cost:
        scores = edge_scores(engine, case.pairs, method=kind, steps=5, reference=ref)
    res.cost = cost
    evaluators = {mode: EdgeEvaluator(engine, case.pairs, REFERENCE[mode]) for mode in case.modes}
    select = evaluators.get("resample") or EdgeEvaluator(engine, case.pairs, ref)
    n, f, _ = smallest_circuit(engine, case.pairs, scores.scores, THRESHOLD, evaluator=select)
    top = scores.ranked(n)
    g = scores.graph
    pairs_found = set()
    nodes: list[str] = []
    for name, _ in top:
        u, r = g.parse_edge(name)
        for node in g.receivers[r].heads:
            if g.senders[u] != "EMB":
                pairs_found.add((g.senders[u], node))
            nodes += [x for x in (g.senders[u], node) if x not in ("EMB", "LOGITS")]
    nodes = list(dict.fromkeys(nodes))
    res.k, res.found = n, nodes
    res.nodes = set_scores(nodes, case.truth_nodes)
    ps = _pair_scores(scores)
    if case.truth_edges:
        truth = {tuple(e) for e in case.truth_edges}
        res.edges = set_scores(pairs_found, truth)
        keyed = {f"{a}->{b}": v for (a, b), v in ps.items()}
        res.detail["edge_auc"] = roc_auc(keyed, [f"{a}->{b}" for a, b in truth], list(keyed))
    node_score: dict[str, float] = {}
    for (a, b), v in ps.items():
        for x in (a, b):
            if x != "LOGITS":
                node_score[x] = max(node_score.get(x, 0.0), v)
    from evals.methods import universe
    res.auc = roc_auc(node_score, case.truth_nodes, universe(engine))
    res.faithfulness = {m: c[0] for m, c in curves.of([nodes]).items()}
    res.detail["edge_faithfulness"] = {"resample": f}
    for mode, ev in evaluators.items():
        curve = faithfulness_curve(engine, case.pairs, scores.scores, evaluator=ev)
        res.cpr[mode], res.cmd[mode] = curve.cpr, curve.cmd
    res.detail["n_edges_total"] = g.n_edges
    res.detail["top5"] = [(e, round(s, 4)) for e, s in top[:5]]
    return res
