"""`tdb-agent discover`: one circuit-discovery run, start to report.

The agent reaches the tools only through an MCP client session: to a server in the same
process (default) or to `tdb-agent serve` started as a stdio subprocess (the same code path
as any MCP client). The run folder gets the transcript, the graph after every step, the
report and the picture (see `runstore`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Literal

from tdb_agent.agent import planner
from tdb_agent.agent.edge_step import EdgeFindings, report_lines
from tdb_agent.agent.graph_step import GraphFindings
from tdb_agent.agent.graph_step import report_lines as graph_report_lines
from tdb_agent.agent.llm import Budgets, LLMSettings, run_llm_loop
from tdb_agent.agent.runstore import RunConfig, RunStore
from tdb_agent.agent.summary import RunSummary
from tdb_agent.agent.toolbox import Toolbox, read_only, replays_on_resume

Transport = Literal["inprocess", "stdio"]


#: `--ablation`: the modes the scripted planner's circuit must reach the threshold under (first: primary)
ABLATION_MODES = {"mean": ("mean",), "resample": ("resample",), "both": ("mean", "resample")}


def circuit_name(cfg: RunConfig) -> str:
    return (cfg.task or "prompt").replace("_", "-")


async def _pairs(client, cfg: RunConfig) -> list[dict]:
    if cfg.task:
        r = await client.call_tool("list_tasks", {})
        for t in r.structured_content["tasks"]:
            if t["name"] == cfg.task:
                return t["examples"]
        raise ValueError(f"unknown task {cfg.task!r}")
    if not (cfg.prompt and cfg.target):
        raise ValueError("give --task, or --prompt with --target (and --distractor, --corrupted)")
    return [{"prompt": cfg.prompt, "corrupted_prompt": cfg.corrupted_prompt or cfg.prompt, "target": cfg.target,
             "distractor": cfg.distractor}]


Connect = Callable[[Path], AbstractAsyncContextManager[Any]]
"""Opens an MCP client session to the tools whose workspace is the given folder."""


def default_connect(cfg: RunConfig, transport: Transport, spec=None, engine=None) -> Connect:
    """Sessions as `tdb_agent.session` opens them (the composition root): the run's model,
    in-process or over stdio. Callers that hold an engine or a spec (the CLI, Ray actors)
    pass theirs."""
    from tdb_agent.session import EngineSpec, open_session

    spec = spec or EngineSpec(model=cfg.model)
    return lambda workspace: open_session(spec, transport, workspace=workspace, engine=engine)


async def run(cfg: RunConfig, out: Path, transport: Transport = "inprocess", llm: LLMSettings | None = None,
              echo=print, connect: Connect | None = None) -> RunSummary:
    """One discovery run into the folder `out` (resumed where it has a transcript). The
    tools are reached through `connect(out / "workspace")`; by default a session opened by
    `tdb_agent.session` on the run's model over `transport`."""
    connect = connect or default_connect(cfg, transport)
    store = RunStore(out)
    if not (out / "run.json").exists():
        cfg.started = time.time()
        store.save_config(cfg)
    name = circuit_name(cfg)
    t0 = time.time()
    async with connect(out / "workspace") as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}

        async def checkpoint(tool: str) -> None:
            # after every tool that may change a circuit (export is the checkpoint itself)
            if tool != "circuit_export" and not await read_only(client, tool, tools):
                r = await client.call_tool("circuit_export", {"name": name, "format": "json"})
                if not r.is_error:
                    store.save_graph(json.loads(r.structured_content["content"]))

        def echo_step(tool: str) -> None:
            echo(f"  [{time.time() - t0:6.1f}s] {tool}")

        async def on_step(tool: str) -> None:
            echo_step(tool)
            await checkpoint(tool)

        pairs = await _pairs(client, cfg)
        if cfg.planner == "scripted":
            tb = Toolbox(client, store, on_step=on_step)
            if tb.replayed or store.n_events():
                echo(f"resuming: {store.n_events()} events in the transcript")
            result = await planner.discover(tb, cfg.task, pairs, name, modes=ABLATION_MODES[cfg.ablation],
                                            graph=cfg.graph)
            stopped, calls, notes, heldout = "done", tb.calls, result.notes, result.faithfulness_heldout
            other, edges, features = result.faithfulness_other, result.edges, result.features
        else:
            tb = Toolbox(client, store)
            await _restore_circuits(client, store, tools)

            async def on_result(tool, args, result):
                await on_step(tool)
            ex = pairs[0]
            goal = (f"Find the circuit for this behaviour and store it as circuit '{name}'. Prompt: {ex['prompt']!r}; "
                    f"corrupted prompt: {ex['corrupted_prompt']!r}; target {ex['target']!r}; distractor "
                    f"{ex.get('distractor')!r}." + (f" Built-in task: {cfg.task} (circuit_create with task="
                                                     f"{cfg.task!r})." if cfg.task else ""))
            outcome = await run_llm_loop(client, store, goal, llm or LLMSettings.from_env(),
                                         Budgets(max_steps=cfg.max_steps), on_tool_result=on_result)
            stopped, calls, notes = outcome.stopped_because, outcome.steps, [outcome.final_message or ""]
            heldout, other, edges, features = None, {}, None, None
        summary = await _finish(client, store, name, notes, calls, time.time() - t0, stopped, edges, features)
        summary.faithfulness_heldout, summary.faithfulness_other = heldout, other
        summary.task, summary.planner = cfg.task, cfg.planner
    echo(f"run folder: {out}\ncircuit {summary.circuit}: {len(summary.nodes)} nodes {summary.nodes}, "
         f"faithfulness {summary.faithfulness}"
         + (f" (held-out pairs: {summary.faithfulness_heldout:.3f})" if summary.faithfulness_heldout is not None else "")
         + "".join(f"; under {m} ablation {f:.3f}" for m, f in summary.faithfulness_other.items()))
    return summary


