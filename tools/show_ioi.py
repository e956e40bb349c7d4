"""Show the operations at work on the bundled model's IOI task (the figures in the README).

    python tools/show_ioi.py

1. top heads by direct effect vs top heads by a resample-ablation sweep;
2. act x grad (attribution patching) vs the true patching effect of the top components;
3. trace_upstream from the top head's query, and what mean-ablating the three upstream heads it
   ranks highest does to that head's attention score, vs the three it ranks lowest in the same layers.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel

from tdb_agent import ops
from tdb_agent.components import parse_component
from tdb_agent.engine import Engine
from tdb_agent.ops.ablate import component_hooks
from tdb_agent.ops.runs import RunCache
from tdb_agent.tasks import task_examples


class IOIShow(BaseModel):
    prompt: str
    top_direct: list[tuple[str, float]]
    top_sweep: list[tuple[str, float]]
    overlap: list[str]
    top_sweep_last: list[tuple[str, float]]
    overlap_last: list[str]
    axg_vs_patch: list[tuple[str, float, float]]
    top_head: str
    key_position: int
    upstream: list[tuple[str, float]]
    weakest: list[tuple[str, float]]
    score_before: float
    score_after_upstream_ablation: float
    score_after_weakest_ablation: float
    attention_before: float
    attention_after_upstream_ablation: float


@torch.no_grad()
def attention_to(engine: Engine, prompt: str, head: str, key: int, hooks=None) -> tuple[float, float]:
    """(attention score, attention probability) from the last position to `key`."""
    c = parse_component(head, engine.spec)
    p = f"blocks.{c.layer}.attn."
    _, acts = engine.run_with_cache(engine.to_tokens(prompt), [p + "hook_attn_scores", p + "hook_pattern"],
                                    hooks=hooks, stop_layer=c.layer + 1)
    return (acts[p + "hook_attn_scores"][0, c.index, -1, key].item(),
            acts[p + "hook_pattern"][0, c.index, -1, key].item())


def show(engine: Engine, seed: int = 0, k: int = 5) -> IOIShow:
    ex = task_examples("ioi", 1, seed=seed)[0]
    P, C, T, D = ex.prompt, ex.corrupted_prompt, ex.target, ex.distractor
    cache = RunCache(engine)
    de = ops.attribute(engine, P, T, D, kinds=["head"], top_k=k, cache=cache)
    sw = ops.ablation_sweep(engine, P, "head", T, D, mode="resample", corrupted_prompt=C, top_k=k, cache=cache)
    top_direct = [(r.id, r.effect) for r in de.rows]
    top_sweep = [(r.id, r.delta) for r in sw.rows]
    overlap = sorted({a for a, _ in top_direct} & {b for b, _ in top_sweep})
    sw_last = ops.ablation_sweep(engine, P, "head", T, D, mode="mean", positions="last", top_k=k, cache=cache)
    top_sweep_last = [(r.id, r.delta) for r in sw_last.rows]
    overlap_last = sorted({a for a, _ in top_direct} & {b for b, _ in top_sweep_last})

    axg = ops.attribute(engine, P, T, D, method="act_times_grad", corrupted_prompt=C, kinds=["head", "mlp"],
                        top_k=6, cache=cache)
    axg_vs_patch = []
    for r in axg.rows:
        p = ops.patch(engine, P, C, [r.id], T, D, direction="noise", cache=cache)
        axg_vs_patch.append((r.id, r.effect, p.metric_clean - p.metric_patched))

    top_head = top_direct[0][0]
    tr = ops.trace_upstream(engine, P, top_head, via="q", top_k=None, cache=cache)
    head_edges = {}
    for e in tr.edges:
        src = e.source.split("@")[0]
        if ".H" in src:
            head_edges[src] = head_edges.get(src, 0.0) + e.weight
    ranked = sorted(head_edges.items(), key=lambda kv: -abs(kv[1]))
    upstream = ranked[:3]
    # control: the heads the trace ranks lowest among the same layers as the top three
    layers = {parse_component(c, engine.spec).layer for c, _ in upstream}
    weakest = [kv for kv in ranked if parse_component(kv[0], engine.spec).layer in layers][-3:]
    run = cache.get(P)
    before = attention_to(engine, P, top_head, tr.key_position)

    def ablated(ids):
        comps = [parse_component(c, engine.spec) for c, _ in ids]
        return attention_to(engine, P, top_head, tr.key_position, component_hooks(engine, comps, "mean", run, cache))

    up, weak = ablated(upstream), ablated(weakest)
    return IOIShow(prompt=P, top_direct=top_direct, top_sweep=top_sweep, overlap=overlap,
                   top_sweep_last=top_sweep_last, overlap_last=overlap_last, axg_vs_patch=axg_vs_patch,
                   top_head=top_head, key_position=tr.key_position, upstream=upstream, weakest=weakest,
                   score_before=before[0], score_after_upstream_ablation=up[0], score_after_weakest_ablation=weak[0],
                   attention_before=before[1], attention_after_upstream_ablation=up[1])


def main() -> None:
    engine = Engine.load()
    s = show(engine)
    print(f"prompt: {s.prompt!r}")
    print("top heads by direct effect:  " + ", ".join(f"{c} {v:+.2f}" for c, v in s.top_direct))
    print("top heads by resample sweep: " + ", ".join(f"{c} {v:+.2f}" for c, v in s.top_sweep))
    print(f"in both: {s.overlap}")
    print("top heads by mean ablation at the last position: "
          + ", ".join(f"{c} {v:+.2f}" for c, v in s.top_sweep_last))
    print(f"in both (direct effect, last-position ablation): {s.overlap_last}")
    print("act x grad vs true patching effect (noising), top components:")
    for c, est, true in s.axg_vs_patch:
        print(f"  {c:8s} act x grad {est:+.3f}   patching {true:+.3f}")
    print(f"trace_upstream({s.top_head}, via=q) at key {s.key_position}: strongest upstream heads "
          + ", ".join(f"{c} {w:+.2f}" for c, w in s.upstream))
    print(f"attention score of {s.top_head} from the last token to key {s.key_position}: {s.score_before:.2f}; "
          f"with those 3 heads mean-ablated {s.score_after_upstream_ablation:.2f}; with the 3 heads the trace "
          f"ranks lowest ({', '.join(c for c, _ in s.weakest)}) ablated {s.score_after_weakest_ablation:.2f} "
          f"(attention probability {s.attention_before:.3f} -> {s.attention_after_upstream_ablation:.3f})")


if __name__ == "__main__":
    main()
