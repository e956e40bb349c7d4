"""Benchmark edge attribution against one forward pass and against exact edge patching.

    python tools/bench_edges.py [--threads 1] [--device auto] [--small] [--pairs 8] [--curve-only] [--out FILE]
    python tools/bench_edges.py --gelu-ab --pairs 2 --repeats 4   (see gelu_and_stacking)
    python tools/bench_edges.py --mean --pairs 2 --repeats 7      (see bench_mean)

In one process, on (a) the bundled model with IOI prompt pairs of one length and (b) with
--small, a GPT-2-small-shaped random model (12 layers, 12 heads, d_model 768; the project's
word-level vocabulary) at 128 tokens:

  forward        one batched forward pass of the clean prompts (no hooks)      = 1×
  eap            edge_scores(method="eap")                                     (target ≤ 3.5×)
  eap_ig         edge_scores(method="eap-ig", steps=m), the call as a user makes it (target ≤ (m + 3)×):
                 its default batch_size of 16 rows stacks the steps in the batch of a pass as
                 far as they fit (all 5 at 2 pairs, 2 a pass at 8 pairs)
  eap_ig_one_step   the same, one step per forward and backward (steps_per_pass=1)
  eap_ig_stacked    the same, all m steps in one forward and backward (steps_per_pass=m)
  eap_whole, eap_ig_whole   eap and eap_ig with reuse_prefix=False: every pass over every
                 position (the pairs' shared leading positions, `shared_positions` in the
                 output, are otherwise run by the corrupted run only; capture.Prefix)
  naive          exact patching one edge at a time: one patched forward per edge, timed on a
                 sample of edges and multiplied by the number of edges (what EAP approximates)
  curve          one faithfulness curve at the MIB budgets (batched edge sets)
  curve_naive    the same edge sets (both rankings, cleaned), one patched pass per set (timed
                 alternating with curve)
  --curve-only   only these two, one edge set (10 % of the edges) and one forward, all
                 alternating in each round (medians of --repeats rounds after a warm-up round)
Times are medians of --repeats rounds after a warm-up, each round running the forward, eap
and the three eap_ig rows once in turn (so that the machine's load falls on all alike); ratios
are to one forward measured in the same run (the mean of its median in those rounds and of
another --repeats after them); `ratios_fastest` are the same from each call's fastest round
(other work on the machine only adds time: the steadier figure on a shared CPU). Peak memory: the most extra memory each of forward / eap /
eap_ig holds at once (CUDA: the allocator's peak; CPU: resident memory sampled every
millisecond, with glibc told to return freed blocks at once so that the resident size
follows the live tensors: in a process of its own, since that setting makes each large
tensor fresh pages and would slow the timed code; the timings run with the allocator's
defaults).
"""

from __future__ import annotations

import argparse
import ctypes
import inspect
import json
import multiprocessing
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench_ops import gpt2_small_random, once, timed  # tools/ is on the path when run as a script

from tdb_agent.engine import Engine
from tdb_agent.environment import describe
from tdb_agent.ops.edges.capture import corrupted_senders, group_pairs, run_senders, shared_positions
from tdb_agent.ops.edges.eap import edge_scores
from tdb_agent.ops.edges.faithfulness import MIB_BUDGETS, faithfulness_curve, keep_masks
from tdb_agent.ops.edges.graph import EdgeGraph
from tdb_agent.ops.edges.patch import patched_metrics
from tdb_agent.ops.edges.selection import budget_counts, prune_dangling, support, top_masks
from tdb_agent.tasks import task_examples


#: edge_scores' default batch_size (rows of a pass): the default EAP-IG call stacks its steps up to it
DEFAULT_BATCH = inspect.signature(edge_scores).parameters["batch_size"].default


def ioi_pairs(engine: Engine, n: int):
    by_len: dict[int, list] = {}
    for p in task_examples("ioi", 8 * n, seed=0):
        by_len.setdefault(engine.to_tokens(p.prompt).shape[1], []).append(p)
    return max(by_len.values(), key=len)[:n]


def small_model(folder: Path, device: str) -> Engine:
    """bench_ops' GPT-2-small-shaped random model (vocabulary 50,257, the project's tokenizer)."""
    return Engine.load(gpt2_small_random(folder), device=device)


