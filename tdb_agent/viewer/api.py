"""The viewer's JSON API, without any web framework: the pages' data (model, component,
circuit, run folders). Its tool routes (`viewer.routes`) take no models of their own: they
validate bodies with the MCP tool's argument model and call the same `service` tool.

Run folders (`tdb-agent discover --out DIR`) are read as they are on disk: `run.json`,
`transcript.jsonl`, `graph.json`, `report.md`.
"""

from __future__ import annotations

import json
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
from tdb_agent.service.examples import TopExamplesResult, top_examples_of
from tdb_agent.service.model_tools import AttentionArgs
from tdb_agent.service.running import run_tool
from tdb_agent.service.tool import NoArgs
from tdb_agent.workbench import ComponentPage, Limits, Workbench, component_page


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
    circuits = [CircuitSummary(name=n, nodes=g.number_of_nodes(), edges=g.number_of_edges())
                for n, g in sorted((bench.circuits or {}).items())]
    return ModelPage(info=info, tasks=tool("list_tasks").run(bench, NoArgs()), runs=runs.summaries() if runs else [], circuits=circuits,
                     limits=bench.limits)


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

    graph = (bench.circuits or {}).get(name)
    if graph is None:
        raise NotFound(f"no circuit named {name!r}; circuits: {', '.join(sorted(bench.circuits)) or 'none yet'}")
    data = json.loads(json.dumps(to_json(graph), default=str))
    return CircuitView(name=name, graph=data, rows=graph_rows(data))


# ------------------------------------------------------------------ run folders
def is_run(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f).exists() for f in ("run.json", "graph.json", "transcript.jsonl"))


class RunIndex:
    """The run folders a viewer shows: one run (`tdb-agent view RUN_DIR`) or every run in a
    folder of runs (`runs/`). Re-read on each request, so new runs appear."""

    def __init__(self, *paths: str | Path):
        self.paths = [Path(p).resolve() for p in paths]

    def folders(self) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for p in self.paths:
            if is_run(p):
                out[p.name] = p
            elif p.is_dir():
                out.update({c.name: c for c in sorted(p.iterdir()) if is_run(c)})
        return out

    def get(self, name: str) -> Path:
        folders = self.folders()
        if name not in folders:
            raise NotFound(f"no run named {name!r}; runs: {', '.join(folders) or 'none'}")
        return folders[name]

    def summaries(self) -> list[RunSummary]:
        out = []
        for path in self.folders().values():
            cfg, graph, events = _read_run(path)
            g = (graph or {}).get("graph", {})
            out.append(RunSummary(run_dir=str(path), task=cfg.get("task"), planner=cfg.get("planner"),
                                  circuit=g.get("name"), faithfulness=g.get("faithfulness"),
                                  nodes=[n["id"] for n in (graph or {}).get("nodes", []) if n["id"] != SINK],
                                  tool_calls=sum(e.get("kind") == "tool_call" for e in events)))
        return out

    def view(self, name: str) -> RunView:
        path = self.get(name)
        cfg, graph, events = _read_run(path)
        graph = graph or {"directed": True, "graph": {}, "nodes": [], "links": []}
        report = (path / "report.md").read_text(encoding="utf-8") if (path / "report.md").exists() else None
        return RunView(name=name, path=str(path), config=cfg, graph=graph, rows=graph_rows(graph), events=events,
                       report=report)


def _read_run(path: Path) -> tuple[dict, dict | None, list[dict]]:
    from tdb_agent.agent.runstore import RunStore

    store = RunStore(path)  # the folder exists (is_run), so nothing is written
    cfg = json.loads((path / "run.json").read_text()) if (path / "run.json").exists() else {}
    try:
        graph = store.load_graph()
    except json.JSONDecodeError:
        graph = None
    return cfg, graph, store.events()
