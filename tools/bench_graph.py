"""Benchmark attribution-graph builds: time, peak memory and rows computed against prompt
length, as ratios to one plain forward pass measured in the same process.

    python tools/bench_graph.py --model bundled --lengths 16 32 64 128
    python tools/bench_graph.py --model gpt2-small --lengths 64 256 1024 2048 --max-feature-nodes 256 --batch 8
    python tools/bench_graph.py --model gpt2-small --lengths 64 512 2048 --device cuda

`bundled` uses the shipped transcoders; `gpt2-small` is a GPT-2-small-shaped random model
(12 layers, d_model 768, 12 heads, 2,048 positions) with random TopK transcoders (4,096
features, k = 32) at every layer. Each length runs in its own process, so peak memory is
that build's: CUDA's max allocated, or the process's peak RSS (getrusage) on CPU, both
also given above the memory held after loading (the increment is what the ratio uses).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
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

GIB = 2 ** 30


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


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak(device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def held(device) -> int:
    return torch.cuda.memory_allocated() if device.type == "cuda" else rss_now()


def one(args) -> dict:
    """One length in this process: a timed forward, then the graph."""
    torch.set_num_threads(args.threads)
    if args.model == "bundled":
        engine = Engine.load(None, device=args.device)
        if attach_transcoders(engine) is None:
            raise SystemExit("the bundled transcoders are missing (python tools/train_transcoders.py)")
    else:
        engine = Engine.load(args.folder, device=args.device)
        engine.transcoders = random_topk_transcoders(engine, 4096, 32)
    dev = engine.device
    prompt = prompt_of(engine, args.one)
    ids = engine.to_tokens(prompt, truncate=True)
    prompt = engine.tokenizer.decode(ids[0, 1:].tolist())
    base = held(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        engine.forward(ids)
        t = time.perf_counter()
        engine.forward(ids)
        fwd_peak = peak(dev)
        fwd = time.perf_counter() - t
    t = time.perf_counter()
    g = build_graph(engine, prompt, GraphTarget(kind="top", mass=0.8, max_logits=5),
                    max_feature_nodes=args.max_feature_nodes, batch_size=args.batch, max_bytes=args.max_gib * GIB)
    graph_peak = peak(dev)
    took = time.perf_counter() - t
    fwd_mem, graph_mem = max(fwd_peak - base, 1), graph_peak - base
    return {"model": args.model, "device": str(dev), "threads": args.threads, "tokens": ids.shape[1],
            "active_features": g.src.n_feat, "rows": len(g.value), "expanded": g.stats["expanded_features"],
            "backward_passes": g.stats["backward_passes"], "stored_edges": g.stats["stored_edges"],
            "edges_gib": g.stats["edge_bytes"] / GIB, "forward_s": fwd, "graph_s": took, "time_ratio": took / fwd,
            "held_gib": base / GIB, "forward_peak_gib": fwd_peak / GIB, "graph_peak_gib": graph_peak / GIB,
            "memory_ratio": graph_mem / fwd_mem, "estimated_gib": g.stats["estimated_bytes"] / GIB,
            "completeness_residual": g.stats["completeness_residual"]}


def table(rows: list[dict]) -> str:
    head = ("| tokens | active features | rows computed | graph s | forward s | graph / forward (time) | "
            "peak GiB (graph / forward, above held) | memory ratio | estimated GiB |\n|" + "---|" * 9)
    lines = [head]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['active_features']:,} | {r['rows']} | {r['graph_s']:.1f} | "
                     f"{r['forward_s']:.3f} | {r['time_ratio']:.0f} | "
                     f"{r['graph_peak_gib'] - r['held_gib']:.2f} / {r['forward_peak_gib'] - r['held_gib']:.2f} | "
                     f"{r['memory_ratio']:.1f} | {r['estimated_gib']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["bundled", "gpt2-small"], default="bundled")
    ap.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-feature-nodes", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-gib", type=float, default=20.0, help="refuse a build estimated above this")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args)), flush=True)
        return
    folder = None
    if args.model == "gpt2-small":
        folder = gpt2_small(Path(tempfile.mkdtemp()) / "gpt2-small", max(2048, max(args.lengths)))
    rows = []
    for n in args.lengths:
        cmd = [sys.executable, __file__, "--one", str(n), "--model", args.model, "--device", args.device,
               "--threads", str(args.threads), "--max-feature-nodes", str(args.max_feature_nodes),
               "--batch", str(args.batch), "--max-gib", str(args.max_gib)] + (["--folder", str(folder)] if folder else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{n} tokens failed:\n{out.stderr[-3000:]}", flush=True)
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
