"""The scripted planner asks the same questions in the same order in every process: `--resume`
replays a transcript call by call and stops at the first difference, so any order taken from
a set (string hashes differ between processes) would make it call and log the rest again."""

import json
import os
import subprocess
import sys

import pytest

from tdb_agent.agent.runstore import RunStore


def _calls(out) -> list[tuple[str, str]]:
    return [(e["tool"], json.dumps(e["arguments"], sort_keys=True)) for e in RunStore(out).events()
            if e["kind"] == "tool_call"]


@pytest.mark.slow
def test_the_call_sequence_does_not_depend_on_the_hash_seed(tiny_dirs, tmp_path):
    runs = {}
    for seed in ("1", "2"):
        out = tmp_path / f"run{seed}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, "-m", "tdb_agent.cli", "discover", "--planner", "scripted",
                               "--task", "ioi", "--model", str(tiny_dirs["gpt2"]), "--out", str(out)],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[seed] = _calls(out)
    a, b = runs["1"], runs["2"]
    # the run reaches the point where the order mattered: a circuit_add with several edges
    adds = [json.loads(args) for tool, args in a if tool == "circuit_add"]
    assert any(len(x.get("edges", [])) > 1 for x in adds)
    first_diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    assert first_diff is None, f"the runs part at call {first_diff} ({a[first_diff][0]}):\n{a[first_diff][1][:400]}\n" \
                               f"{b[first_diff][1][:400]}"
    assert len(a) == len(b)
