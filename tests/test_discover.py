"""`tdb-agent discover` end to end: the scripted planner through MCP, the run folder, and
resuming a run killed midway."""

import asyncio
import json
import os
import subprocess
import sys

import pytest

from tdb_agent.agent import discover
from tdb_agent.agent.runstore import RunConfig, RunStore


def test_scripted_run_writes_a_complete_run_folder(tiny_dirs, tmp_path):
    out = tmp_path / "run"
    cfg = RunConfig(task="ioi", planner="scripted", model=str(tiny_dirs["gpt2"]), graph=True)
    summary = asyncio.run(discover.run(cfg, out, echo=lambda m: None))
    for name in ("run.json", "transcript.jsonl", "graph.json", "report.md", "graph.svg", "graph.html"):
        assert (out / name).exists(), name
    graph = json.loads((out / "graph.json").read_text())
    ids = {n["id"] for n in graph["nodes"]}
    assert "LOGITS" in ids and set(summary.nodes) <= ids
    assert graph["graph"]["validation"]["faithfulness"] == pytest.approx(summary.faithfulness)
    events = RunStore(out).events()
    tools = [e["tool"] for e in events if e["kind"] == "tool_call"]
    assert tools[:2] == ["predict", "attribute"] and "trace_upstream" in tools and "circuit_validate" in tools
    assert all("seconds" in e for e in events if e["kind"] == "tool_call")
    report = (out / "report.md").read_text()
    assert "Faithfulness" in report and "## Nodes" in report and "What was tried" in report
    assert "graph step skipped" in report  # --graph without transcoders or residual SAEs: said, not failed


def _discover_cmd(*args):
    return [sys.executable, "-m", "tdb_agent.cli", "discover", *args]


def calls(events) -> list[tuple[str, str]]:
    """The tool calls of a transcript as (tool, arguments): what was asked, in order."""
    return [(e["tool"], json.dumps(e["arguments"], sort_keys=True)) for e in events if e["kind"] == "tool_call"]