def random_pairs(engine: Engine, n: int, length: int):
    """Pairs of `length` tokens (BOS + words) whose corrupted prompt changes three words."""
    from tdb_agent.circuits.pairs import PromptPair
    vocab = [w for w in engine.tokenizer.get_vocab() if w.isalpha()][:400]
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        words = [vocab[i] for i in torch.randint(len(vocab), (length - 1,), generator=g).tolist()]
        corrupted = list(words)
        for i in torch.randint(length - 1, (3,), generator=g).tolist():
            corrupted[i] = vocab[(vocab.index(words[i]) + 1) % len(vocab)]
        out.append(PromptPair(prompt=" ".join(words), corrupted_prompt=" ".join(corrupted), target=vocab[0],
                              distractor=vocab[1]))
    return out


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_mb(fn, device: torch.device) -> float:
    """Extra memory at the peak of fn() over what was held before, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    base = _rss()
    top, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            top[0] = max(top[0], _rss())
            time.sleep(0.001)
    th = threading.Thread(target=sample)
    th.start()
    try:
        fn()
    finally:
        done.set()
        th.join()
    return (top[0] - base) / 2 ** 20


def _return_freed_memory() -> None:
    """glibc: serve blocks over 64 KiB by mmap, so a freed tensor leaves the resident size."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
    except OSError:
        pass


def interleaved(fns, repeats: int) -> list[float]:
    """Median seconds of each fn over `repeats` rounds that run every fn once in turn (after a
    warm-up of each): a change in the machine's load then falls on all of them alike."""
    return interleaved_stats(fns, repeats)[0]