async def _restore_circuits(client, store: RunStore, tools: dict) -> None:
    """After a restart, replay the circuit edits of the transcript (the calls of tools whose
    annotations mark them as non-idempotent edits) into the fresh server, for the circuits it
    does not have yet: those it reloaded from the run's workspace are already up to date
    (every edit is saved there), and replaying onto them would append evidence again."""
    r = await client.call_tool("circuit_list", {})
    have = set() if r.is_error else {c["name"] for c in r.structured_content["circuits"]}
    for e in store.events():
        if e["kind"] == "tool_call" and replays_on_resume(tools.get(e.get("tool"))) \
                and not e.get("is_error") and not e.get("error") and e["arguments"].get("name") not in have:
            await client.call_tool(e["tool"], e["arguments"])


async def _finish(client, store: RunStore, name: str, notes: list[str], calls: int, seconds: float,
                  stopped: str, edges: EdgeFindings | None = None,
                  features: GraphFindings | None = None) -> RunSummary:
    show = await client.call_tool("circuit_show", {"name": name})
    if show.is_error:
        store.write("report.md", f"# Discovery run\n\nNo circuit named {name!r} was created.\n\n"
                    + "\n".join(f"- {n}" for n in notes))
        return RunSummary(run_dir=str(store.dir), circuit=name, nodes=[], faithfulness=None, tool_calls=calls,
                          seconds=seconds, stopped_because=stopped)
    info = show.structured_content
    for fmt, file in (("svg", "graph.svg"), ("html", "graph.html"), ("json", None)):
        r = await client.call_tool("circuit_export", {"name": name, "format": fmt})
        if not r.is_error:
            if file:
                store.write(file, r.structured_content["content"])
            else:
                store.save_graph(json.loads(r.structured_content["content"]))
    store.write("report.md", report_markdown(info, notes, calls, seconds, stopped, edges, features))
    nodes = [n["id"] for n in info["nodes"] if n["id"] != "LOGITS"]
    return RunSummary(run_dir=str(store.dir), circuit=name, nodes=nodes, faithfulness=info.get("faithfulness"),
                      tool_calls=calls, seconds=seconds, stopped_because=stopped)


def report_markdown(info: dict, notes: list[str], calls: int, seconds: float, stopped: str,
                    edges: EdgeFindings | None = None, features: GraphFindings | None = None) -> str:
    v = info.get("validation") or {}
    lines = [f"# Circuit `{info['name']}`", ""]
    b = info.get("behaviour") or {}
    lines.append(f"**Behaviour**: {('task ' + b['task']) if b.get('task') else str(len(b.get('pairs', []))) + ' prompt pairs'}"
                 f" · metric {info.get('metric') or v.get('metric_name')}")
    if v:
        lines += ["", f"**Faithfulness {v.get('faithfulness', float('nan')):.3f}** ({v.get('mode')} ablation of every "
                  f"component outside the circuit, {v.get('positions')}; universe: {v.get('universe')}; "
                  f"{v.get('n_pairs')} pairs): metric full {v.get('metric_full', 0):.3f}, circuit "
                  f"{v.get('metric_circuit', 0):.3f}, all ablated {v.get('metric_empty', 0):.3f}."]
    lines += ["", "## Nodes", "", "| node | role | effect | necessity | explanation | evidence |",
              "|---|---|---|---|---|---|"]
    for n in info["nodes"]:
        if n["id"] == "LOGITS":
            continue
        ev = "; ".join(f"{e['tool']} {e.get('args', {})}: {e.get('value')}" for e in n.get("evidence", []))
        eff = f"{n['effect']:.3f}" if n.get("effect") is not None else ""
        nec = f"{n['necessity']:.3f}" if n.get("necessity") is not None else ""
        lines.append(f"| {n['id']} | {n.get('role') or ''} | {eff} | {nec} | {n.get('explanation') or ''} | {ev} |")
    lines += ["", "## Edges", "", "| source | target | via | weight | evidence |", "|---|---|---|---|---|"]
    for e in info["edges"]:
        ev = "; ".join(f"{x['tool']} {x.get('args', {})}: {x.get('value')}" for x in e.get("evidence", []))
        w = f"{e['weight']:.3f}" if e.get("weight") is not None else ""
        lines.append(f"| {e['source']} | {e['target']} | {e['via']} | {w} | {ev} |")
    lines += report_lines(edges)
    lines += graph_report_lines(features)
    lines += ["", "## What was tried", ""] + [f"- {n}" for n in notes if n]
    lines += ["", f"{calls} tool calls, {seconds:.1f} s, stopped: {stopped}. Transcript: `transcript.jsonl`; "
              "graph: `graph.json`, `graph.svg`, `graph.html`.", ""]
    return "\n".join(lines)
