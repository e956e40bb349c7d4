"""Run folders that survive torn writes (issue #18, item 6): a transcript whose last line was
cut by a kill (or a full disk) is read up to the tear, and a resumed run starts on a fresh
line, so every event before the tear and every resumed event is visible."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from tdb_agent.agent.runstore import RunStore


def _write_events(folder, n):
    store = RunStore(folder)
    for i in range(n):
        store.append("tool_call", tool="predict", args={"i": i}, result={"x": "y" * 50})
    return store


def _tear(path, keep_bytes_of_last=30):
    """Cut the last line in the middle, as a kill during the write would."""
    data = path.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(data[:start + keep_bytes_of_last])


def test_resume_after_a_torn_last_line_keeps_every_event(tmp_path):
    _write_events(tmp_path, 10)
    _tear(tmp_path / "transcript.jsonl")  # event 9 was in flight: lost

    resumed = RunStore(tmp_path)
    assert [e["args"]["i"] for e in resumed.events()] == list(range(9))
    assert resumed.bad_lines == [10] and resumed.n_events() == 9
    for i in range(9, 14):
        resumed.append("tool_call", tool="predict", args={"i": i}, result={})

    reader = RunStore(tmp_path)
    events = reader.events()
    assert [e["args"]["i"] for e in events] == list(range(14))  # before the tear, then the resumed ones
    assert [e["step"] for e in events] == list(range(14))
    assert reader.bad_lines == []
    for line in (tmp_path / "transcript.jsonl").read_text().split("\n")[:-1]:
        json.loads(line)  # every line is whole again


def test_a_bad_line_in_the_middle_is_skipped_not_the_end_of_the_transcript(tmp_path):
    _write_events(tmp_path, 6)
    path = tmp_path / "transcript.jsonl"
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2][:15]  # torn, e.g. by a full disk, then writing went on
    lines[3] = b"\xff\xfe not utf-8"
    path.write_bytes(b"\n".join(lines))
    store = RunStore(path.parent)
    assert [e["args"]["i"] for e in store.events()] == [0, 1, 4, 5]
    assert store.bad_lines == [3, 4]


def test_a_whole_last_line_without_its_newline_is_kept(tmp_path):
    _write_events(tmp_path, 3)
    path = tmp_path / "transcript.jsonl"
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    store = RunStore(tmp_path)
    store.append("note", text="resumed")
    assert [e["kind"] for e in RunStore(tmp_path).events()] == ["tool_call"] * 3 + ["note"]


def test_a_reader_never_cuts_a_line_being_written(tmp_path):
    _write_events(tmp_path, 2)
    path = tmp_path / "transcript.jsonl"
    with open(path, "ab") as f:
        f.write(b'{"step": 2, "kind": "no')  # a writer is in the middle of this line
    before = path.read_bytes()
    RunStore(tmp_path).events()  # the viewer reads the run
    assert path.read_bytes() == before


def test_kill_9_mid_run_then_resume(tmp_path):
    """A real writer process killed with SIGKILL after its lines are on disk, its last line then
    torn as a kill inside the write would leave it; the resumed writer continues after it."""
    child = textwrap.dedent(f"""
        import sys, time
        from tdb_agent.agent.runstore import RunStore
        s = RunStore({str(tmp_path)!r})
        for i in range(8):
            s.append("tool_call", tool="predict", args={{"i": i}}, result={{}})
        print("written", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True,
                            cwd=os.getcwd())
    assert proc.stdout.readline().strip() == "written"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    _tear(tmp_path / "transcript.jsonl", keep_bytes_of_last=12)
    resumed = RunStore(tmp_path)
    resumed.append("tool_call", tool="predict", args={"i": 7}, result={})
    assert [e["args"]["i"] for e in RunStore(tmp_path).events()] == list(range(8))


@pytest.mark.slow  # a whole discover run and a resumed one (about 40 s)
def test_a_discover_run_with_a_torn_last_line_resumes(tiny_dirs, tmp_path):
    """The run folder a kill inside a transcript write leaves: the events before the tear are
    all kept, in order, the resumed run's events follow them on whole lines, and the replayed
    calls are not logged twice: the resumed transcript asks exactly what the uninterrupted run
    asked, each call once (the call in flight at the tear is made, and logged, once more)."""
    import asyncio

    from tdb_agent.agent import discover
    from tdb_agent.agent.runstore import RunConfig
    from tests.test_discover import _discover_cmd, _interrupt, calls

    out = tmp_path / "run"
    cfg = RunConfig(task="ioi", planner="scripted", model=str(tiny_dirs["gpt2"]))
    asyncio.run(discover.run(cfg, out, echo=lambda m: None))
    uninterrupted = RunStore(out).events()
    n_kept = _interrupt(out)
    kept = RunStore(out).events()
    with open(out / "transcript.jsonl", "ab") as f:
        f.write(b'{"step": %d, "time": 1.0, "kind": "tool_call", "tool": "circuit_a' % n_kept)  # torn
    assert RunStore(out).events() == kept
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(_discover_cmd("--resume", str(out)), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    store = RunStore(out)
    after = store.events()
    assert store.bad_lines == []
    assert after[:n_kept] == kept and len(after) > n_kept
    assert [e["step"] for e in after] == list(range(len(after)))
    assert calls(after) == calls(uninterrupted)


@pytest.mark.slow  # a whole discover run, a killed one and its resumption (about 60 s)
def test_a_discover_run_killed_with_sigkill_resumes_with_each_call_logged_once(tiny_dirs, tmp_path):
    """A real `tdb-agent discover` process killed with SIGKILL midway (after its first
    circuit_add), its last transcript line then torn as a kill inside a write leaves it: the
    resumed run keeps every event before the tear, appends its own after them, and its
    transcript asks exactly what an uninterrupted run asks, each call once (the replayed
    calls are not logged again)."""
    import asyncio
    import time

    from tdb_agent.agent import discover
    from tdb_agent.agent.runstore import RunConfig
    from tests.test_discover import _discover_cmd, calls

    model = str(tiny_dirs["gpt2"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the processes below run (OMP_NUM_THREADS=1): the same rounding, the same choices
    try:
        asyncio.run(discover.run(RunConfig(task="ioi", planner="scripted", model=model), tmp_path / "ref",
                                 echo=lambda m: None))
    finally:
        torch.set_num_threads(threads)
    uninterrupted = RunStore(tmp_path / "ref").events()
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_discover_cmd("--task", "ioi", "--model", model, "--out", str(out)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if sum(t == "circuit_add" for t, _ in calls(RunStore(out).events())) >= 1:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    kept = RunStore(out).events()
    assert 0 < len(calls(kept)) < len(calls(uninterrupted))
    with open(out / "transcript.jsonl", "ab") as f:  # the line being written when the kill came
        f.write(b'{"step": %d, "time": 1.0, "kind": "tool_call", "tool": "circuit_a' % len(kept))
    assert RunStore(out).events() == kept
    done = subprocess.run(_discover_cmd("--resume", str(out)), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    store = RunStore(out)
    after = store.events()
    assert store.bad_lines == [] and after[:len(kept)] == kept and len(after) > len(kept)
    assert [e["step"] for e in after] == list(range(len(after)))
    assert calls(after) == calls(uninterrupted)
    for line in (out / "transcript.jsonl").read_text().split("\n")[:-1]:
        json.loads(line)
