"""Benchmark the activation-dataset builder against plain forward passes over the same tokens.

    python tools/bench_dataset.py [--model DIR] [--docs 2000] [--threads 1]

Three timings over identical batches (documents grouped by length, as the builder does),
interleaved batch by batch:
  forward   plain `engine.forward` (no hooks; last-position logits)
  extract   forward + reading every component's activation (neurons, head write norms,
            SAE encodings): the activations the builder needs
  builder   `DatasetBuilder.add_batch` (extract + top-k/random/quantile merges + stats)
Overheads: builder / forward − 1 (everything), and builder / extract − 1 (the top-k bookkeeping).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tdb_agent.datasets import BuildConfig, documents_from_corpus
from tdb_agent.datasets.builder import DatasetBuilder
from tdb_agent.datasets.components import component_activations
from tdb_agent.datasets.corpus import batched
from tdb_agent.datasets.command import DATASET_SEED
from tdb_agent.engine import Engine
from tdb_agent.engine.sae import attach_saes


def _ids(engine, batch):
    s = max(map(len, batch))
    ids = torch.full((len(batch), s), engine.tokenizer.bos_token_id or 0, dtype=torch.long)
    for i, d in enumerate(batch):
        ids[i, : len(d)] = torch.tensor(d)
    return ids.to(engine.device)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="best of N for each timing")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--sae", action="append", default=[], help="SAE folders (default: the bundled model's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.load(args.model, device=args.device)
    attach_saes(engine, args.sae)
    docs = list(documents_from_corpus(args.docs, DATASET_SEED + 7, engine.tokenizer, engine.spec.n_ctx))
    batches = list(batched(docs, args.batch_size))
    id_batches = [_ids(engine, b) for b in batches]
    n_tokens = sum(len(d) for d in docs if len(d) >= 2)
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)

    # interleaved per batch (forward, extract, builder step on the same batch), so that load
    # from other processes hits the three alike; best of `repeats` passes over the corpus
    t_fwd = t_ext = t_bld = float("inf")
    for _ in range(args.repeats):
        builder = DatasetBuilder(engine, BuildConfig(batch_size=args.batch_size, window=20, lead=16, n_random=8))
        tf = te = tb = 0.0
        for batch, ids in zip(batches, id_batches):
            sync()
            t0 = time.perf_counter()
            engine.forward(ids)
            sync()
            t1 = time.perf_counter()
            component_activations(engine, ids)
            sync()
            t2 = time.perf_counter()
            builder.add_batch(batch)
            sync()
            t3 = time.perf_counter()
            tf, te, tb = tf + t1 - t0, te + t2 - t1, tb + t3 - t2
        t_fwd, t_ext, t_bld = min(t_fwd, tf), min(t_ext, te), min(t_bld, tb)

    out = {"device": str(engine.device), "threads": args.threads, "tokens": n_tokens,
           "components": DatasetBuilder(engine).C, "saes": engine.saes.names(),
           "forward_tok_s": round(n_tokens / t_fwd), "extract_tok_s": round(n_tokens / t_ext),
           "builder_tok_s": round(n_tokens / t_bld),
           "overhead_vs_forward": round(t_bld / t_fwd - 1, 3),
           "bookkeeping_overhead_vs_extract": round(t_bld / t_ext - 1, 3)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
