"""`python -m evals`: score circuit discovery and explanations; write RESULTS.md and results.json.

    python -m evals            # everything (under 15 minutes on two CPU cores)
    python -m evals --quick    # constructed models, Tracr, bundled IOI, explanation sample (about 5 min on 2 cores)
    python -m evals --out DIR  # write elsewhere (default: evals/)

Tiers: 1 constructed models (hand-set weights), 2 trained toy with redundant heads
(full run only: training takes tens of seconds), 3 Tracr-compiled programs (`evals/tracr/`),
4 the bundled model's tasks against stored reference circuits (`evals/reference`),
5 literature lists (`evals/literature.json`, data only), and explanations.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from evals import constructed, explanations, reference
from evals.edge_methods import EDGE_METHODS
from evals.methods import AGENT_METHODS, RANKING_METHODS, Case, MethodResult, score_case
from evals.report import TRACR_NOTE, Results, write
from tdb_agent import environment
from tdb_agent.circuits import PromptPair
from tdb_agent.tasks import task_examples

HERE = Path(__file__).resolve().parent
METHODS = list(RANKING_METHODS) + list(EDGE_METHODS) + list(AGENT_METHODS)
QUICK_METHODS = [m for m in METHODS if m != "scripted_planner_both"]  # --quick (CI) keeps its time


def constructed_cases(root: Path, n_pairs: int) -> list[Case]:
    cases = []
    for name in constructed.CASES:
        c = constructed.build_case(name, root)
        cases.append(Case(tier="constructed", name=name, model_dir=c.model_dir,
                          pairs=constructed.case_pairs(name, n_pairs, seed=1), truth_nodes=c.nodes,
                          truth_edges=c.edges, truth_neurons=c.neurons, note=c.description))
    return cases


def tracr_cases(root: Path, n_pairs: int) -> list[tuple[Case, dict]]:
    """Compiled programs; truth = the compiled (non-empty) blocks: the algorithm as Tracr
    wrote it. Which of them the read-out position needs under each ablation is found by
    exhaustive ablation and reported beside it."""
    from evals import tracr_models
    from evals.toy import exhaustive_truth
    from tdb_agent.engine import Engine

    out = []
    for program in tracr_models.PROGRAMS:
        folder = tracr_models.build(program, root / program)
        pairs = tracr_models.program_pairs(program, n_pairs, seed=1)
        compiled = tracr_models.ground_truth(program)
        engine = Engine.load(folder, device="cpu")
        with torch.no_grad():
            needed = {m: exhaustive_truth(engine, pairs, mode=m).nodes for m in ("mean", "resample")}
        out.append((Case(tier="tracr", name=program, model_dir=str(folder), pairs=pairs, truth_nodes=compiled,
                         truth_edges=tracr_models.ground_truth_edges(program),
                         note=f"compiled blocks {compiled}"),
                    {"compiled_blocks": compiled, "needed": needed}))
    return out


def bundled_cases(tasks: list[str], n_pairs: int) -> list[Case]:
    cases = []
    for task in tasks:
        ref = reference.load(task)
        cases.append(Case(tier="bundled", name=task, task=task,
                          pairs=[PromptPair(**ex.model_dump()) for ex in task_examples(task, n_pairs, seed=0)],
                          truth_nodes=ref.nodes, truth_edges=[tuple(e) for e in ref.edges],
                          note=f"reference: node and path patching, {ref.n_pairs} pairs (seed {ref.seed})"))
    return cases


def revision() -> str:
    """The git commit of the tree being evaluated, marked when files have uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return head + (" + uncommitted changes" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evals", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a subset: constructed models, Tracr, bundled IOI, an explanation sample (about 5 minutes on 2 CPU cores)")
    ap.add_argument("--out", default=str(HERE), help="folder for RESULTS.md and results.json")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("TDB_EVAL_THREADS", "2")))
    ap.add_argument("--keep-runs", default=None, help="keep the agents' run folders here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    rev = revision()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[MethodResult] = []
    toy_truths, tracr_truths = [], []
    keep = Path(args.keep_runs) if args.keep_runs else None
    methods = QUICK_METHODS if args.quick else METHODS
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print("tier 1: constructed models", flush=True)
        cases = constructed_cases(root / "constructed", 16)
        for case in cases:
            results += score_case(case, methods, keep)
        if not args.quick:
            print("tier 2: trained toy with redundant induction heads", flush=True)
            from evals.toy import toy_case
            for seed in (0, 1):
                case, truth = toy_case(root / "toy", seed=seed)
                toy_truths.append({"case": case.name, **truth.model_dump()})
                results += score_case(case, methods, keep)
        print("tier 3: Tracr-compiled programs", flush=True)
        for case, truth in tracr_cases(root / "tracr", 16):
            tracr_truths.append({"case": case.name, **truth})
            results += score_case(case, methods, keep)
        print("tier 4: bundled model tasks", flush=True)
        tasks = ["ioi"] if args.quick else ["ioi", "induction", "greater_than", "facts"]
        for case in bundled_cases(tasks, 16):
            quick_bundled = list(RANKING_METHODS) + list(EDGE_METHODS) + ["scripted_planner"]
            results += score_case(case, quick_bundled if args.quick else methods,
                                  keep)
        print("explanations", flush=True)
        expl = explanations.run(str(root / "constructed" / "class_neuron"), quick=args.quick)
    res = Results(command="python -m evals" + (" --quick" if args.quick else ""), quick=args.quick, revision=rev,
                  finished=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  seconds=time.time() - t0, threads=args.threads, machine=environment.summary(),
                  results=results, toy_truth=toy_truths, tracr_truth=tracr_truths,
                  references={t: reference.load(t).model_dump(include={"nodes", "edges", "n_pairs", "seed", "threshold",
                                                                       "edge_threshold", "command"}) for t in tasks},
                  explanations=expl, tracr=TRACR_NOTE,
                  literature=json.loads((HERE / "literature.json").read_text()))
    write(res, out)
    print(f"wrote {out / 'RESULTS.md'} and {out / 'results.json'} in {res.seconds:.0f} s")
    failed = [r for r in results if r.status.startswith("failed")]
    if failed:
        print(f"{len(failed)} (case, method) runs failed; they are in the table", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
