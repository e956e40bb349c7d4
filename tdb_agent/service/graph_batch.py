"""A batch of attribution graphs: `tdb-agent graphs --batch FILE [--ray [ADDRESS]]`.

Each prompt's graph is built, pruned and written as circuit-tracer / Neuronpedia graph JSON
(`<out>/<name>.json`, with the replacement and completeness scores in its metadata); the
batch folder gets `summary.json` and `summary.md`, one row per graph. Without Ray the
graphs are built one after another on one engine here; with Ray on engine actors (one per
GPU, or per `threads` CPUs), as `discover --batch --ray` does. A graph that fails (a bad
target, a prompt over the memory limit) is a row with its error; the others go on. A batch
file is JSON lines: {"prompt": ..., "target": ..., "distractor": ..., "name": ...}.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

from pydantic import BaseModel, Field

from tdb_agent import jsonsafe
from tdb_agent.scaleout import read_batch_lines, run_jobs, unique_names
from tdb_agent.session import EngineSpec


class GraphItem(BaseModel):
    """One line of a graph batch file."""

    prompt: str
    target: str | None = Field(None, description="a token: its logit (default: the top logits)")
    distractor: str | None = Field(None, description="with a target: the logit difference target - distractor")
    mass: float = Field(0.95, gt=0, le=1, description="top logits: the probability mass they cover")
    name: str | None = Field(None, description="file name (default: 'graph', numbered)")


class GraphSettings(BaseModel):
    max_feature_nodes: int = Field(512, ge=1, description="features whose inputs are computed")
    batch_size: int = Field(16, ge=1, description="rows per backward pass")
    node_threshold: float = Field(0.8, ge=0, le=1)
    edge_threshold: float = Field(0.98, ge=0, le=1)
    max_gib: float = Field(8.0, gt=0, description="refuse a graph estimated to need more memory than this")


class GraphRow(BaseModel):
    name: str
    path: str
    ok: bool
    tokens: int = 0
    active_features: int = 0
    expanded: int = 0
    nodes: int = Field(0, description="nodes kept by pruning")
    links: int = 0
    replacement_score: float | None = None
    completeness_score: float | None = None
    completeness_residual: float | None = None
    seconds: float = 0.0
    error: str | None = None
    worker: str = ""


class GraphBatchSummary(BaseModel):
    graphs: list[GraphRow]
    workers: int
    seconds: float


def read_graph_batch(path: str | Path) -> list[GraphItem]:
    return read_batch_lines(path, GraphItem)


def build_one(engine, name: str, item: GraphItem, settings: GraphSettings, out: Path) -> GraphRow:
    """Build, prune, score and write one graph; a failure becomes a row."""
    # here, not at the top: the command line builds this module's flags without loading torch
    from tdb_agent.ops.graph import GraphTarget, build_graph
    from tdb_agent.ops.graph.export import to_json, validate
    from tdb_agent.ops.graph.influence import prune, scores, square

    t0 = time.time()
    path = out / f"{name}.json"
    who = f"{socket.gethostname()}:{os.getpid()}"
    try:
        if item.distractor and not item.target:
            raise ValueError("a distractor needs a target")
        kind = "logit_diff" if item.distractor else ("logit" if item.target else "top")
        tgt = GraphTarget(kind=kind, token=item.target, distractor=item.distractor, mass=item.mass)
        g = build_graph(engine, item.prompt, tgt, max_feature_nodes=settings.max_feature_nodes,
                        batch_size=settings.batch_size, max_bytes=int(settings.max_gib * 2 ** 30))
        sq = square(g)
        p = prune(sq, settings.node_threshold, settings.edge_threshold)
        sc = scores(sq)
        data = to_json(g, sq, p, slug=name, scan=engine.name, scores=sc)
        problems = validate(data)
        if problems:
            raise ValueError(f"the graph JSON is not valid: {problems[:3]}")
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(jsonsafe.dumps(data))
        return GraphRow(name=name, path=str(path), ok=True, tokens=g.n_pos, active_features=g.src.n_feat,
                        expanded=g.stats["expanded_features"], nodes=len(data["nodes"]), links=len(data["links"]),
                        replacement_score=sc[0], completeness_score=sc[1],
                        completeness_residual=g.stats["completeness_residual"], seconds=round(time.time() - t0, 2),
                        worker=who)
    except Exception as e:  # one failed graph must not end the batch
        return GraphRow(name=name, path=str(path), ok=False, seconds=round(time.time() - t0, 2),
                        error=f"{type(e).__name__}: {e}", worker=who)


def _build_job(engine, name: str, item: dict, settings: dict, out: str) -> dict:
    return build_one(engine, name, GraphItem(**item), GraphSettings(**settings), Path(out)).model_dump()


class GraphWorker:
    """A Ray actor holding one engine; each `build` call is one graph."""

    def __init__(self, spec: dict):
        self.engine = EngineSpec(**spec).load(set_threads=True)

    def build(self, i: int, name: str, item: dict, settings: dict, out: str) -> tuple[int, dict]:
        return i, _build_job(self.engine, name, item, settings, out)


def run_graph_batch(items: list[GraphItem], spec: EngineSpec, root: Path, settings: GraphSettings | None = None,
                    ray_address: str | None = None, workers: int | None = None, echo=print) -> GraphBatchSummary:
    """Build every graph into `root`; with `ray_address` ("local" or a cluster address) on
    Ray actors, else one after another here. Writes root/summary.json and summary.md."""
    settings = settings or GraphSettings()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    names = unique_names([it.name or "graph" for it in items])
    jobs = [(name, it.model_dump(), settings.model_dump(), str(root)) for name, it in zip(names, items)]
    results, n_workers = run_jobs(spec, jobs, _build_job, GraphWorker, "build", ray_address, workers,
                                  on_result=lambda r: echo(_row_line(GraphRow(**r))))
    rows = [GraphRow(**r) for r in results]
    summary = GraphBatchSummary(graphs=rows, workers=n_workers, seconds=round(time.time() - t0, 2))
    (root / "summary.json").write_text(summary.model_dump_json(indent=2) + "\n")
    (root / "summary.md").write_text(summary_table(summary))
    return summary


def _row_line(r: GraphRow) -> str:
    if not r.ok:
        return f"  {r.name}: FAILED {r.error}"
    return (f"  {r.name}: {r.tokens} tokens, {r.nodes} nodes, {r.links} links, replacement "
            f"{r.replacement_score:.3f}, {r.seconds:.1f}s ({r.worker})")


def summary_table(s: GraphBatchSummary) -> str:
    lines = [f"# Attribution graphs: {len(s.graphs)} prompts, {s.workers} worker(s), {s.seconds:.1f} s", "",
             "| graph | ok | tokens | active features | expanded | nodes | links | replacement | completeness | "
             "seconds | worker |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in s.graphs:
        ok = "yes" if r.ok else f"no: {r.error}"
        rep = "" if r.replacement_score is None else f"{r.replacement_score:.3f}"
        comp = "" if r.completeness_score is None else f"{r.completeness_score:.3f}"
        lines.append(f"| [{r.name}]({Path(r.path).name}) | {ok} | {r.tokens} | {r.active_features} | {r.expanded} | "
                     f"{r.nodes} | {r.links} | {rep} | {comp} | {r.seconds:.1f} | {r.worker} |")
    return "\n".join(lines) + "\n"


def add_graphs_command(sub, model_args) -> None:
    """The `tdb-agent graphs` subcommand."""
    p = sub.add_parser("graphs", help="build a batch of attribution graphs (one JSON per prompt), optionally on Ray")
    model_args(p)
    p.add_argument("--batch", required=True, metavar="FILE",
                   help="JSON lines, one graph each: {\"prompt\", \"target\", \"distractor\", \"mass\", \"name\"}")
    p.add_argument("--out", default=None, help="folder for the graphs and summary.md (default: runs/graphs-<time>)")
    p.add_argument("--sae", action="append", default=[], metavar="PATH", help="residual-stream SAE folder (repeatable)")
    p.add_argument("--no-bundled-saes", action="store_true")
    p.add_argument("--transcoders", action="append", default=[], metavar="PATH", help="transcoder folder(s)")
    p.add_argument("--no-bundled-transcoders", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (per Ray worker)")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="build on Ray engine actors: a local cluster, or the one at ADDRESS")
    p.add_argument("--workers", type=int, default=None, help="Ray workers (default: one per GPU or per --threads CPUs)")
    for name, field in GraphSettings.model_fields.items():
        p.add_argument("--" + name.replace("_", "-"), type=type(field.default), default=field.default,
                       help=field.description)
    p.set_defaults(fn=cmd_graphs)


def cmd_graphs(args: argparse.Namespace) -> int:
    items = read_graph_batch(args.batch)
    if not items:
        print("tdb-agent graphs: the batch file has no prompts", file=sys.stderr)
        return 2
    root = Path(args.out or f"runs/graphs-{time.strftime('%Y%m%d-%H%M%S')}")
    settings = GraphSettings(**{k: getattr(args, k) for k in GraphSettings.model_fields})
    spec = EngineSpec.from_args(args)
    echo = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    echo(f"{len(items)} graphs -> {root}" + (f" on Ray ({args.ray})" if args.ray else ""))
    summary = run_graph_batch(items, spec, root, settings, ray_address=args.ray, workers=args.workers, echo=echo)
    print(summary_table(summary))
    return 0 if all(r.ok for r in summary.graphs) else 1
