"""Median detection, fuzzing and simulation scores of the heuristic explanations on the
bundled model: every head and a seeded sample of neurons and SAE latents (the before/after
figure for changes to explain/heuristic.py).

    PYTHONPATH=. python tools/explanation_medians.py [--n 40]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from tdb_agent.datasets import ActivationDataset
from tdb_agent.datasets.components import component_name
from tdb_agent.datasets.store import BUNDLED_DATASET
from tdb_agent.engine import Engine
from tdb_agent.engine.sae import attach_saes
from tdb_agent.explain import Explainer, ExplainerLLM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40, help="neurons and latents sampled (all heads are scored)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    e = Engine.load(device="cpu")
    attach_saes(e, [], bundled=True)
    ds = ActivationDataset.open(BUNDLED_DATASET, e)
    x = Explainer(e, ds, llm=ExplainerLLM(base_url=None, api_key=None))
    comps = [component_name(ds.blocks, c) for c in range(ds.manifest["n_components"])]
    rng = random.Random(args.seed)
    kinds = {"head": [c for c in comps if ".H" in c],
             "neuron": rng.sample([c for c in comps if ".N" in c], args.n),
             "sae latent": rng.sample([c for c in comps if ".F" in c], args.n)}
    t = time.time()
    for kind, cs in kinds.items():
        rs = [x.explain(c, "heuristic", refresh=True) for c in cs]
        med = {s: statistics.median(v for r in rs if (v := r.scores[i].value) is not None)
               for i, s in enumerate(("detection", "fuzzing", "simulation"))}
        above = sum(any(s.above_chance for s in r.scores) for r in rs)
        no_claim = sum(not r.explanation.startswith("fires on") for r in rs)
        print(f"{kind}: n={len(cs)} " + " ".join(f"{k} {v:.3f}" for k, v in med.items())
              + f"; some interval above chance: {above}; no claim: {no_claim}")
    print(f"{time.time() - t:.0f} s")


if __name__ == "__main__":
    main()
