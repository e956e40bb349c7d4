"""Tier 2: the trained toy with redundant induction heads (`evals/toy_induction.py`).

Its ground truth is not assumed but computed by exhaustive ablation: every subset S of
the universe (8 heads + 2 MLP blocks: 1,024 subsets) is kept while the rest is resample-
ablated, and a component is in the circuit when adding it to *some* subset raises the
faithfulness by at least `MARGINAL` (max over S of f(S + v) - f(S)). This is what
single-component ablation cannot see: a redundant induction head barely matters alone
(f(all - v) stays near 1) but matters a lot once its backups are gone.

The truth uses resample ablation (each pair's corrupted prompt); methods are scored under
both modes (the toy ships its own `reference.txt`, so mean ablation averages over its own
data).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from pydantic import BaseModel

from evals.methods import Case, universe
from tdb_agent.circuits import Evaluator, PromptPair, keep_set
from tdb_agent.engine import Engine

MARGINAL = 0.1


class ToyTruth(BaseModel):
    nodes: list[str]
    max_marginal: dict[str, float]  # v -> max over subsets S of f(S + v) - f(S)
    single_ablation: dict[str, float]  # v -> f(universe - v): single-component ablation
    all_layer1_heads_ablated: float | None
    smallest_reaching_08: list[str]  # a smallest subset with f >= 0.8
    n_subsets: int
    train_seconds: float


def exhaustive_truth(engine: Engine, pairs: list[PromptPair], mode: str = "resample") -> ToyTruth:
    """Every subset of the universe kept (the rest ablated by `mode`): a component is in the
    truth when adding it to some subset raises faithfulness by at least MARGINAL."""
    uni = universe(engine)
    ev = Evaluator(engine, pairs, mode=mode)
    subsets = [frozenset(c) for r in range(len(uni) + 1) for c in itertools.combinations(uni, r)]
    rows = ev.metric_rows([keep_set(sorted(s), engine.spec) for s in subsets])
    f = {s: ev.faithfulness(r) for s, r in zip(subsets, rows)}
    marg = {v: max(f[s | {v}] - f[s] for s in subsets if v not in s) for v in uni}
    full = frozenset(uni)
    l1 = [u for u in uni if u.startswith("L1.H")]
    reaching = [s for s in subsets if f[s] >= 0.8]
    smallest = min(reaching, key=len) if reaching else full
    return ToyTruth(nodes=[v for v in uni if marg[v] >= MARGINAL], max_marginal=marg,
                    single_ablation={v: f[full - {v}] for v in uni},
                    all_layer1_heads_ablated=f[full - set(l1)] if l1 else None, smallest_reaching_08=sorted(smallest),
                    n_subsets=len(subsets), train_seconds=0.0)


def toy_case(workdir: Path, n_pairs: int = 16, seed: int = 0) -> tuple[Case, ToyTruth]:
    import time

    from evals import toy_induction

    t0 = time.time()
    folder = toy_induction.train_toy_induction(Path(workdir) / f"toy-induction-seed{seed}", seed=seed)
    secs = time.time() - t0
    pairs = [PromptPair(**ex.model_dump()) for ex in toy_induction.examples(n_pairs, seed=1)]
    engine = Engine.load(folder, device="cpu")
    with torch.no_grad():
        truth = exhaustive_truth(engine, pairs)
    truth.train_seconds = secs
    case = Case(tier="trained toy", name=f"redundant induction (seed {seed})", model_dir=str(folder), pairs=pairs,
                truth_nodes=truth.nodes,
                note="ground truth by exhaustive resample ablation over all 1,024 subsets")
    return case, truth
