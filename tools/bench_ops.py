"""Benchmark the operations against naive baselines run in the same process.

    python tools/bench_ops.py                 # bundled model + a GPT-2-small-sized random model
    python tools/bench_ops.py --tokens 256 --repeats 3 --device cuda

Ratios (the figures the README quotes):
  attribute / forward     attribute over all heads and neurons vs one plain HF forward
  sweep(all) speed-up     a loop of one plain forward per zero-ablated head vs ablation_sweep
  sweep(last) speed-up    the same loop ablating at the last position vs ablation_sweep(last)
  cache speed-up          10 tool calls on one prompt without vs with the activation cache
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from tdb_agent import ops
from tdb_agent.engine import DEFAULT_MODEL, Engine
from tdb_agent.ops.runs import RunCache
from tdb_agent.tasks import corpus_documents
from tdb_agent.tasks.tokenizer import build_tokenizer


def once(fn) -> float:
    """Seconds of one call of fn (the GPU's queue drained before and after)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    return statistics.median(once(fn) for _ in range(repeats))


def gpt2_small_random(folder: Path) -> Path:
    tok = build_tokenizer()
    cfg = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def prompt_of(engine: Engine, n_tokens: int) -> str:
    """Corpus text of about n_tokens tokens (BOS and the final words included), ending in an IOI-style cue."""
    words: list[str] = []
    for doc in corpus_documents(400, seed=99):
        words += doc.split()
        if len(words) > n_tokens:
            break
    count = lambda t: len(engine.tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    while count(" ".join(words)) > n_tokens - 6:
        words.pop()
    return " ".join(words) + " John gave it to"


def bench(name: str, folder: Path, n_tokens: int, repeats: int, device: str) -> dict[str, float]:
    engine = Engine.load(folder, device=device)
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(engine.device).eval()
    n_tokens = min(n_tokens, engine.spec.n_ctx)
    prompt = prompt_of(engine, n_tokens)
    ids = engine.to_tokens(prompt)
    s = ids.shape[1]
    T, D = "Mary", "John"
    L, H, dh = engine.spec.n_layers, engine.spec.n_heads, engine.spec.d_head
    out: dict[str, float] = {}

    with torch.no_grad():
        fwd = timed(lambda: plain(ids), repeats)
    out["plain forward (s)"] = fwd

    de = timed(lambda: ops.attribute(engine, prompt, T, D, kinds=["head", "neuron"]), repeats)
    axg = timed(lambda: ops.attribute(engine, prompt, T, D, method="act_times_grad", kinds=["head", "neuron"]),
                repeats)
    out["attribute direct_effect / forward"] = de / fwd
    out["attribute act_times_grad / forward"] = axg / fwd

    def naive_loop(last_only: bool):
        blocks = plain.base_model.h
        with torch.no_grad():
            for layer in range(L):
                for h in range(H):
                    def pre(mod, args, h=h):
                        x = args[0].clone()
                        if last_only:
                            x[:, -1, h * dh:(h + 1) * dh] = 0
                        else:
                            x[..., h * dh:(h + 1) * dh] = 0
                        return (x,)
                    handle = blocks[layer].attn.c_proj.register_forward_pre_hook(pre)
                    try:
                        plain(ids)
                    finally:
                        handle.remove()

    loop_all = timed(lambda: naive_loop(False), max(1, repeats // 2))
    sweep_all = timed(lambda: ops.ablation_sweep(engine, prompt, "head", T, D), max(1, repeats // 2))
    loop_last = timed(lambda: naive_loop(True), max(1, repeats // 2))
    sweep_last = timed(lambda: ops.ablation_sweep(engine, prompt, "head", T, D, positions="last"),
                       max(1, repeats // 2))
    out["sweep heads, all positions: loop / sweep"] = loop_all / sweep_all
    out["sweep heads, last position: loop / sweep"] = loop_last / sweep_last

    def ten_calls(cache):
        ops.attribute(engine, prompt, T, D, cache=cache)
        ops.attribute(engine, prompt, T, D, kinds=["attn", "mlp"], cache=cache)
        ops.ablate(engine, prompt, ["L0.H1"], T, D, cache=cache)
        ops.ablate(engine, prompt, ["L1.H2", "L0.N3"], T, D, cache=cache)
        ops.ablation_sweep(engine, prompt, "mlp", T, D, positions="last", cache=cache)
        ops.trace_upstream(engine, prompt, f"L{L - 1}.H0", via="q", cache=cache)
        ops.trace_upstream(engine, prompt, f"L{L - 1}.H1", via="k", cache=cache)
        ops.attention_pattern(engine, prompt, f"L{L - 1}.H0", cache=cache)
        ops.ablation_sweep(engine, prompt, "attn", T, D, positions="last", cache=cache)
        ops.attribute(engine, prompt, T, None, kinds=["head"], cache=cache)

    warm = RunCache(engine)
    ten_calls(warm)  # the means and the clean run are now cached
    no_cache = timed(lambda: ten_calls(None), max(1, repeats // 2))
    cached = timed(lambda: ten_calls(warm), max(1, repeats // 2))
    out["10 calls: no cache / cache"] = no_cache / cached

    print(f"\n## {name}: {engine.spec.n_layers} layers x {engine.spec.n_heads} heads, d_model {engine.spec.d_model}, "
          f"{s} tokens, {engine.device}")
    for k, v in out.items():
        print(f"  {k:45s} {v:8.3f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--skip-large", action="store_true", help="only the bundled model")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if (DEFAULT_MODEL / "config.json").exists():
        bench("bundled tdb-tiny", DEFAULT_MODEL, args.tokens, args.repeats, args.device)
    if not args.skip_large:
        with tempfile.TemporaryDirectory() as tmp:
            bench("GPT-2-small-sized random model", gpt2_small_random(Path(tmp) / "gpt2s"), args.tokens,
                  args.repeats, args.device)


if __name__ == "__main__":
    main()
