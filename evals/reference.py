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
N_PAIRS = 32
SEED = 1000  # not the seed the evals score on (0): the reference is computed on other pairs


class NodeEffect(BaseModel):
    node: str
    noising: float  # (m(clean, node corrupted) - m(clean)) / gap: -1 = the behaviour is gone
    denoising: float  # (m(corrupted, node clean) - m(corrupted)) / gap: 1 = fully restored


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


def _tok(engine: Engine, word: str) -> int:
    ids = engine.tokenizer(word, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (word, ids)
    return ids[0]


@torch.no_grad()
def node_effects(engine: Engine, pairs) -> tuple[list[NodeEffect], float, float]:
    """Noising and denoising effect of every node, as fractions of the mean gap."""
    sites = _sites(engine)
    site_names = sorted({s for _, s, _ in sites})
    groups: dict[int, list] = {}
    for p in pairs:
        c = engine.to_tokens(p.prompt)
        x = engine.to_tokens(p.corrupted_prompt)
        assert c.shape == x.shape, p
        groups.setdefault(c.shape[1], []).append((c, x, _tok(engine, p.target), _tok(engine, p.distractor)))
    sums = {node: [0.0, 0.0] for node, _, _ in sites}
    clean_sum = corr_sum = 0.0
    for rows in groups.values():
        c = torch.cat([r[0] for r in rows])
        x = torch.cat([r[1] for r in rows])
        t = torch.tensor([r[2] for r in rows])
        d = torch.tensor([r[3] for r in rows])
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


def reference_circuit(effects: list[NodeEffect], threshold: float = THRESHOLD) -> list[str]:
    return [e.node for e in effects if abs(e.noising) >= threshold or e.denoising >= threshold]


def compute(task: str, engine: Engine | None = None, n: int = N_PAIRS, seed: int = SEED) -> Reference:
    engine = engine or Engine.load(device="cpu")
    pairs = task_examples(task, n, seed=seed)
    effects, mc, mx = node_effects(engine, pairs)
    return Reference(task=task, command=f"python -m evals.reference --task {task}", n_pairs=n, seed=seed,
                     threshold=THRESHOLD, metric_clean=mc, metric_corrupted=mx,
                     nodes=reference_circuit(effects), effects=effects)


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