def _interrupt(out, keep_after: str = "circuit_add") -> int:
    """Turn a finished run folder into one killed midway, deterministically: the transcript is cut
    at a line boundary in the middle of its successful `keep_after` calls, and the final outputs
    are removed. Returns the number of events kept. (A kill inside a line's write leaves a torn
    last line as well: tests/test_runstore.py adds one to this state.)"""
    lines = (out / "transcript.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    events = [json.loads(line) for line in lines]
    adds = [i for i, e in enumerate(events) if e["kind"] == "tool_call" and e["tool"] == keep_after
            and not e.get("is_error") and not e.get("error")]
    assert adds, f"the run made no {keep_after} call to cut after"
    cut = adds[len(adds) // 2] + 1
    assert cut < len(events), "the cut must leave work for the resumed run"
    (out / "transcript.jsonl").write_text("".join(lines[:cut]), encoding="utf-8")
    for name in ("report.md", "graph.svg", "graph.html"):
        (out / name).unlink(missing_ok=True)
    return cut


def test_a_killed_run_resumes(tiny_dirs, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cfg = RunConfig(task="ioi", planner="scripted", model=str(tiny_dirs["gpt2"]))
    asyncio.run(discover.run(cfg, out, echo=lambda m: None))
    uninterrupted = RunStore(out).events()
    # the state a kill midway leaves, built explicitly (not by racing a kill against the run)
    n_events = _interrupt(out)
    kept = RunStore(out).events()
    assert len(kept) == n_events
    before_nodes = set()
    for e in kept:  # what had been checkpointed into the circuit before the "kill"
        if e["kind"] == "tool_call" and not e.get("is_error"):
            if e["tool"] == "circuit_add":
                before_nodes |= {n if isinstance(n, str) else n["id"] for n in e["arguments"].get("nodes", [])}
            elif e["tool"] == "circuit_remove":
                before_nodes -= set(e["arguments"].get("nodes", []))
    assert before_nodes
    assert not (out / "report.md").exists()

    done = subprocess.run(_discover_cmd("--resume", str(out)), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    after = json.loads((out / "graph.json").read_text())
    assert (out / "report.md").exists() and (out / "graph.svg").exists()
    # everything checkpointed before the kill is in the final graph (pruning aside, which is recorded)
    after_nodes = {n["id"] for n in after["nodes"]}
    pruned = set()
    for e in RunStore(out).events():
        if e["kind"] == "tool_call" and e["tool"] == "circuit_prune":
            pruned |= {step["removed"] for step in e["result"]["removed"]}
    assert before_nodes - pruned <= after_nodes
    resumed = RunStore(out).events()
    assert resumed[:n_events] == kept and len(resumed) > n_events
    # every call is logged once: the replayed ones are not appended again, so the resumed run's
    # transcript asks exactly what the uninterrupted run asked (the planner is deterministic)
    assert calls(resumed) == calls(uninterrupted)
    assert summary["circuit"] == "ioi"


def test_resuming_an_llm_run_does_not_replay_edits_onto_reloaded_circuits(tiny_dirs, tmp_path):
    """A resumed LLM-planner run must not re-apply the transcript's circuit edits on top of the
    circuits the server reloads from the run's workspace. (Repeated evidence is deduplicated
    now, so the evidence alone would not show a replay: the circuit file must not have been
    written at all, and the transcript must hold each call once.)"""
    from tdb_agent.agent.llm import LLMSettings
    from tests.fake_openai import FakeOpenAI, text_response, tool_call_response

    evidence = [{"tool": "attribute", "args": {"prompt": "p"}, "value": 1.5},
                {"tool": "ablate", "args": {"prompt": "p"}, "value": 0.7}]
    script = [
        tool_call_response([("circuit_create", json.dumps({"name": "ioi", "task": "ioi", "n_pairs": 2}))]),
        tool_call_response([("circuit_add", json.dumps({"name": "ioi", "nodes": [
            {"id": "L1.H2", "role": "mover", "evidence": evidence}],
            "edges": [{"source": "L1.H2", "target": "LOGITS"}]}))]),
        text_response("Circuit: L1.H2 -> LOGITS."),
    ]
    out = tmp_path / "run"
    cfg = RunConfig(task="ioi", planner="llm", model=str(tiny_dirs["gpt2"]), max_steps=10)

    def node_evidence():
        graph = json.loads((out / "graph.json").read_text())
        return [n.get("evidence", []) for n in graph["nodes"] if n["id"] == "L1.H2"][0]

    with FakeOpenAI(script) as fake:
        asyncio.run(discover.run(cfg, out, llm=LLMSettings(base_url=fake.url, model="m", api_key="x"),
                                 echo=lambda m: None))
    before = node_evidence()
    assert len(before) == len(evidence)
    saved = out / "workspace" / "circuits" / "ioi.json"
    written, events = (saved.stat().st_ino, saved.stat().st_mtime_ns, saved.read_bytes()), RunStore(out).events()

    with FakeOpenAI([text_response("Still L1.H2 -> LOGITS.")]) as fake:
        summary = asyncio.run(discover.run(cfg, out, llm=LLMSettings(base_url=fake.url, model="m", api_key="x"),
                                           echo=lambda m: None))
    assert summary.nodes == ["L1.H2"]
    assert node_evidence() == before
    # no replayed edit reached the reloaded circuit: every edit rewrites the file (a new inode)
    assert (saved.stat().st_ino, saved.stat().st_mtime_ns, saved.read_bytes()) == written
    resumed = RunStore(out).events()
    assert resumed[:len(events)] == events and calls(resumed) == calls(events)


@pytest.mark.parametrize("task", ["ioi", pytest.param("induction", marks=pytest.mark.slow)])
def test_scripted_discovery_on_the_bundled_model(task, bundled, tmp_path):
    """The issue's acceptance: faithfulness >= 0.8 with at most 15 nodes, offline."""
    cfg = RunConfig(task=task, planner="scripted")
    summary = asyncio.run(discover.run(cfg, tmp_path / task, echo=lambda m: None))
    assert summary.faithfulness >= 0.8, summary
    assert 1 <= len(summary.nodes) <= 15, summary.nodes
    # the claim is also checked on pairs pruning never saw, and reported as it is
    assert summary.faithfulness_heldout is not None
    assert "held-out pairs" in (tmp_path / task / "report.md").read_text()


def test_llm_planner_run_folder_shows_every_step(tiny_dirs, tmp_path):
    """`discover --planner llm` end to end: real openai client -> local fake server; the
    scripted model creates a circuit, makes a malformed call, adds nodes, validates, answers."""
    from tdb_agent.agent.llm import LLMSettings
    from tests.fake_openai import FakeOpenAI, text_response, tool_call_response

    P = "When Mary and John went to the store , John gave a drink to"
    script = [
        tool_call_response([("circuit_create", json.dumps({"name": "ioi", "task": "ioi", "n_pairs": 2}))]),
        tool_call_response([("attribute", '{"prompt": "oops"'),  # malformed JSON
                            ("attribute", json.dumps({"prompt": P, "target": "Mary", "distractor": "John"}))]),
        tool_call_response([("circuit_add", json.dumps({"name": "ioi", "nodes": [{"id": "L1.H2", "role": "mover"}],
                                                        "edges": [{"source": "L1.H2", "target": "LOGITS"}]}))]),
        tool_call_response([("circuit_validate", json.dumps({"name": "ioi"}))]),
        text_response("Circuit: L1.H2 -> LOGITS."),
    ]
    out = tmp_path / "run"
    with FakeOpenAI(script) as fake:
        cfg = RunConfig(task="ioi", planner="llm", model=str(tiny_dirs["gpt2"]), max_steps=10)
        summary = asyncio.run(discover.run(cfg, out, llm=LLMSettings(base_url=fake.url, model="m", api_key="x"),
                                           echo=lambda m: None))
    assert summary.stopped_because == "answered" and summary.nodes == ["L1.H2"]
    events = RunStore(out).events()
    calls = [e for e in events if e["kind"] == "tool_call"]
    assert [c["tool"] for c in calls] == ["circuit_create", "attribute", "attribute", "circuit_add",
                                          "circuit_validate"]
    assert "not a valid JSON object" in calls[1]["error"]
    assert sum(e["kind"] == "message" for e in events) == 2 + 5
    graph = json.loads((out / "graph.json").read_text())
    assert {n["id"] for n in graph["nodes"]} == {"L1.H2", "LOGITS"}
    assert (out / "report.md").exists() and "L1.H2" in (out / "report.md").read_text()


def test_discover_over_stdio_transport(tiny_dirs, tmp_path):
    """The agent reaches the tools through a `tdb-agent serve` subprocess, like any MCP client."""
    out = tmp_path / "run"
    cfg = RunConfig(task="induction", planner="scripted", model=str(tiny_dirs["gpt2"]))
    summary = asyncio.run(discover.run(cfg, out, transport="stdio", echo=lambda m: None))
    assert (out / "report.md").exists() and (out / "workspace" / "circuits").is_dir()
    assert summary.faithfulness is not None
