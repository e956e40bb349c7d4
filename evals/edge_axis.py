"""`python -m evals.edge_axis`: only the bundled tasks' edge-axis CPR / CMD table (the node
rankings and EAP / EAP-IG, mean and resample references), as `python -m evals` computes it,
printed as markdown; RESULTS.md is not touched. For checking a change to the curves or the
edge methods in minutes rather than the full run's half hour.

    python -m evals.edge_axis                          # ioi induction greater_than facts
    python -m evals.edge_axis --tasks greater_than --steps 20
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from evals.edge_methods import REFERENCE, node_ranking_on_edges
from evals.methods import RANKING_METHODS, support
from tdb_agent.engine import Engine
from tdb_agent.ops.edges.eap import edge_scores
from tdb_agent.ops.edges.quadrature import QUADRATURES
from tdb_agent.ops.edges.faithfulness import EdgeEvaluator, faithfulness_curve

TASKS = ["ioi", "induction", "greater_than", "facts"]


def edge_method_axis(engine: Engine, case, method: str, steps: int, quadrature: str = "riemann") -> dict[str, list[float]]:
    """{mode: [CPR, CMD]} of an edge method, scored against each mode's own reference (as
    `edge_methods.score_edges` does)."""
    out = {}
    for mode in case.modes:
        s = edge_scores(engine, case.pairs, method=method, steps=steps, reference=REFERENCE[mode], quadrature=quadrature)
        c = faithfulness_curve(engine, case.pairs, s.scores, evaluator=EdgeEvaluator(engine, case.pairs, REFERENCE[mode]))
        out[mode] = [c.cpr, c.cmd]
    return out


def main(argv: list[str] | None = None) -> int:
    from evals.__main__ import bundled_cases
    ap = argparse.ArgumentParser(prog="python -m evals.edge_axis", description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=TASKS, choices=TASKS)
    ap.add_argument("--steps", type=int, default=5, help="EAP-IG steps (the evals use 5, as MIB does)")
    ap.add_argument("--quadrature", default="riemann", choices=QUADRATURES, help="EAP-IG's rule over α (quadrature.py)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("TDB_EVAL_THREADS", "2")))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    engine = Engine.load(None, device="cpu")
    print("| case | method | CPR mean | CMD mean | CPR resample | CMD resample |\n|---|---|---|---|---|---|", flush=True)
    for case in bundled_cases(args.tasks, 16):
        rows = {m: node_ranking_on_edges(engine, case, support(engine, m, case.pairs[:case.n_rank]))
                for m in RANKING_METHODS}
        rows |= {"eap": edge_method_axis(engine, case, "eap", args.steps),
                 f"eap_ig (m={args.steps}, {args.quadrature})": edge_method_axis(engine, case, "eap-ig", args.steps,
                                                                                  args.quadrature)}
        for method, e in rows.items():
            cells = [f"{e[m][i]:.3f}" for m in ("mean", "resample") for i in (0, 1)]
            print(f"| {case.name} | {method} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n{time.time() - t0:.0f} s, {args.threads} threads", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
