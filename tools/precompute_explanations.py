"""Precompute heuristic explanations (and their simulation scores) for every component of
a dataset and write them next to it as `explanations.json` (shipped with the bundled model,
gzipped: `--gzip`).

    python tools/precompute_explanations.py [--dataset tdb_agent/assets/datasets/tdb-tiny]

`--kinds transcoder --merge` computes only the transcoder features' and keeps the others
from the existing file (valid as long as their dataset columns are unchanged, which adding
transcoders to a build guarantees: datasets/components.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from tdb_agent.datasets import ActivationDataset
from tdb_agent.datasets.store import BUNDLED_DATASET, EXPLANATIONS, compress, read_member
from tdb_agent.datasets.components import component_name
from tdb_agent.engine import Engine
from tdb_agent.engine.sae import attach_saes
from tdb_agent.engine.transcoder import attach_transcoders
from tdb_agent.explain import Explainer, ExplainerLLM, precompute_heuristic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--dataset", default=str(BUNDLED_DATASET))
    ap.add_argument("--sae", action="append", default=[])
    ap.add_argument("--transcoders", action="append", default=[])
    ap.add_argument("--kinds", nargs="*", default=None, help="only these component kinds (neuron head sae "
                    "transcoder)")
    ap.add_argument("--merge", action="store_true", help="keep the existing file's other explanations")
    ap.add_argument("--gzip", action="store_true", help="write explanations.json.gz")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.load(args.model, device="cpu")
    attach_saes(engine, args.sae)
    attach_transcoders(engine, args.transcoders)
    ds = ActivationDataset.open(args.dataset, engine)
    x = Explainer(engine, ds, llm=ExplainerLLM(base_url=None, api_key=None), cache_dir=None)
    kinds = {b.offset + i: b.kind for b in ds.blocks for i in range(b.n)}
    comps = [component_name(ds.blocks, c) for c in range(ds.manifest["n_components"])
             if args.kinds is None or kinds[c] in args.kinds]
    old = json.loads(read_member(args.dataset, EXPLANATIONS) or "{}") if args.merge else {}
    t0 = time.time()
    out = old | precompute_heuristic(x, comps)
    for stale in (Path(args.dataset) / EXPLANATIONS, Path(args.dataset) / f"{EXPLANATIONS}.gz"):
        stale.unlink(missing_ok=True)
    (Path(args.dataset) / EXPLANATIONS).write_text(json.dumps(out, separators=(",", ":")) + "\n")
    if args.gzip:
        compress(args.dataset, (EXPLANATIONS,))
    by_kind: dict[str, list[float]] = {}
    for cid, e in out.items():
        kind = "transcoder" if ".tc." in cid else "sae" if ".F" in cid else ("head" if ".H" in cid else "neuron")
        by_kind.setdefault(kind, []).append(e["score"])
    print(f"{len(out)} explanations in {time.time() - t0:.0f}s; mean score by kind: "
          + ", ".join(f"{k} {statistics.mean(v):.3f}" for k, v in by_kind.items()))


if __name__ == "__main__":
    main()
