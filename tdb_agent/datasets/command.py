"""`tdb-agent build-dataset`: build an activation dataset for any loaded model (+ SAEs)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DATASET_SEED = 930_000_000  # held-out corpus documents (the model and SAEs trained on other seeds)


def add_build_dataset(sub, model_args) -> None:
    p = sub.add_parser("build-dataset", help="build an activation dataset (top examples, samples, stats)")
    model_args(p)
    p.add_argument("--out", required=True, help="output folder (resumes from <out>/partial if present)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", help="text file, one document per line (default: the built-in synthetic corpus)")
    src.add_argument("--corpus-docs", type=int, default=12000, help="documents of the built-in corpus")
    p.add_argument("--corpus-seed", type=int, default=DATASET_SEED)
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    p.add_argument("--batch-size", type=int, default=64, help="documents per forward pass")
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--n-random", type=int, default=8)
    p.add_argument("--window", type=int, default=20)
    p.add_argument("--lead", type=int, default=16, help="tokens before the example's token in a window")
    p.add_argument("--sae", action="append", default=[], metavar="PATH", help="SAE folder (repeatable)")
    p.add_argument("--no-bundled-saes", action="store_true")
    p.add_argument("--no-resume", action="store_true", help="start over even if <out>/partial exists")
    p.add_argument("--gzip", action="store_true", help="store data.safetensors gzipped (datasets/store.py)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (per worker with --ray)")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="shard the corpus over Ray workers (pip install 'tdb-agent[ray]'): a local cluster, or the "
                        "one at ADDRESS ('auto': the cluster this machine is in); the result equals the "
                        "single-process build")
    p.add_argument("--workers", type=int, default=None,
                   help="Ray workers (default: one per GPU, or one per --threads CPUs of the cluster)")
    p.set_defaults(fn=cmd_build_dataset)


def cmd_build_dataset(args: argparse.Namespace) -> int:
    import torch

    from tdb_agent.datasets import BuildConfig, build, documents_from_corpus, documents_from_text
    from tdb_agent.session import EngineSpec

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = EngineSpec.from_args(args, dataset=None)  # --out is the dataset being built
    runner = None
    if args.ray:
        from tdb_agent.datasets.ray_build import RayRunner

        runner = RayRunner(spec, workers=args.workers, address=args.ray)
        # the driver only merges chunk states: its engine (fingerprints, tokenizer) stays off the GPUs
        engine = spec.model_copy(update=dict(device="cpu", device_map=None, max_memory=None,
                                             offload_folder=None)).load()
    else:
        engine = spec.load()
    if args.text:
        docs = documents_from_text(args.text, engine.tokenizer, engine.spec.n_ctx)
        source = f"text file {Path(args.text).name}"
    else:
        docs = documents_from_corpus(args.corpus_docs, args.corpus_seed, engine.tokenizer, engine.spec.n_ctx)
        source = f"synthetic corpus, {args.corpus_docs} documents from seed {args.corpus_seed}"
    cfg = BuildConfig(top_k=args.top_k, n_random=args.n_random, window=args.window, lead=args.lead,
                      batch_size=args.batch_size)
    try:
        manifest = build(engine, docs, args.out, cfg, source=source, max_tokens=args.max_tokens,
                         resume=not args.no_resume, runner=runner)
    finally:
        if runner is not None:
            runner.close()
    if args.gzip:
        from tdb_agent.datasets.store import DATA, compress

        manifest["compressed"] = compress(args.out, (DATA,))
    print(json.dumps({k: manifest[k] for k in ("model", "n_tokens", "n_documents", "n_components",
                                               "build_seconds", "workers", "compressed") if k in manifest}, indent=2))
    return 0
