"""EAP-IG over activations: time and peak memory against an earlier ig_activations.py.

    git show e45a6b1:tdb_agent/ops/edges/ig_activations.py > /tmp/ig_before.py
    PYTHONPATH=. python tools/bench_ig_activations.py /tmp/ig_before.py [--steps 2] [--rounds 3]

On bench_edges' GPT-2-small-shaped random model, 2 prompt pairs of 128 tokens, in one process:
edge_scores(method="eap-ig", ig="activations") with the earlier module and with this checkout's,
alternating, medians of --rounds; peak extra memory as bench_edges.peak_mb measures it, and the
largest difference of the scores. (The earlier module must still import against this checkout:
e45a6b1's needs `capture.receiver_grads`, removed after 4be91ba, so compare it from a checkout
of 4be91ba.)
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import statistics
import tempfile
import time
import types
from pathlib import Path

import torch

from bench_edges import _return_freed_memory, peak_mb, random_pairs, small_model  # tools/ is on the path

from tdb_agent.ops.edges import eap as eap_mod
from tdb_agent.ops.edges import ig_activations as now_mod
from tdb_agent.ops.edges.eap import edge_scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", help="path of the earlier ig_activations.py")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    _return_freed_memory()
    spec = importlib.util.spec_from_file_location("ig_before", args.before)
    before = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(before)
    if "quadrature" not in inspect.signature(before.score_chunk).parameters:  # older than the option: Riemann only
        before = types.SimpleNamespace(score_chunk=lambda *a, quadrature="riemann", _f=before.score_chunk: _f(*a))
    if "steps_per_pass" not in inspect.signature(before.score_chunk).parameters:  # older: one step a pass
        before = types.SimpleNamespace(score_chunk=lambda *a, steps_per_pass=1, _f=before.score_chunk, **k: _f(*a, **k))
    with tempfile.TemporaryDirectory() as tmp:
        engine = small_model(Path(tmp), "auto")
        pairs = random_pairs(engine, 2, 128)
        secs: dict[str, list[float]] = {"before": [], "now": []}
        mem: dict[str, list[float]] = {"before": [], "now": []}
        scores, passes = {}, 0
        for r in range(args.rounds):
            for name, mod in (("before", before), ("now", now_mod)):
                eap_mod.ig_activations = mod
                box = {}

                def run():
                    t = time.perf_counter()
                    box["res"] = edge_scores(engine, pairs, method="eap-ig", steps=args.steps, ig="activations",
                                             batch_size=len(pairs))
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                    box["t"] = time.perf_counter() - t
                mem[name].append(peak_mb(run, engine.device))
                secs[name].append(box["t"])
                scores[name], passes = box["res"].scores, box["res"].backward_passes
                print(r, name, f"{box['t']:.1f} s", f"{mem[name][-1]:.0f} MB", flush=True)
        eap_mod.ig_activations = now_mod
        print(json.dumps({"steps": args.steps, "rounds": args.rounds, "passes": passes, "device": str(engine.device),
                          "seconds": {k: statistics.median(v) for k, v in secs.items()},
                          "peak_mb": {k: statistics.median(v) for k, v in mem.items()},
                          "max_abs_diff": float((scores["now"] - scores["before"]).abs().max()),
                          "scale": float(scores["before"].abs().max())}, indent=1))


if __name__ == "__main__":
    main()
