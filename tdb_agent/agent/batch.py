"""Many discovery runs: `tdb-agent discover --task A --task B [--batch FILE] [--ray [ADDRESS]]`.

Each run writes its own run folder under the batch folder, exactly as a single
`tdb-agent discover` does, and the batch folder gets `summary.json` and `summary.md` (one
row per run). Without Ray the runs go one after another on one engine in this process;
with Ray they are Ray tasks on engine actors (one engine per GPU, or per CPU worker), each
actor serving runs one at a time. A run that fails is a row with its error; the others go
on. A batch file is JSON lines, one run each: {"task": "ioi"} or {"prompt": ..., "target":
..., "distractor": ..., "corrupted_prompt": ..., "name": "optional-folder-name"}.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from pydantic import BaseModel, Field

from tdb_agent.agent.runstore import RunConfig
from tdb_agent.scaleout import read_batch_lines, run_jobs, unique_names
from tdb_agent.session import EngineSpec

log = logging.getLogger(__name__)


class BatchItem(BaseModel):
    """One line of a batch file."""

    name: str | None = Field(None, description="run folder name (default: task or 'prompt', numbered)")
    task: str | None = None
    prompt: str | None = None
    corrupted_prompt: str | None = None
    target: str | None = None
    distractor: str | None = None


class RunRow(BaseModel):
    name: str
    run_dir: str
    task: str | None
    ok: bool
    nodes: int = 0
    faithfulness: float | None = None
    tool_calls: int = 0
    seconds: float = 0.0
    stopped_because: str = ""
    error: str | None = None
    worker: str = Field("", description="process that ran it (pid, and host under Ray)")


class BatchSummary(BaseModel):
    runs: list[RunRow]
    workers: int
    seconds: float


def read_batch_file(path: str | Path) -> list[BatchItem]:
    return read_batch_lines(path, BatchItem)


def plan_runs(items: list[BatchItem], template: RunConfig, root: Path) -> list[tuple[str, RunConfig, Path]]:
    """(name, config, run folder) per item; folder names are unique in the batch."""
    for it in items:
        if not it.task and not (it.prompt and it.target):
            raise ValueError(f"a batch item needs a task, or a prompt and a target: {it.model_dump(exclude_none=True)}")
    names = unique_names([it.name or it.task or "prompt" for it in items])
    out = []
    for name, it in zip(names, items):
        cfg = template.model_copy(update={k: v for k, v in it.model_dump().items() if k != "name"})
        out.append((name, cfg, root / name))
    return out


def _run_one(engine, name: str, cfg: RunConfig, out: Path, llm: dict | None) -> RunRow:
    """One discovery run on an engine already loaded; failures become a row."""
    import os
    import socket

    from tdb_agent.agent import discover
    from tdb_agent.agent.llm import LLMSettings

    t0 = time.time()
    who = f"{socket.gethostname()}:{os.getpid()}"
    try:
        settings = LLMSettings(**llm) if llm else None
        s = asyncio.run(discover.run(cfg, out, llm=settings, echo=lambda m: log.info("[%s] %s", name, m),
                                     connect=discover.default_connect(cfg, "inprocess", engine=engine)))
        return RunRow(name=name, run_dir=str(out), task=cfg.task, ok=True, nodes=len(s.nodes),
                      faithfulness=s.faithfulness, tool_calls=s.tool_calls, seconds=round(s.seconds, 2),
                      stopped_because=s.stopped_because, worker=who)
    except Exception as e:  # one failed run must not end the batch
        log.exception("run %s failed", name)
        while len(getattr(e, "exceptions", ())) == 1:  # the MCP session's task group wraps the cause
            e = e.exceptions[0]
        return RunRow(name=name, run_dir=str(out), task=cfg.task, ok=False, seconds=round(time.time() - t0, 2),
                      error=f"{type(e).__name__}: {e}", worker=who)


def _run_job(engine, name: str, cfg: dict, out: str, llm: dict | None) -> dict:
    return _run_one(engine, name, RunConfig(**cfg), Path(out), llm).model_dump()


class DiscoverWorker:
    """A Ray actor holding one engine; each `run` call is one discovery run."""

    def __init__(self, spec: dict):
        self.engine = EngineSpec(**spec).load(set_threads=True)

    def run(self, i: int, name: str, cfg: dict, out: str, llm: dict | None) -> tuple[int, dict]:
        return i, _run_job(self.engine, name, cfg, out, llm)


def run_batch(runs: list[tuple[str, RunConfig, Path]], spec: EngineSpec, root: Path, llm: dict | None = None,
              ray_address: str | None = None, workers: int | None = None, echo=print) -> BatchSummary:
    """Run every (name, config, folder); with `ray_address` ("local" or a cluster address)
    over Ray actors, else one after another here. Writes root/summary.json and summary.md."""
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    jobs = [(name, cfg.model_dump(), str(out), llm) for name, cfg, out in runs]
    results, n_workers = run_jobs(spec, jobs, _run_job, DiscoverWorker, "run", ray_address, workers,
                                  on_result=lambda r: echo(_row_line(RunRow(**r))))
    rows = [RunRow(**r) for r in results]
    summary = BatchSummary(runs=rows, workers=n_workers, seconds=round(time.time() - t0, 2))
    (root / "summary.json").write_text(summary.model_dump_json(indent=2) + "\n")
    (root / "summary.md").write_text(summary_table(summary))
    return summary


def _row_line(r: RunRow) -> str:
    if not r.ok:
        return f"  {r.name}: FAILED {r.error}"
    return f"  {r.name}: {r.nodes} nodes, faithfulness {r.faithfulness}, {r.seconds:.1f}s ({r.worker})"


def summary_table(s: BatchSummary) -> str:
    """A markdown table of all runs."""
    lines = [f"# Discovery batch: {len(s.runs)} runs, {s.workers} worker(s), {s.seconds:.1f} s", "",
             "| run | task | ok | nodes | faithfulness | tool calls | seconds | stopped | worker |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in s.runs:
        faith = "" if r.faithfulness is None else f"{r.faithfulness:.3f}"
        ok = "yes" if r.ok else f"no: {r.error}"
        lines.append(f"| [{r.name}]({Path(r.run_dir).name}/report.md) | {r.task or ''} | {ok} | {r.nodes} | {faith} | "
                     f"{r.tool_calls} | {r.seconds:.1f} | {r.stopped_because} | {r.worker} |")
    return "\n".join(lines) + "\n"


def cmd_batch(args) -> int:
    """`tdb-agent discover` with several --task, a --batch file or --ray."""
    import sys

    from tdb_agent.agent.llm import LLMSettings

    items = [BatchItem(task=t) for t in (args.task or [])]
    if args.prompt:
        items.append(BatchItem(prompt=args.prompt, target=args.target, distractor=args.distractor,
                               corrupted_prompt=args.corrupted))
    if args.batch:
        items += read_batch_file(args.batch)
    if not items:
        print("tdb-agent discover: give --task (repeatable), --prompt with --target, or --batch FILE", file=sys.stderr)
        return 2
    root = Path(args.out or f"runs/batch-{time.strftime('%Y%m%d-%H%M%S')}")
    template = RunConfig(planner=args.planner, model=args.model, max_steps=args.max_steps, llm_model=args.llm_model,
                         ablation=args.ablation, graph=getattr(args, "graph", False))
    runs = plan_runs(items, template, root)
    llm = None
    if args.planner == "llm":
        llm = LLMSettings.from_env(base_url=args.llm_base_url, model=args.llm_model).model_dump()
    spec = EngineSpec.from_args(args)
    echo = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    echo(f"{len(runs)} runs -> {root}" + (f" on Ray ({args.ray})" if args.ray else ""))
    summary = run_batch(runs, spec, root, llm=llm, ray_address=args.ray, workers=args.workers, echo=echo)
    print(summary_table(summary))
    return 0 if all(r.ok for r in summary.runs) else 1
