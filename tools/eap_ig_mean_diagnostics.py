"""Against the corpus mean: CPR / CMD of EAP-IG variants and node rankings on one bundled task,
with the budgets' cleaning (MIB's `prune_dangling`) and without it. Variants:

    act_times_grad, ablation_sweep      node rankings on the edge axis (as evals.edge_axis)
    activations:RULE:M, inputs:RULE:M   EAP-IG over that path, M nodes of RULE (quadrature.py)
    perhead:RULE:M                      over activations with one path per head (each head's z
                                        moved alone) instead of one per layer's heads

    PYTHONPATH=. python tools/eap_ig_mean_diagnostics.py greater_than act_times_grad \\
        activations:riemann:5 activations:radau:12 inputs:radau:12 perhead:radau:12
"""

from __future__ import annotations

import argparse
import copy

import torch

from evals.__main__ import bundled_cases
from evals.edge_axis import TASKS
from evals.edge_methods import node_ranking_on_edges
from evals.methods import support
from tdb_agent.engine import Engine
from tdb_agent.ops.edges import faithfulness, ig_activations as IA
from tdb_agent.ops.edges.capture import SenderActs, grad_pass, sender_sites
from tdb_agent.ops.edges.contract import contract
from tdb_agent.ops.edges.eap import edge_scores
from tdb_agent.ops.edges.faithfulness import EdgeEvaluator, faithfulness_curve
from tdb_agent.ops.edges.grads import BlockWeights, accumulate
from tdb_agent.ops.edges.quadrature import nodes


def per_head_chunk(engine, graph, chunk, ref_acts, steps, norm, out, per_position, quadrature="riemann",
                   steps_per_pass=1):
    """ig_activations.score_chunk with a path per head: each head's z moved from its reference
    to its clean value alone (the other heads of its layer clean); EMB and MLPs as there (one
    step a pass whatever steps_per_pass)."""
    alphas, step_w = nodes(quadrature, steps)
    weights = BlockWeights(engine)
    acts, g, m = grad_pass(engine, chunk.ids, chunk.target, chunk.distractor, None, norm, want_senders=True)
    clean_grads = accumulate(engine, None, acts, g, 1, norm, step_w[-1], weights)
    clean_acts = {site: acts[site] for site in sender_sites(engine)}
    passes = 1
    for i, (site, us) in enumerate(IA.sender_groups(engine)):
        c, r = clean_acts[site], ref_acts[site].to(clean_acts[site].dtype)
        r = r.expand_as(c)
        delta = IA._group_delta(engine, i, r, c)
        for h, u in ([(None, us)] if len(us) == 1 else [(h, [u]) for h, u in enumerate(us)]):
            G = copy.deepcopy(clean_grads)
            for alpha, w in zip(alphas[:-1], step_w[:-1]):
                value = r + alpha * (c - r)
                if h is not None:  # only head h moves
                    value = torch.cat([c[..., :h, :], value[..., h:h + 1, :], c[..., h + 1:, :]], dim=-2)
                acts, gk, _ = grad_pass(engine, chunk.ids, chunk.target, chunk.distractor, None, norm,
                                        want_senders=False, hooks={site: lambda x, st, v=value: v + (x - x.detach())})
                G = accumulate(engine, G, acts, gk, 1, norm, w, weights)
                passes += 1
            contract(engine, graph, SenderActs(full=delta if h is None else delta[..., h:h + 1, :]), G, out,
                     per_position, weights, slice(u[0], u[-1] + 1))
    return float(m.sum()), passes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task", choices=TASKS)
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.load(None, device="cpu")
    case = bundled_cases([args.task], 16)[0]
    case.modes = ["mean"]
    ev = EdgeEvaluator(engine, case.pairs, "mean")
    scores = {}
    for v in args.variants:
        if ":" in v:
            path, rule, m = v.split(":")
            whole = IA.score_chunk
            IA.score_chunk = per_head_chunk if path == "perhead" else whole
            try:
                scores[v] = edge_scores(engine, case.pairs, method="eap-ig", steps=int(m), reference="mean",
                                        ig="inputs" if path == "inputs" else "activations", quadrature=rule).scores
            finally:
                IA.score_chunk = whole
    cleaning = faithfulness.prune_dangling
    for cleaned in (True, False):
        faithfulness.prune_dangling = cleaning if cleaned else (lambda graph, keeps: keeps)
        try:
            for v in args.variants:
                if v in scores:
                    c = faithfulness_curve(engine, case.pairs, scores[v], evaluator=ev)
                    cpr, cmd = c.cpr, c.cmd
                else:
                    cpr, cmd = node_ranking_on_edges(engine, case, support(engine, v, case.pairs[:case.n_rank]))["mean"]
                print(f"{args.task} mean, {'cleaned' if cleaned else 'not cleaned'}, {v}: CPR {cpr:.3f} CMD {cmd:.3f}",
                      flush=True)
        finally:
            faithfulness.prune_dangling = cleaning


if __name__ == "__main__":
    main()