def interleaved_stats(fns, repeats: int) -> tuple[list[float], list[float]]:
    """(medians, minima) of `interleaved`'s rounds: on a shared machine other work only ever
    adds time, so the fastest round is the steadier estimate of what a call costs."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            ts.append(once(fn))
    return [statistics.median(ts) for ts in times], [min(ts) for ts in times]


def methods(engine: Engine, pairs, steps: int) -> dict:
    """The timed calls: one forward of the clean prompts, EAP, EAP-IG (the default call, one
    step per pass, every step stacked)."""
    (group,), _ = group_pairs(engine, pairs, True)

    def fwd():
        with torch.no_grad():
            engine.forward(group.ids, logit_positions=[-1])

    def eap():
        edge_scores(engine, pairs, method="eap", batch_size=len(pairs))

    def ig():  # the default call: steps stacked as far as its default batch_size (16 rows) allows
        edge_scores(engine, pairs, method="eap-ig", steps=steps)

    def ig_one_step():
        edge_scores(engine, pairs, method="eap-ig", steps=steps, batch_size=len(pairs), steps_per_pass=1)

    def ig_stacked():  # every step in the batch of one forward and backward
        edge_scores(engine, pairs, method="eap-ig", steps=steps, batch_size=len(pairs), steps_per_pass=steps)

    def eap_whole():  # every position in every pass (no shared prefix continued)
        edge_scores(engine, pairs, method="eap", batch_size=len(pairs), reuse_prefix=False)

    def ig_whole():
        edge_scores(engine, pairs, method="eap-ig", steps=steps, reuse_prefix=False)
    return {"forward": fwd, "eap": eap, "eap_ig": ig, "eap_ig_one_step": ig_one_step, "eap_ig_stacked": ig_stacked,
            "eap_whole": eap_whole, "eap_ig_whole": ig_whole}


def memory_child(folder: str | None, pairs, steps: int, device: str, threads: int) -> dict:
    """Peak extra memory of each method, in a fresh process whose allocator is set first (see
    _return_freed_memory; in the timing process that setting would slow the timed code, each
    large tensor then being fresh pages)."""
    _return_freed_memory()
    torch.set_num_threads(threads)
    engine = Engine.load(folder, device=device)
    fns = methods(engine, pairs, steps)
    for fn in fns.values():  # warm-up, as for the timings
        fn()
    return {name: round(peak_mb(fn, engine.device), 1) for name, fn in fns.items()}


def measure_memory(folder: Path | None, pairs, steps: int, device: str) -> dict:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(memory_child, (None if folder is None else str(folder), pairs, steps, device,
                                         torch.get_num_threads()))


def bench(engine: Engine, pairs, steps: int, repeats: int, naive_sample: int, curve: bool = True) -> dict:
    graph = EdgeGraph(engine.spec)
    (group,), _ = group_pairs(engine, pairs, True)
    fns = methods(engine, pairs, steps)
    fwd = fns["forward"]
    medians, minima = interleaved_stats(list(fns.values()), repeats)
    t, fastest = dict(zip(fns, medians)), dict(zip(fns, minima))
    t_fwd, t_eap, t_ig, t_ig_one, t_ig_stacked = (t[k] for k in ("forward", "eap", "eap_ig", "eap_ig_one_step",
                                                                  "eap_ig_stacked"))
    t_fwd_after = timed(fwd, repeats)  # the machine's load drifts: the forward again, after
    t_one = (t_fwd + t_fwd_after) / 2  # the unit of the ratios
    scores = edge_scores(engine, pairs, method="eap", batch_size=len(pairs)).scores
    ref = run_senders(engine, group.corrupted)
    flat = graph.valid.flatten().nonzero()[:, 0]
    sample = flat[torch.randperm(len(flat), generator=torch.Generator().manual_seed(0))[:naive_sample]]

    def naive():
        for i in sample.tolist():
            keep = torch.ones(1, graph.n_senders, graph.n_receivers, dtype=torch.bool)
            keep.view(1, -1)[0, i] = False
            patched_metrics(engine, graph, group, ref, keep, batch_size=len(pairs))
    t_naive = timed(naive, 1) / len(sample) * graph.n_edges
    t_curve, t_curve_naive = curve_times(engine, pairs, scores, repeats) if curve else (None, None)
    return {"model": engine.name, "n_edges": graph.n_edges, "pairs": len(pairs), "tokens": int(group.ids.shape[1]),
            "shared_positions": shared_positions(group.ids, group.corrupted), "environment": describe(),
            "device": str(engine.device), "steps": steps, "threads": torch.get_num_threads(),
            "seconds": {
                "forward": t_fwd, "forward_after": t_fwd_after, "eap": t_eap, "eap_ig": t_ig,
                "eap_ig_one_step": t_ig_one, "eap_ig_stacked": t_ig_stacked,
                "eap_whole": t["eap_whole"], "eap_ig_whole": t["eap_ig_whole"],
                "naive_extrapolated": t_naive, "curve": t_curve, "curve_naive": t_curve_naive},
            "eap_ig_steps_per_pass": min(steps, max(1, DEFAULT_BATCH // len(pairs))),  # the default call's
            "ratios": {"eap_over_forward": t_eap / t_one, "eap_ig_over_forward": t_ig / t_one,
                       "eap_ig_one_step_over_forward": t_ig_one / t_one,
                       "eap_ig_stacked_over_forward": t_ig_stacked / t_one,
                       "eap_whole_over_forward": t["eap_whole"] / t_one,
                       "eap_ig_whole_over_forward": t["eap_ig_whole"] / t_one,
                       "curve_over_forward": t_curve / t_one if curve else None,
                       "naive_over_eap": t_naive / t_eap,
                       "curve_naive_over_curve": t_curve_naive / t_curve if curve else None},
            "naive_sample": int(len(sample)),
            # the same ratios from each call's fastest round (the forward's too): steadier on a shared machine
            "ratios_fastest": {f"{k}_over_forward": fastest[k] / fastest["forward"] for k in fns if k != "forward"}}


def gelu_and_stacking(folder: Path, pairs, steps: int, repeats: int, device: str) -> dict:
    """Two measurements in one process, alternated in rounds (medians):
    (1) the engine as loaded (transformers' GELU formula run as torch's fused kernel,
    engine/activations.py) against the same model loaded with the formula kept: forward, EAP,
    EAP-IG seconds and the largest score difference; (2) EAP's corrupted forward + clean
    gradient pass against one gradient pass over the clean and corrupted rows stacked."""
    import tdb_agent.engine.engine as engine_module
    from tdb_agent.ops.edges.capture import grad_pass, reference_run
    fused = Engine.load(folder, device=device)
    swap = engine_module.fuse_gelu
    engine_module.fuse_gelu = lambda model: []
    try:
        formula = Engine.load(folder, device=device)
    finally:
        engine_module.fuse_gelu = swap
    fa, fb = methods(fused, pairs, steps), methods(formula, pairs, steps)
    names = ["forward", "eap", "eap_ig"]
    diff = {m: float((edge_scores(fused, pairs, method=m, batch_size=len(pairs)).scores
                      - edge_scores(formula, pairs, method=m, batch_size=len(pairs)).scores).abs().max())
            for m in ("eap", "eap-ig")}
    (g,), _ = group_pairs(fused, pairs, True)
    two = lambda t: torch.cat([t, t])  # noqa: E731

    def separate():  # what EAP runs now
        reference_run(fused, g.corrupted, last_mlp_tail=False)
        grad_pass(fused, g.ids, g.target, g.distractor, None, "unfrozen", want_senders=True)

    def stacked():  # the corrupted rows in the gradient pass's batch (its backward covers them too)
        grad_pass(fused, torch.cat([g.ids, g.corrupted]), two(g.target), two(g.distractor), None, "unfrozen",
                  want_senders=True)
    fns = [f[n] for n in names for f in (fa, fb)] + [separate, stacked]
    t = interleaved(fns, repeats)
    sec = {f"{n}_{k}": t[2 * i + j] for i, n in enumerate(names) for j, k in enumerate(("fused", "formula"))}
    sec |= {"corrupted_fwd_plus_grad_pass": t[-2], "stacked_grad_pass": t[-1]}
    return {"seconds": sec, "max_score_difference": diff,
            "speedup_fused": {n: sec[f"{n}_formula"] / sec[f"{n}_fused"] for n in names},
            "over_forward": {f"{n}_{k}": sec[f"{n}_{k}"] / sec[f"forward_{k}"] for n in names[1:]
                             for k in ("fused", "formula")}
            | {k: sec[k] / sec["forward_fused"] for k in ("corrupted_fwd_plus_grad_pass", "stacked_grad_pass")}}


def naive_curve(engine: Engine, graph: EdgeGraph, group, scores: torch.Tensor) -> None:
    """The naive curve: the same edge sets as faithfulness_curve (the full and empty graphs,
    then each budget's cleaned top edges by signed support and by |score|), but one patched
    pass per edge set (each continuing the pairs' shared prefix, as the curve's passes do: the
    two differ in the batching alone)."""
    ref, prefix = corrupted_senders(engine, group.corrupted, shared_positions(group.ids, group.corrupted))

    def mean_metric(keep: torch.Tensor) -> float:
        m, _ = patched_metrics(engine, graph, group, ref, keep[None], batch_size=group.ids.shape[0], prefix=prefix)
        return float(m.mean())
    full = mean_metric(torch.ones(graph.n_senders, graph.n_receivers, dtype=torch.bool))
    empty = mean_metric(torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.bool))
    counts = budget_counts(graph.n_edges, MIB_BUDGETS)
    for key in (support(scores, full - empty), scores.abs()):
        for keep in prune_dangling(graph, top_masks(graph, key, counts)):
            mean_metric(keep)


def curve_times(engine: Engine, pairs, scores: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Seconds of one faithfulness curve at the MIB budgets (its edge sets batched, 64 rows a
    pass) and of the naive loop over the same edge sets, alternating."""
    (group,), _ = group_pairs(engine, pairs, True)
    graph = EdgeGraph(engine.spec)
    return tuple(interleaved([lambda: faithfulness_curve(engine, pairs, scores, batch_size=64),
                              lambda: naive_curve(engine, graph, group, scores)], repeats))


def bench_curve(engine: Engine, pairs, repeats: int) -> dict:
    """--curve-only: the curve rows alone (EAP's ranking), with one forward in the same rounds."""
    (group,), _ = group_pairs(engine, pairs, True)
    scores = edge_scores(engine, pairs, method="eap", batch_size=len(pairs)).scores

    def fwd():
        with torch.no_grad():
            engine.forward(group.ids, logit_positions=[-1])
    graph = EdgeGraph(engine.spec)
    counts = [round(b * graph.n_edges) for b in MIB_BUDGETS]
    ref = run_senders(engine, group.corrupted)
    fns = {"forward": fwd,
           "one_set": lambda: patched_metrics(engine, graph, group, ref, keep_masks(graph, scores, counts[6:7])),
           "curve": lambda: faithfulness_curve(engine, pairs, scores, batch_size=64),
           "curve_naive": lambda: naive_curve(engine, graph, group, scores)}
    t = dict(zip(fns, interleaved(list(fns.values()), repeats)))
    return {"model": engine.name, "n_edges": graph.n_edges, "pairs": len(pairs), "tokens": int(group.ids.shape[1]),
            "device": str(engine.device), "threads": torch.get_num_threads(), "repeats": repeats, "seconds": t,
            "environment": describe(),
            "ratios": {"one_set_over_forward": t["one_set"] / t["forward"],
                       "curve_over_forward": t["curve"] / t["forward"],
                       "curve_over_curve_naive": t["curve"] / t["curve_naive"]}}


def bench_mean(engine: Engine, pairs, steps: int, repeats: int) -> dict:
    """--mean: EAP-IG against the corpus mean (over activations, its default), a sender group's
    steps stacked in one pass (the default call) and one step a pass, with a run cache (as the
    MCP tools call it: the corpus means made once) and without one (each call runs the
    reference documents for them), with one forward in the same rounds."""
    from tdb_agent.ops.runs import RunCache
    (group,), _ = group_pairs(engine, pairs, True)
    cache = RunCache(engine)

    def fwd():
        with torch.no_grad():
            engine.forward(group.ids, logit_positions=[-1])

    def ig(**kw):
        return lambda: edge_scores(engine, pairs, method="eap-ig", steps=steps, reference="mean", **kw)
    fns = {"forward": fwd, "stacked_cached": ig(cache=cache), "one_step_cached": ig(cache=cache, steps_per_pass=1),
           "stacked": ig(), "one_step": ig(steps_per_pass=1)}
    t = dict(zip(fns, interleaved(list(fns.values()), repeats)))
    return {"model": engine.name, "pairs": len(pairs), "tokens": int(group.ids.shape[1]), "steps": steps,
            "reference": "mean", "device": str(engine.device), "threads": torch.get_num_threads(),
            "repeats": repeats, "seconds": t, "environment": describe(),
            "ratios": {f"eap_ig_mean_{k}_over_forward": v / t["forward"] for k, v in t.items() if k != "forward"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--naive-sample", type=int, default=200)
    ap.add_argument("--small", action="store_true", help="also the GPT-2-small-shaped model at 128 tokens")
    ap.add_argument("--small-only", action="store_true", help="only the GPT-2-small-shaped model")
    ap.add_argument("--no-small-curve", action="store_true", help="skip the curve timings on the small model")
    ap.add_argument("--gelu-ab", action="store_true",
                    help="only on the small model: fused GELU vs the formula, and the stacked EAP pass")
    ap.add_argument("--curve-only", action="store_true", help="only the curve rows (with one set and one forward)")
    ap.add_argument("--mean", action="store_true",
                    help="only EAP-IG against the corpus mean on the bundled model (steps stacked or not, cached means or not)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    if args.gelu_ab:
        with tempfile.TemporaryDirectory() as tmp:
            pairs = random_pairs(small_model(Path(tmp), args.device), args.pairs, 128)
            row = gelu_and_stacking(Path(tmp), pairs, args.steps, args.repeats, args.device)
        print(json.dumps(row, indent=1))
        return
    if args.mean:
        engine = Engine.load(device=args.device)
        print(json.dumps(bench_mean(engine, ioi_pairs(engine, args.pairs), args.steps, args.repeats), indent=1))
        return
    if not args.small_only:
        engine = Engine.load(device=args.device)
        pairs = ioi_pairs(engine, args.pairs)
        if args.curve_only:
            rows.append(bench_curve(engine, pairs, args.repeats))
        else:
            rows.append(bench(engine, pairs, args.steps, args.repeats, args.naive_sample))
            rows[-1]["peak_mb"] = measure_memory(None, pairs, args.steps, args.device)
        print(json.dumps(rows[-1], indent=1), flush=True)
    if args.small or args.small_only:
        with tempfile.TemporaryDirectory() as tmp:
            small = small_model(Path(tmp), args.device)
            pairs = random_pairs(small, args.pairs, 128)
            if args.curve_only:
                rows.append(bench_curve(small, pairs, args.repeats))
            else:
                rows.append(bench(small, pairs, args.steps, args.repeats, min(args.naive_sample, 12),
                                  curve=not args.no_small_curve))
                rows[-1]["peak_mb"] = measure_memory(Path(tmp), pairs, args.steps, args.device)
            print(json.dumps(rows[-1], indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
