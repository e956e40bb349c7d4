"""EAP-IG's quadrature on a bundled task: each rule's per-edge error against the integral
(the last rule given, many nodes), and with --curves its CPR / CMD (as `python -m evals.edge_axis`).

    PYTHONPATH=. python tools/quadrature_error.py greater_than mean \\
        riemann:5 radau:5 gauss:4 gauss:5 riemann:20 riemann:50 radau:12 gauss:24
    PYTHONPATH=. python tools/quadrature_error.py greater_than resample riemann:5 radau:5 riemann:50 gauss:24

Rules: those of ops/edges/quadrature.py, and for comparison "gauss" (Gauss–Legendre: no node
at the clean run, which this tool adds with weight 0 for its sender outputs, one more pass
with gradients than a no-gradient clean forward would cost; the passes printed count it).
Error: ‖s − s_ref‖ / ‖s_ref‖ over the valid edges, the largest |s − s_ref| / max |s_ref|, and how
many of the reference's top 100 edges by |score| the rule's top 100 share.
"""

from __future__ import annotations

import argparse
import time

import torch
from numpy.polynomial import legendre

from evals.__main__ import bundled_cases
from evals.edge_axis import TASKS
from evals.edge_methods import REFERENCE
from tdb_agent.engine import Engine
from tdb_agent.ops.edges import eap, ig_activations, quadrature
from tdb_agent.ops.edges.faithfulness import EdgeEvaluator, faithfulness_curve


def nodes(rule: str, m: int) -> tuple[list[float], list[float]]:
    if rule == "gauss":
        x, w = legendre.leggauss(m)
        return [float(a) for a in (x + 1) / 2] + [1.0], [float(v) for v in w / 2] + [0.0]
    return quadrature.nodes(rule, m)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task", choices=TASKS)
    ap.add_argument("mode", choices=list(REFERENCE))
    ap.add_argument("rules", nargs="+", help="RULE:M, the last one the reference integral")
    ap.add_argument("--curves", action="store_true", help="CPR / CMD of each rule's scores too")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    eap.nodes = ig_activations.nodes = nodes  # the rules edge_scores integrates with, "gauss" among them
    engine = Engine.load(None, device="cpu")
    case = bundled_cases([args.task], 16)[0]
    ev = EdgeEvaluator(engine, case.pairs, REFERENCE[args.mode]) if args.curves else None
    out = {}
    for spec in args.rules:
        rule, m = spec.split(":")
        t0 = time.time()
        s = eap.edge_scores(engine, case.pairs, method="eap-ig", steps=int(m), reference=REFERENCE[args.mode],
                            quadrature=rule)
        out[spec] = s.scores
        line = f"{spec}: {time.time() - t0:.1f} s, {s.backward_passes} passes with gradients"
        if ev is not None:
            c = faithfulness_curve(engine, case.pairs, s.scores, evaluator=ev)
            line += f", CPR {c.cpr:.3f} CMD {c.cmd:.3f}"
        print(line, flush=True)
    ref_spec = args.rules[-1]
    valid = s.graph.valid.to(s.scores.device).expand_as(s.scores)
    ref = out[ref_spec][valid]
    top = set(ref.abs().topk(100).indices.tolist())
    for spec, x in out.items():
        x = x[valid]
        d = x - ref
        shared = len(top & set(x.abs().topk(100).indices.tolist()))
        print(f"{spec} against {ref_spec}: relative L2 {float(d.norm() / ref.norm()):.2e}, largest "
              f"{float(d.abs().max() / ref.abs().max()):.2e}, top-100 shared {shared}", flush=True)


if __name__ == "__main__":
    main()
