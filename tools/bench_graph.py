"""Benchmark attribution-graph builds: time and peak memory against prompt length, as ratios to
one plain forward pass measured in the same run.

    python tools/bench_graph.py --model bundled --lengths 16 32 64 128
    python tools/bench_graph.py --model gpt2-small --lengths 64 256 --max-feature-nodes 512
    python tools/bench_graph.py --model gpt2-small --lengths 64 512 2048 --device cuda

`bundled` uses the shipped transcoders; `gpt2-small` is a GPT-2-small-shaped random model
(12 layers, d_model 768, 2,048 positions) with random TopK transcoders (4,096 features,
k = 32). Peak memory: CUDA's max allocated, or the process's peak RSS on CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
from bench_ops import prompt_of  # noqa: E402

from tdb_agent.engine import Engine  # noqa: E402
from tdb_agent.engine.transcoder import LayerTranscoder, TranscoderSet, attach_transcoders  # noqa: E402
from tdb_agent.ops.graph import GraphTarget, build_graph  # noqa: E402
from tdb_agent.tasks.tokenizer import build_tokenizer  # noqa: E402


def gpt2_small(folder: Path, n_ctx: int) -> Path:
    tok = build_tokenizer()
    cfg = GPT2Config(vocab_size=len(tok), n_positions=n_ctx, n_embd=768, n_layer=12, n_head=12)
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def random_topk_transcoders(engine: Engine, n: int, k: int) -> TranscoderSet:
    g = torch.Generator().manual_seed(0)
    D = engine.spec.d_model
    layers = {l: LayerTranscoder(l, torch.randn(D, n, generator=g) / D ** 0.5, torch.zeros(n),
                                 torch.randn(n, 1, D, generator=g) / n ** 0.5, torch.zeros(D), None, None, k)
              for l in range(engine.spec.n_layers)}
    return TranscoderSet(layers, "mlp_in", engine.spec.n_layers).to(engine.device)


def peak_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["bundled", "gpt2-small"], default="bundled")
    ap.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-feature-nodes", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    if args.model == "bundled":
        engine = Engine.load(None, device=args.device)
        if attach_transcoders(engine) is None:
            raise SystemExit("the bundled transcoders are missing (python tools/train_transcoders.py)")
    else:
        folder = Path(tempfile.mkdtemp()) / "gpt2-small"
        engine = Engine.load(gpt2_small(folder, max(args.lengths)), device=args.device)
        engine.transcoders = random_topk_transcoders(engine, 4096, 32)
    dev = engine.device
    rows = []
    for n in args.lengths:
        prompt = prompt_of(engine, n)
        ids = engine.to_tokens(prompt, truncate=True)
        prompt = engine.tokenizer.decode(ids[0, 1:].tolist())
        with torch.no_grad():
            engine.forward(ids)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            engine.forward(ids)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            fwd = time.perf_counter() - t
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        base = peak_bytes(dev)
        t = time.perf_counter()
        g = build_graph(engine, prompt, GraphTarget(kind="top", mass=0.8, max_logits=5),
                        max_feature_nodes=args.max_feature_nodes, batch_size=args.batch, max_bytes=64 << 30)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        took = time.perf_counter() - t
        row = {"model": args.model, "device": str(dev), "tokens": ids.shape[1], "active_features": g.src.n_feat,
               "expanded": g.stats["expanded_features"], "backward_passes": g.stats["backward_passes"],
               "forward_s": fwd, "graph_s": took, "ratio_to_forward": took / fwd,
               "peak_gib": peak_bytes(dev) / 2 ** 30, "peak_before_gib": base / 2 ** 30,
               "completeness_residual": g.stats["completeness_residual"]}
        print(json.dumps(row), flush=True)
        rows.append(row)
        del g
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
