"""Engine.load() time of a model (default: the bundled one), median of N loads in fresh
state each (one process, the first load discarded as import/warm-up).

    python tools/bench_load.py [--model DIR] [--runs 5]

Compare two versions of the code by running it from each checkout (e.g. a `git worktree`
or `git archive REV tdb_agent | tar -x` on PYTHONPATH) on the same machine."""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    import tdb_agent
    from tdb_agent.engine import Engine

    Engine.load(args.model)  # imports, file cache
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        Engine.load(args.model)
        times.append(time.perf_counter() - t0)
    print(f"{tdb_agent.__file__}: Engine.load median {statistics.median(times) * 1e3:.1f} ms over {args.runs} "
          f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})")


if __name__ == "__main__":
    main()
