"""The viewer's JSON API, without any web framework: the pages' data (model, component,
circuit, run folders). Its tool routes (`viewer.routes`) take no models of their own: they
validate bodies with the MCP tool's argument model and call the same `service` tool.

Run folders (`tdb-agent discover --out DIR`) are read as they are on disk: `run.json`,
`transcript.jsonl`, `graph.json`, `report.md`. Nothing outside the folders the server was
given is read: a run folder or run file that is a symlink to somewhere else is skipped, and
results name runs by their place under those folders, not by the server's absolute paths.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from tdb_agent.agent.summary import RunSummary
from tdb_agent.circuits.model import SINK, stream_order
from tdb_agent.components import parse_component
from tdb_agent.errors import TdbError
from tdb_agent.ops.attention import AttentionPatternResult
from tdb_agent.ops.basic import ModelInfo, TaskList
from tdb_agent.service.catalog import tool
from tdb_agent.service.circuit_tools import circuit_store
from tdb_agent.service.examples import TopExamplesResult, top_examples_of
from tdb_agent.service.model_tools import AttentionArgs
from tdb_agent.service.running import run_tool
from tdb_agent.service.tool import NoArgs
from tdb_agent.workbench import ComponentPage, Limits, Workbench, component_page

log = logging.getLogger(__name__)


class NotFound(TdbError):
    """No run or circuit of that name (HTTP 404)."""


# ------------------------------------------------------------------ results of the viewer's own pages
class CircuitSummary(BaseModel):
    name: str
    nodes: int
    edges: int


class ModelPage(BaseModel):
    info: ModelInfo
    tasks: TaskList
    runs: list[RunSummary]
    circuits: list[CircuitSummary]
    graphs: list[str] = Field(default_factory=list, description="attribution graphs built or saved in the workspace")
    limits: Limits = Field(description="the server's per-call limits (the page keeps its requests within them)")


class ComponentView(BaseModel):
    page: ComponentPage = Field(description="what tdb://component/{id} returns: weights, explanation, top examples")
    random: TopExamplesResult | None = Field(None, description="random dataset examples (top_examples random=True)")
    attention: AttentionPatternResult | None = Field(None, description="heads: the pattern on the top example")
    attention_query: int | None = Field(None, description="the top example's position in `attention.tokens`")


class GraphRow(BaseModel):
    """Where a node sits in the picture: one row per (layer, attn|mlp|resid), logits on top."""

    id: str
    row: int
    label: str


class CircuitView(BaseModel):
    name: str
    graph: dict[str, Any] = Field(description="networkx node-link JSON, as in graph.json / tdb://circuit/{name}")
    rows: list[GraphRow]


class RunView(CircuitView):
    path: str
    config: dict[str, Any]
    events: list[dict[str, Any]] = Field(description="transcript.jsonl, one event per step")
    report: str | None = None


# ------------------------------------------------------------------ pages
def model_page(bench: Workbench, runs: RunIndex | None = None) -> ModelPage:
    info = tool("model_info").run(bench, NoArgs())
    store = circuit_store(bench)  # through the store: another server's changes to the workspace show
    circuits = [CircuitSummary(name=n, nodes=g.number_of_nodes(), edges=g.number_of_edges())
                for n, g in ((n, store.get(n)) for n in store.names())]
    return ModelPage(info=info, tasks=tool("list_tasks").run(bench, NoArgs()), runs=runs.summaries() if runs else [], circuits=circuits,
                     graphs=graph_names(bench), limits=bench.limits)


def example_text(bench: Workbench, token_ids: list[int]) -> str:
    """The text of a dataset window, for the ops that take a prompt (BOS is added back by them)."""
    bos = bench.engine.tokenizer.bos_token_id
    ids = token_ids[1:] if token_ids and token_ids[0] == bos else token_ids
    return bench.engine.tokenizer.decode(ids)


def component_view(bench: Workbench, component: str) -> ComponentView:
    """The component page plus random examples and, for heads, the attention pattern of the
    top example (query = the example's position)."""
    def go():
        page = component_page(bench, component)
        view = ComponentView(page=page)
        base = page.id.split("@")[0]
        ds = bench.dataset
        if ds is None or page.kind not in ("neuron", "head", "sae"):
            return view
        try:
            view.random = top_examples_of(ds, base, 5, "random")
        except TdbError:
            pass
        top = (page.sections.get("top_examples") or {}).get("examples") or []
        if page.kind == "head" and top:
            ex = top[0]
            text = example_text(bench, ex["token_ids"])
            view.attention = tool("attention_pattern").call(bench, AttentionArgs(prompt=text, component=base))
            shift = len(view.attention.tokens) - len(ex["tokens"])  # 0 when the window starts with BOS
            if shift >= 0 and view.attention.tokens[shift:] == ex["tokens"]:  # else it re-tokenized differently
                view.attention_query = ex["position"] + shift
        return view
    return run_tool(bench, "component page", go)


def graph_rows(graph: dict[str, Any]) -> list[GraphRow]:
    """Rows of the picture in residual-stream order (the order `circuits.draw` uses)."""
    keys = {}
    for n in graph.get("nodes", []):
        try:
            keys[n["id"]] = stream_order(parse_component(n["id"]))
        except TdbError:
            keys[n["id"]] = (-2, 0)
    order = sorted(set(keys.values()), reverse=True)  # logits first
    names = {0: "attn", 1: "mlp", 2: "resid"}

    def label(key):
        layer, sub = key
        return "logits" if layer == float("inf") else "embed" if layer == -1 else "?" if layer == -2 \
            else f"L{layer} {names[sub]}"
    return [GraphRow(id=i, row=order.index(k), label=label(k)) for i, k in keys.items()]


def circuit_view(bench: Workbench, name: str) -> CircuitView:
    from tdb_agent.circuits.io import to_json

    try:
        graph = circuit_store(bench).get(name)
    except TdbError as e:
        raise NotFound(str(e)) from e
    data = json.loads(json.dumps(to_json(graph), default=str))
    return CircuitView(name=name, graph=data, rows=graph_rows(data))


# ------------------------------------------------------------------ attribution graphs
GRAPH_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # the graph tools' GraphName


class GraphView(BaseModel):
    name: str
    path: str = Field(description="the file shown, relative to the workspace")
    graph: dict[str, Any] = Field(description="circuit-tracer / Neuronpedia graph JSON, as saved by the graph tools")


def _graph_file(bench: Workbench, name: str) -> Path | None:
    """The saved JSON of graph `name` (pruned if saved, else the full one), unless it is
    missing or links out of the workspace's graph exports."""
    root = bench.workspace / "exports" / "graphs"
    if not GRAPH_NAME.match(name) or name in (".", ".."):
        return None
    for f in (f"{name}.json", f"{name}-full.json"):
        path = root / name / f
        if path.is_file() and inside(path, root):
            return path
    return None


def graph_names(bench: Workbench) -> list[str]:
    """Graphs the viewer can show: saved under `exports/graphs/<name>/` (by this or an earlier
    server); built but not saved ones have no file to show."""
    root = bench.workspace / "exports" / "graphs"
    saved = [d.name for d in sorted(root.iterdir())] if root.is_dir() else []
    return [n for n in dict.fromkeys([*bench.graphs, *saved]) if _graph_file(bench, n) is not None]


def graph_view(bench: Workbench, name: str) -> GraphView:
    """A stored attribution graph by name, read from the file the graph tools wrote, never
    from a path the request gives."""
    path = _graph_file(bench, name)
    if path is None:
        raise NotFound(f"no saved attribution graph named {name!r}; graphs: {', '.join(graph_names(bench)) or 'none'}"
                       " (build one with attribution_graph)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise TdbError(f"graph {name!r}: {path.name} is not JSON ({e})") from e
    return GraphView(name=name, path=path.relative_to(bench.workspace).as_posix(), graph=data)


# ------------------------------------------------------------------ run folders
def is_run(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f).exists() for f in ("run.json", "graph.json", "transcript.jsonl"))


def inside(path: Path, folder: Path) -> bool:
    """Whether `path`, symlinks followed, is within `folder` (also after its links)."""
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):  # a link loop
        return False


