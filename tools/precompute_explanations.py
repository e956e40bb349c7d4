"""Precompute heuristic explanations (and their simulation scores) for every component of
a dataset and write them next to it as `explanations.json` (shipped with the bundled model).

    python tools/precompute_explanations.py [--dataset tdb_agent/assets/datasets/tdb-tiny]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from tdb_agent.datasets import ActivationDataset
from tdb_agent.datasets.store import BUNDLED_DATASET
from tdb_agent.datasets.components import component_name
from tdb_agent.engine import Engine
from tdb_agent.engine.sae import attach_saes
from tdb_agent.explain import Explainer, ExplainerLLM, precompute_heuristic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--dataset", default=str(BUNDLED_DATASET))
    ap.add_argument("--sae", action="append", default=[])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.load(args.model, device="cpu")
    attach_saes(engine, args.sae)
    ds = ActivationDataset.open(args.dataset, engine)
    x = Explainer(engine, ds, llm=ExplainerLLM(base_url=None, api_key=None), cache_dir=None)
    comps = [component_name(ds.blocks, c) for c in range(ds.manifest["n_components"])]
    t0 = time.time()
    out = precompute_heuristic(x, comps)
    (Path(args.dataset) / "explanations.json").write_text(json.dumps(out, separators=(",", ":")) + "\n")
    by_kind: dict[str, list[float]] = {}
    for cid, e in out.items():
        kind = "sae" if ".F" in cid else ("head" if ".H" in cid else "neuron")
        by_kind.setdefault(kind, []).append(e["score"])
    print(f"{len(out)} explanations in {time.time() - t0:.0f}s; mean score by kind: "
          + ", ".join(f"{k} {statistics.mean(v):.3f}" for k, v in by_kind.items()))


if __name__ == "__main__":
    main()
