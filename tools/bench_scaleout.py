"""Benchmark dataset builds over Ray workers: throughput with 1 and 2 local workers.

    python tools/bench_scaleout.py [--model DIR] [--docs 3072] [--chunk-batches 4] [--workers 1 2]

Builds the same dataset (bundled model and SAEs by default) in this process, then with
Ray and N workers (a local cluster with one CPU per worker, one torch thread each), all
in one process run; each Ray build starts once its workers have loaded their engines.
Prints tokens/s per setting, the ratio to one Ray worker, the time the driver spends
merging chunk states, the CPU cores the workers really got (CPU seconds / wall seconds:
other load on the machine shows here), tokens per worker CPU second (what scales with
the cores a cluster gives), and whether every build is bit-identical to the
in-process one.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

from tdb_agent.datasets import BuildConfig, build, documents_from_corpus
from tdb_agent.datasets.builder import DatasetBuilder
from tdb_agent.datasets.command import DATASET_SEED
from tdb_agent.datasets.store import DATA
from tdb_agent.scaleout import EngineSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--docs", type=int, default=3072)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--chunk-batches", type=int, default=4, help="batches per chunk (checkpoint_every)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    torch.set_num_threads(1)
    spec = EngineSpec(model=args.model, device="cpu", threads=1)
    engine = spec.load()
    docs = list(documents_from_corpus(args.docs, DATASET_SEED + 11, engine.tokenizer, engine.spec.n_ctx))
    cfg = BuildConfig(batch_size=args.batch_size, checkpoint_every=args.chunk_batches, window=20, lead=16,
                        n_random=8)
    n_tokens = sum(len(d) for d in docs if len(d) >= 2)
    tmp = Path(tempfile.mkdtemp(prefix="bench-scaleout-"))

    # the driver's merge time: wrap DatasetBuilder.merge
    merge_s = [0.0]
    orig_merge = DatasetBuilder.merge

    def timed_merge(self, other):
        t = time.perf_counter()
        orig_merge(self, other)
        merge_s[0] += time.perf_counter() - t
    DatasetBuilder.merge = timed_merge

    def run(name, runner=None):
        merge_s[0] = 0.0
        cpu0 = ray.get([a.cpu_seconds.remote() for a in runner.actors]) if runner else [time.process_time()]
        t = time.perf_counter()
        build(engine, iter(docs), tmp / name, cfg, progress=False, runner=runner)
        dt = time.perf_counter() - t
        cpu1 = ray.get([a.cpu_seconds.remote() for a in runner.actors]) if runner else [time.process_time()]
        # cores the build's workers actually got (other load on the machine shows here)
        cores = sum(b - a for a, b in zip(cpu0, cpu1)) / dt
        return {"seconds": round(dt, 2), "tok_s": round(n_tokens / dt), "driver_merge_s": round(merge_s[0], 2),
                "worker_cores_used": round(cores, 2), "tok_per_worker_cpu_s": round(n_tokens / (cores * dt))}

    ray = None
    rows = {"in-process": run("local")}
    ref = load_file(str(tmp / "local" / DATA))
    from tdb_agent.datasets.ray_build import RayRunner
    from tdb_agent.scaleout import connect
    ray = connect("local", num_cpus=max(args.workers))
    for n in args.workers:
        runner = RayRunner(spec, workers=n)
        ray.get([a.pid.remote() for a in runner.actors])  # engines loaded before the clock starts
        rows[f"ray x{n}"] = run(f"ray{n}", runner)
        runner.close()
        got = load_file(str(tmp / f"ray{n}" / DATA))
        rows[f"ray x{n}"]["identical"] = all(np.array_equal(ref[k], got[k]) for k in ref) and ref.keys() == got.keys()
    base = rows[f"ray x{args.workers[0]}"]["tok_s"]
    for name, r in rows.items():
        if name.startswith("ray"):
            r[f"vs_ray_x{args.workers[0]}"] = round(r["tok_s"] / base, 2)
    chunks = -(-(-(-len(docs) // args.batch_size)) // args.chunk_batches)
    print(json.dumps({"model": engine.name, "components": DatasetBuilder(engine).C, "tokens": n_tokens,
                      "documents": len(docs), "chunks": chunks, "cpu_threads_per_worker": 1, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
