"""Tier 4: reference circuits of the bundled model's tasks, by brute-force node patching.

Computed once and stored in `evals/reference/{task}.json`; regenerate with

    python -m evals.reference            # all four tasks (about a minute on two CPU cores)
    python -m evals.reference --task ioi

Why both directions: noising (clean run, one node's activation from the corrupted prompt)
finds the nodes the behaviour needs (AND-like); denoising (corrupted run, one node's clean
activation) finds nodes that restore it alone, which noising misses when a node has a
backup (OR-like redundancy). A node is in the reference circuit when either effect is at
least `THRESHOLD` of the clean - corrupted gap of the mean logit difference.

This code is deliberately independent of `tdb_agent.ops` and `tdb_agent.circuits` (the code
under test): it uses only the engine's forward pass with its own hooks and its own metric.
Nodes are heads (at hook_z) and MLP blocks (at hook_mlp_out), patched at every position.

Edges: path patching (noising) between the reference nodes and into LOGITS: v alone reads
u's corrupted write (see `edge_effects`); an edge is in the reference when its effect is at
least `EDGE_THRESHOLD` of the gap.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from pydantic import BaseModel

from tdb_agent.engine import Engine
from tdb_agent.tasks import task_examples, task_names

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
THRESHOLD = 0.1
EDGE_THRESHOLD = 0.05
N_PAIRS = 32
SEED = 1000  # not the seed the evals score on (0): the reference is computed on other pairs


class NodeEffect(BaseModel):
    node: str
    noising: float  # (m(clean, node corrupted) - m(clean)) / gap: -1 = the behaviour is gone
    denoising: float  # (m(corrupted, node clean) - m(corrupted)) / gap: 1 = fully restored


class EdgeEffect(BaseModel):
    source: str
    target: str
    noising: float  # (m(clean, source's corrupted write seen by target only) - m(clean)) / gap


class Reference(BaseModel):
    task: str
    command: str
    n_pairs: int
    seed: int
    threshold: float
    metric: str = "logit_diff (mean over pairs)"
    metric_clean: float
    metric_corrupted: float
    nodes: list[str]  # the reference circuit
    effects: list[NodeEffect]  # every head and MLP block, largest |effect| first
    edge_threshold: float = 0.0
    edges: list[tuple[str, str]] = []  # reference edges among the reference nodes and LOGITS
    edge_effects: list[EdgeEffect] = []  # every edge between reference nodes (and into LOGITS)


def _sites(engine: Engine) -> list[tuple[str, str, int | None]]:
    """(node id, hook site, head index or None) for every head and MLP block."""
    out = []
    for l in range(engine.spec.n_layers):
        out += [(f"L{l}.H{h}", f"blocks.{l}.attn.hook_z", h) for h in range(engine.spec.n_heads)]
        out.append((f"L{l}.MLP", f"blocks.{l}.hook_mlp_out", None))
    return out


def _logit_diff(logits: torch.Tensor, t: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    last = logits[:, -1].float()
    r = torch.arange(last.shape[0])
    return last[r, t] - last[r, d]


def _batches(engine: Engine, pairs):
    """The pairs stacked by prompt length: (clean ids, corrupted ids, target ids, distractor ids)."""
    groups: dict[int, list] = {}
    for p in pairs:
        c, x = engine.to_tokens(p.prompt), engine.to_tokens(p.corrupted_prompt)
        assert c.shape == x.shape, p
        groups.setdefault(c.shape[1], []).append((c, x, engine.token_id(p.target), engine.token_id(p.distractor)))
    for rows in groups.values():
        yield (torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows]),
               torch.tensor([r[2] for r in rows]), torch.tensor([r[3] for r in rows]))


@torch.no_grad()
def node_effects(engine: Engine, pairs) -> tuple[list[NodeEffect], float, float]:
    """Noising and denoising effect of every node, as fractions of the mean gap."""
    sites = _sites(engine)
    site_names = sorted({s for _, s, _ in sites})
    sums = {node: [0.0, 0.0] for node, _, _ in sites}
    clean_sum = corr_sum = 0.0
    for c, x, t, d in _batches(engine, pairs):
        out_c, acts_c = engine.run_with_cache(c, site_names, logit_positions=[-1])
        out_x, acts_x = engine.run_with_cache(x, site_names, logit_positions=[-1])
        m_c, m_x = _logit_diff(out_c.logits, t, d), _logit_diff(out_x.logits, t, d)
        clean_sum += m_c.sum().item()
        corr_sum += m_x.sum().item()
        for node, site, head in sites:
            for i, (ids, donor, base) in enumerate(((c, acts_x, m_c), (x, acts_c, m_x))):
                src = donor[site].detach()

                def hook(a, _site, src=src, head=head):
                    a = a.clone()
                    if head is None:
                        a[:] = src
                    else:
                        a[:, :, head] = src[:, :, head]
                    return a

                out = engine.forward(ids, hooks={site: hook}, logit_positions=[-1])
                sums[node][i] += (_logit_diff(out.logits, t, d) - base).sum().item()
    n = len(pairs)
    gap = (clean_sum - corr_sum) / n
    effects = [NodeEffect(node=node, noising=s[0] / n / gap, denoising=s[1] / n / gap) for node, s in sums.items()]
    effects.sort(key=lambda e: -max(abs(e.noising), abs(e.denoising)))
    return effects, clean_sum / n, corr_sum / n


def _layer(node: str) -> int:
    return int(node[1:].split(".")[0])


def _edge_ok(u: str, v: str) -> bool:
    """u can write into v's input: an earlier layer, or a head into its own layer's MLP."""
    if v == "LOGITS":
        return True
    return _layer(u) < _layer(v) or (_layer(u) == _layer(v) and ".H" in u and v.endswith(".MLP"))


@torch.no_grad()
def edge_effects(engine: Engine, pairs, nodes: list[str]) -> list[EdgeEffect]:
    """Path patching (noising) of every edge u -> v between `nodes` (and into LOGITS): the
    clean run, except that v alone reads u's write from the corrupted prompt instead of
    the clean one (v's q, k and v for a head; its input for an MLP block; the final residual
    stream for LOGITS). GPT-2 only: the writes and the receivers' inputs are recomputed from
    the model's own modules."""
    model = engine.model
    if model.config.model_type != "gpt2":
        raise ValueError("edge patching here is written for GPT-2 models")
    blocks, H = model.transformer.h, engine.spec.n_heads
    dh = engine.spec.d_model // H
    L = engine.spec.n_layers
    sites = [f"blocks.{l}.{s}" for l in range(L) for s in ("hook_resid_pre", "hook_resid_mid", "attn.hook_z",
                                                             "hook_mlp_out")]
    edges = [(u, v) for u in nodes for v in nodes + ["LOGITS"] if u != v and _edge_ok(u, v)]
    sums = {e: 0.0 for e in edges}
    clean_sum = corr_sum = 0.0

    def write(acts, u: str) -> torch.Tensor:
        l = _layer(u)
        if u.endswith(".MLP"):
            return acts[f"blocks.{l}.hook_mlp_out"]
        h = int(u.split(".H")[1])
        W = blocks[l].attn.c_proj.weight[h * dh:(h + 1) * dh]  # Conv1D: z @ W
        return acts[f"blocks.{l}.attn.hook_z"][:, :, h] @ W

    for c, x, t, d in _batches(engine, pairs):
        out_c, ac = engine.run_with_cache(c, sites, logit_positions=[-1])
        out_x, ax = engine.run_with_cache(x, sites, logit_positions=[-1])
        m_c = _logit_diff(out_c.logits, t, d)
        clean_sum += m_c.sum().item()
        corr_sum += _logit_diff(out_x.logits, t, d).sum().item()
        for u, v in edges:
            delta = write(ax, u) - write(ac, u)
            if v == "LOGITS":
                hooks = {"hook_resid_final": lambda a, _s, delta=delta: a + delta}
            elif v.endswith(".MLP"):
                lv = _layer(v)
                mlp_in = blocks[lv].ln_2(ac[f"blocks.{lv}.hook_resid_mid"] + delta)
                new = blocks[lv].mlp(mlp_in)
                hooks = {f"blocks.{lv}.hook_mlp_out": lambda a, _s, new=new: new}
            else:
                lv, hv = _layer(v), int(v.split(".H")[1])
                qkv = blocks[lv].attn.c_attn(blocks[lv].ln_1(ac[f"blocks.{lv}.hook_resid_pre"] + delta))
                b, s_, _ = qkv.shape
                parts = qkv.split(engine.spec.d_model, dim=-1)  # q, k, v [b, s, d]
                hooks = {}
                for name, part in zip(("hook_q", "hook_k", "hook_v"), parts):
                    new = part.view(b, s_, H, dh)[:, :, hv]

                    def hook(a, _s, new=new, hv=hv):
                        a = a.clone()
                        a[:, :, hv] = new
                        return a
                    hooks[f"blocks.{lv}.attn.{name}"] = hook
            out = engine.forward(c, hooks=hooks, logit_positions=[-1])
            sums[(u, v)] += (_logit_diff(out.logits, t, d) - m_c).sum().item()
    gap = (clean_sum - corr_sum) / len(pairs)
    out = [EdgeEffect(source=u, target=v, noising=sums[(u, v)] / len(pairs) / gap) for u, v in edges]
    out.sort(key=lambda e: -abs(e.noising))
    return out


