"""Benchmark circuit pruning: passes run a block at a time (rows sharing the blocks where their
keep-sets agree) against whole passes, the naive baseline, in one process.

    PYTHONPATH=. python tools/bench_prune.py [--task ioi] [--pairs 16] [--mode mean|resample] [--repeats 3] [--threads 1]

Prunes the bundled model's whole universe (every head and MLP) on a task's pairs to faithfulness
0.8 (greedy backward elimination: each step evaluates every remaining node's removal),
alternating `Evaluator.layerwise` False / True in each round (medians), and checks that both
keep the same nodes. Under resample ablation the block-at-a-time passes also run only the
positions after those each pair shares with its corrupted prompt. Prints the times, their
ratio, and the block-tokens (rows x positions x blocks) each ran.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tdb_agent import circuits as C
from tdb_agent.circuits.evaluate import Evaluator
from tdb_agent.engine import Engine
from tdb_agent.ops.runs import RunCache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="ioi")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--mode", choices=["mean", "resample"], default="mean")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.load()
    spec = engine.spec
    g = C.new_circuit("all", behaviour=C.Behaviour(task=args.task, n=args.pairs, seed=0))
    for l in range(spec.n_layers):
        for n in [f"L{l}.H{h}" for h in range(spec.n_heads)] + [f"L{l}.MLP"]:
            C.add_node(g, n)
    cache = RunCache(engine)

    block_tokens = {False: 0, True: 0}
    real_forward = Engine.forward

    def counting(self, ids, *a, **kw):  # rows x positions x blocks each call runs
        start, stop = kw.get("start_layer", 0), kw.get("stop_layer")
        block_tokens[Evaluator.layerwise] += ids.numel() * ((spec.n_layers if stop is None else stop) - start)
        return real_forward(self, ids, *a, **kw)

    def run(layerwise: bool):
        Evaluator.layerwise = layerwise
        t = time.perf_counter()
        r = C.prune(engine, g, threshold=args.threshold, mode=args.mode, cache=cache)
        return time.perf_counter() - t, r

    run(True)  # warm-up (and the reference means)
    times: dict[bool, list[float]] = {False: [], True: []}
    results = {}
    Engine.forward = counting
    try:
        for i in range(args.repeats):
            for lw in (False, True):
                block_tokens[lw] = 0
                dt, results[lw] = run(lw)
                times[lw].append(dt)
    finally:
        Engine.forward = real_forward
        Evaluator.layerwise = True
    assert results[False].kept == results[True].kept, (results[False].kept, results[True].kept)
    whole, blockwise = statistics.median(times[False]), statistics.median(times[True])
    print(json.dumps({
        "task": args.task, "pairs": args.pairs, "mode": args.mode, "nodes": len(C.components(g)), "kept": len(results[True].kept),
        "steps": len(results[True].removed), "threads": args.threads,
        "whole_passes_s": round(whole, 3), "block_at_a_time_s": round(blockwise, 3),
        "speedup": round(whole / blockwise, 2), "times": {str(k): [round(t, 3) for t in v] for k, v in times.items()},
        "block_tokens_whole": block_tokens[False], "block_tokens_block_at_a_time": block_tokens[True],
    }, indent=1))


if __name__ == "__main__":
    main()