def _run_file(run: Path, name: str) -> Path | None:
    """A file of a run folder, unless it is missing or a link out of the folder."""
    path = run / name
    if not path.is_file():
        return None
    if not inside(path, run):
        log.warning("run %s: %s links outside the run folder; not read", run.name, name)
        return None
    return path


class RunIndex:
    """The run folders a viewer shows: one run (`tdb-agent view RUN_DIR`) or every run in a
    folder of runs (`runs/`). Re-read on each request, so new runs appear; a run in a folder
    of runs that links outside it is not shown."""

    def __init__(self, *paths: str | Path):
        self.paths = [Path(p).resolve() for p in paths]

    def folders(self) -> dict[str, Path]:
        return {name: path for name, (path, _) in self._found().items()}

    def _found(self) -> dict[str, tuple[Path, str]]:
        """name -> (folder, how results show it: under the name of the folder given)."""
        out: dict[str, tuple[Path, str]] = {}
        for p in self.paths:
            if is_run(p):
                out[p.name] = (p, p.name)
            elif p.is_dir():
                for c in sorted(p.iterdir()):
                    if not is_run(c):
                        continue
                    if not inside(c, p):
                        log.warning("%s links outside %s; not shown", c.name, p)
                        continue
                    out[c.name] = (c, f"{p.name}/{c.name}")
        return out

    def get(self, name: str) -> tuple[Path, str]:
        found = self._found()
        if name not in found:
            raise NotFound(f"no run named {name!r}; runs: {', '.join(found) or 'none'}")
        return found[name]

    def summaries(self) -> list[RunSummary]:
        out = []
        for path, shown in self._found().values():
            cfg, graph, events = _read_run(path)
            g = (graph or {}).get("graph", {})
            out.append(RunSummary(run_dir=shown, task=cfg.get("task"), planner=cfg.get("planner"),
                                  circuit=g.get("name"), faithfulness=g.get("faithfulness"),
                                  nodes=[n["id"] for n in (graph or {}).get("nodes", []) if n["id"] != SINK],
                                  tool_calls=sum(e.get("kind") == "tool_call" for e in events)))
        return out

    def view(self, name: str) -> RunView:
        path, shown = self.get(name)
        cfg, graph, events = _read_run(path)
        graph = graph or {"directed": True, "graph": {}, "nodes": [], "links": []}
        report = _run_file(path, "report.md")
        report = report.read_text(encoding="utf-8") if report else None
        return RunView(name=name, path=shown, config=cfg, graph=graph, rows=graph_rows(graph), events=events,
                       report=report)


def _read_run(path: Path) -> tuple[dict, dict | None, list[dict]]:
    from tdb_agent.agent.runstore import RunStore

    config, graph_file, transcript = (_run_file(path, f) for f in ("run.json", "graph.json", "transcript.jsonl"))
    try:
        cfg = json.loads(config.read_text()) if config else {}
    except ValueError:
        cfg = {}
    try:
        graph = json.loads(graph_file.read_text()) if graph_file else None
    except ValueError:
        graph = None
    events = RunStore(path).events() if transcript else []  # the folder exists (is_run): nothing is written
    return cfg, graph, events