def reference_circuit(effects: list[NodeEffect], threshold: float = THRESHOLD) -> list[str]:
    return [e.node for e in effects if abs(e.noising) >= threshold or e.denoising >= threshold]


def compute(task: str, engine: Engine | None = None, n: int = N_PAIRS, seed: int = SEED) -> Reference:
    engine = engine or Engine.load(device="cpu")
    pairs = task_examples(task, n, seed=seed)
    effects, mc, mx = node_effects(engine, pairs)
    nodes = reference_circuit(effects)
    edges = edge_effects(engine, pairs, nodes)
    return Reference(task=task, command=f"python -m evals.reference --task {task}", n_pairs=n, seed=seed,
                     threshold=THRESHOLD, metric_clean=mc, metric_corrupted=mx, nodes=nodes, effects=effects,
                     edge_threshold=EDGE_THRESHOLD, edge_effects=edges,
                     edges=[(e.source, e.target) for e in edges if abs(e.noising) >= EDGE_THRESHOLD])


def load(task: str) -> Reference:
    path = REFERENCE_DIR / f"{task}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run `python -m evals.reference --task {task}`")
    return Reference.model_validate_json(path.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description="reference circuits of the bundled model's tasks (node patching)")
    ap.add_argument("--task", action="append", choices=task_names())
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.load(device="cpu")
    REFERENCE_DIR.mkdir(exist_ok=True)
    for task in args.task or task_names():
        ref = compute(task, engine)
        (REFERENCE_DIR / f"{task}.json").write_text(json.dumps(ref.model_dump(mode="json"), indent=1) + "\n")
        print(f"{task}: {len(ref.nodes)} nodes {ref.nodes} (gap {ref.metric_clean - ref.metric_corrupted:.2f})")


if __name__ == "__main__":
    main()
