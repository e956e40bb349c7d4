"""A small, real run folder for the viewer tests: the same files `tdb-agent discover` writes
(RunStore + circuits), built from a few real operations on the bundled model in a few
seconds instead of a whole discovery run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from tdb_agent import ops
from tdb_agent.agent.runstore import RunConfig, RunStore
from tdb_agent.circuits import Behaviour, Evidence, add_edge, add_node, new_circuit, to_json, validate
from tdb_agent.engine import Engine
from tdb_agent.tasks import task_examples


@contextmanager
def viewer_process(target: Path, log_path: Path, path: str = "/", env: dict | None = None):
    """`tdb-agent view TARGET` on a free loopback port, until it says it serves `path`;
    yields its base URL, and stops it afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(log_path, "w+")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("TDB_TEST_THREADS", "2"), **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "tdb_agent.cli", "view", str(target), "--port", str(port),
                             "--no-browser"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}{path}"  # what it tells the user to open, once listening
        deadline = time.time() + 90
        while True:
            log.seek(0)
            text = log.read()
            if url in text:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"tdb-agent view exited ({proc.returncode}): {text[-2000:]}")
            if time.time() > deadline:
                raise TimeoutError(f"tdb-agent view did not start within 90 s: {text[-2000:]}")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)
        log.close()


def stop_process(proc: subprocess.Popen) -> None:
    """Terminate a server under test; kill it if it has not exited within 15 s."""
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


def ioi_example():
    return task_examples("ioi", 1, seed=7)[0]


def make_run(engine: Engine, folder: Path) -> Path:
    """Predict, attribute (heads), trace the top head's query, build and validate the circuit."""
    ex = ioi_example()
    store = RunStore(folder)
    store.save_config(RunConfig(task="ioi", planner="scripted", started=time.time()))

    def call(tool: str, args: dict, fn):
        t = time.time()
        result = fn()
        store.append("tool_call", tool=tool, arguments=args, is_error=False, seconds=round(time.time() - t, 4),
                     result=result.model_dump(mode="json"))
        return result

    base = {"prompt": ex.prompt, "target": ex.target, "distractor": ex.distractor}
    store.append("message", message={"role": "user", "content": f"Find the circuit behind {ex.prompt!r}"})
    store.append("message", message={"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "predict", "arguments": "{}"}}]})
    call("predict", {**base, "top_k": 5}, lambda: ops.predict(engine, **base, top_k=5))
    attr = call("attribute", {**base, "kinds": ["head"], "top_k": 3},
                lambda: ops.attribute(engine, ex.prompt, ex.target, ex.distractor, kinds=["head"], top_k=3))
    head = attr.rows[0]
    trace = call("trace_upstream", {"prompt": ex.prompt, "component": head.id, "via": "q", "top_k": 2},
                 lambda: ops.trace_upstream(engine, ex.prompt, head.id, via="q", top_k=2))

    g = new_circuit("ioi", behaviour=Behaviour(task="ioi", n=4), metric="logit_diff", model=engine.name,
                    description="viewer test run")
    add_node(g, head.id, role="name mover", effect=head.effect,
             evidence=[Evidence(tool="attribute", args={"method": "direct_effect"}, value=head.effect)])
    add_edge(g, head.id, "LOGITS", weight=head.effect,
             evidence=[Evidence(tool="attribute", args={"method": "direct_effect"}, value=head.effect)])
    for e in trace.edges:
        src = e.source.split("@")[0]
        if src == "EMB" or src in g:
            continue
        add_node(g, src, role="upstream", evidence=[Evidence(tool="trace_upstream", args={"via": "q"}, value=e.weight)])
        add_edge(g, src, head.id, weight=e.weight, via="q",
                 evidence=[Evidence(tool="trace_upstream", args={"component": trace.node, "via": "q"}, value=e.weight)])
    v = validate(engine, g, mode="mean")
    store.append("tool_call", tool="circuit_validate", arguments={"name": "ioi"}, is_error=False, seconds=0.0,
                 result=v.model_dump(mode="json"))
    store.append("note", text=f"validated: faithfulness {v.faithfulness:.3f}")
    store.save_graph(to_json(g))
    store.write("report.md", f"# ioi\n\nfaithfulness {v.faithfulness:.3f}\n")
    return folder
