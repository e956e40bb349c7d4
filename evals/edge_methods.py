"""Edge-level discovery methods (EAP, EAP-IG over inputs) scored beside the node methods.

Each method scores every edge of the model's edge graph (tdb_agent.ops.edges) on all the
case's pairs (a handful of batched passes) once per reference, as MIB does: against the
corrupted prompts (EAP-IG over inputs) and against the corpus means (EAP-IG over activations:
over inputs the path never visits the mean-patched states). Its circuit comes from the
corrupted scores: the fewest top edges whose exact edge-patched faithfulness, against the
corrupted prompts, reaches 0.8 (with every edge tied with the last one's score: a cut
inside a tie would choose by index), then pruned of its jointly unneeded edges
(`prune_unneeded`: edges whose removal, one at a time and all together, moves faithfulness
by < 0.05, the bundled references' threshold for an edge that matters; redundant backups,
which matter together, stay). (Against the corpus mean, an edge
circuit must also keep every edge whose mean differs from its clean value, which the truth
does not list; the mean curves are reported beside.) Scored:

* edge P / R / F1: the circuit's edges collapsed to (sender, receiving component) pairs
  (q, k and v inputs of one head are one pair; EMB senders dropped, as the truth has none)
  against the case's true edges; ROC AUC of max |score| per pair over every possible pair;
* node P / R / F1 of the components the edges imply, and their node-level faithfulness (the
  same check as the node methods');
* CPR / CMD of the edge faithfulness curve at the MIB budgets (0.1 % … 100 % of edges), under
  mean and resample (corrupted) references, each curve from the scores against that reference.
"""

from __future__ import annotations

import torch

from evals.cost import count_passes
from evals.scoring import roc_auc, set_scores
from tdb_agent.engine import Engine
from tdb_agent.ops.edges.eap import edge_scores
from tdb_agent.ops.edges.faithfulness import EdgeEvaluator, faithfulness_curve, close_ties, keep_masks, \
    prune_unneeded, smallest_circuit

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


def _collapse(g, top) -> set[tuple[str, str]]:
    """(sender, receiving component) pairs of ranked edges, EMB senders dropped."""
    out = set()
    for name, _ in top:
        u, r = g.parse_edge(name)
        out |= {(g.senders[u], node) for node in g.receivers[r].heads if g.senders[u] != "EMB"}
    return out


def score_edges(engine: Engine, case, curves, method: str):
    from evals.methods import MethodResult
    res = MethodResult(tier=case.tier, case=case.name, method=method)
    ref = "corrupted"
    kind = "eap-ig" if method == "eap_ig" else "eap"
    by_mode = {}
    with count_passes() as cost:
        for mode in sorted(set(case.modes) | {"resample"}):
            by_mode[mode] = edge_scores(engine, case.pairs, method=kind, steps=5, reference=REFERENCE[mode])
    res.cost = cost
    scores = by_mode["resample"]
    evaluators = {mode: EdgeEvaluator(engine, case.pairs, REFERENCE[mode]) for mode in case.modes}
    select = evaluators.get("resample") or EdgeEvaluator(engine, case.pairs, ref)
    n, f, _ = smallest_circuit(engine, case.pairs, scores.scores, THRESHOLD, evaluator=select)
    n = close_ties(g := scores.graph, scores.scores, n)
    top = scores.ranked(n)
    g = scores.graph
    prefix_pairs = _collapse(g, top)
    keep, f, dropped = prune_unneeded(select, keep_masks(g, scores.scores, [n])[0])
    top = [(name, v) for name, v in top if keep[g.parse_edge(name)]]
    n = len(top)
    res.detail["pruned"] = dropped
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
        res.detail["edge_f1_prefix"] = set_scores(prefix_pairs, truth).f1
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
    res.detail["ig"] = {m: s.ig for m, s in by_mode.items()}
    for mode, ev in evaluators.items():
        curve = faithfulness_curve(engine, case.pairs, by_mode[mode].scores, evaluator=ev)
        res.cpr[mode], res.cmd[mode] = curve.cpr, curve.cmd
    res.detail["edge_axis"] = {mode: [res.cpr[mode], res.cmd[mode]] for mode in evaluators}
    res.detail["n_edges_total"] = g.n_edges
    res.detail["top5"] = [(e, round(s, 4)) for e, s in top[:5]]
    return res


def node_ranking_on_edges(engine: Engine, case, support: dict[str, float]) -> dict[str, list[float]]:
    """A node ranking's CPR / CMD on the edge axis, by the edge methods' own procedure
    (`faithfulness_curve`: the MIB budgets, the circuit cleaned to its connected part, the same
    exact edge patching and reference, the same areas). The ranking becomes an edge order
    (`selection.node_order_keys`: an edge enters with the later of its two nodes, so the top
    edges at the k-th node's boundary are the edges among the top k nodes, which is node
    patching of the rest): CPR's from the nodes by signed support for the behaviour (its mean
    effect over the pairs, helpful first, harmful last), CMD's by |support|, as MIB ranks edges.
    {mode: [CPR, CMD]}."""
    from tdb_agent.ops.edges.graph import EdgeGraph
    from tdb_agent.ops.edges.selection import node_order_keys
    from evals.scoring import ranking
    from evals.methods import universe
    g = EdgeGraph(engine.spec)
    uni = universe(engine)
    out = {}
    for mode in case.modes:
        ev = EdgeEvaluator(engine, case.pairs, REFERENCE[mode])
        sign = 1.0 if ev.m_full >= ev.m_empty else -1.0
        signed = ranking({u: sign * v for u, v in support.items()}, uni)
        absolute = ranking({u: abs(v) for u, v in support.items()}, uni)
        keys = (node_order_keys(g, signed), node_order_keys(g, absolute))
        curve = faithfulness_curve(engine, case.pairs, torch.zeros(g.n_senders, g.n_receivers), evaluator=ev,
                                   keys=keys)
        out[mode] = [curve.cpr, curve.cmd]
    return out
