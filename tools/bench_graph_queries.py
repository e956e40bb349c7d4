"""Time the graph query tools on one bundled-model graph (transcoders attached): build,
graph_paths (pruned and whole), graph_prune, graph_supernodes, graph_to_circuit.

    python tools/bench_graph_queries.py --repeat 7   # a 127-token prompt (IOI sentences)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tdb_agent.engine import Engine  # noqa: E402
from tdb_agent.engine.transcoder import attach_transcoders  # noqa: E402
from tdb_agent.service.graph_circuit import ToCircuitArgs, graph_to_circuit  # noqa: E402
from tdb_agent.service.graph_query_tools import (  # noqa: E402
    PathsArgs,
    PruneArgs,
    SupernodeArgs,
    graph_paths,
    graph_prune,
    graph_supernodes,
)
from tdb_agent.service.graph_tools import GraphArgs, attribution_graph  # noqa: E402
from tdb_agent.service.tool import Job  # noqa: E402
from tdb_agent.workbench import Workbench  # noqa: E402

SENTENCE = "When Eric and Ryan went to the harbor , Eric gave a pen to"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=7, help="whole sentences before the final one")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    e = Engine.load()
    attach_transcoders(e)
    bench = Workbench(e, workspace=Path(tempfile.mkdtemp()))
    prompt = " ".join([SENTENCE + " Ryan ."] * a.repeat + [SENTENCE])
    t = time.perf_counter()
    r = attribution_graph(bench, GraphArgs(prompt=prompt, name="g"), Job())
    print(f"{len(r.tokens)} tokens: build {time.perf_counter() - t:.2f} s, {r.nodes} nodes, {r.edges} edges kept")
    for fn, args in [(graph_paths, PathsArgs(name="g", k=5)), (graph_paths, PathsArgs(name="g", k=5, pruned=False)),
                     (graph_prune, PruneArgs(name="g", max_feature_nodes=20)),
                     (graph_supernodes, SupernodeArgs(name="g")), (graph_to_circuit, ToCircuitArgs(name="g"))]:
        t = time.perf_counter()
        fn(bench, args, Job())
        extra = "" if fn is not graph_paths else f" (pruned={args.pruned})"
        print(f"{fn.__name__}{extra}: {time.perf_counter() - t:.3f} s")


if __name__ == "__main__":
    main()
