"""Issue #18 for the circuit layer: nothing a caller sends can poison a saved circuit (NaN and
infinity refused before anything is committed; old files holding them still load), circuits
and pruning have cost bounds, and several processes can share one workspace."""

import asyncio
import json
import logging
import subprocess
import sys
import textwrap
import threading

import pytest
from mcp.server.mcpserver.exceptions import ToolError

from tdb_agent import circuits as C
from tdb_agent.circuits.prune import prunable, prune_rows
from tdb_agent.circuits.store import CircuitStore
from tdb_agent.errors import TdbError
from tdb_agent.server import build_server
from tdb_agent.service.limits import LimitExceeded
from tdb_agent.workbench import Limits, Workbench

INF, NAN = float("inf"), float("nan")


def strict(text: str):
    """Parse standard JSON only (NaN/Infinity are not JSON)."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def _store(tmp_path, **limits):
    store = CircuitStore({}, tmp_path, Limits(**limits))
    g = C.new_circuit("c")
    C.add_node(g, "L0.H1", effect=0.5, evidence=[{"tool": "attribute", "value": 0.5}])
    store.put("c", g)
    return store


# ------------------------------------------------------------------ 1. non-finite numbers
@pytest.mark.parametrize("bad", [INF, -INF, NAN])
def test_model_refuses_non_finite_numbers_and_changes_nothing(bad):
    g = C.new_circuit("c")
    C.add_node(g, "L0.H1", effect=0.5)
    before = json.dumps(C.to_json(g), sort_keys=True)
    with pytest.raises(TdbError, match="L0.H1: effect is NaN or infinite"):
        C.add_node(g, "L0.H1", effect=bad)
    with pytest.raises(TdbError, match="NaN or infinite"):
        C.add_node(g, "L1.H0", evidence=[{"tool": "attribute", "value": {"x": [1.0, bad]}}])
    with pytest.raises(TdbError, match="weight is NaN or infinite"):
        C.add_edge(g, "L0.H1", "LOGITS", weight=bad)
    with pytest.raises(TdbError, match="args.k is NaN or infinite"):
        C.add_edge(g, "L0.H1", "L1.H0", evidence=[{"tool": "trace", "args": {"k": bad}}])
    assert json.dumps(C.to_json(g), sort_keys=True) == before


def test_store_commits_nothing_when_the_edit_holds_a_non_finite_number(tmp_path):
    store = _store(tmp_path)
    path = store.path("c")
    before_file, before_mem = path.read_bytes(), json.dumps(C.to_json(store.get("c")), sort_keys=True)
    with pytest.raises(TdbError, match="nothing was saved"):
        with store.edit("c") as g:
            C.add_node(g, "L1.H0", effect=2.0)
            g.nodes["L0.H1"]["effect"] = INF  # a writer that bypassed the checked helpers
    assert path.read_bytes() == before_file
    assert json.dumps(C.to_json(store.get("c")), sort_keys=True) == before_mem
    poisoned = C.new_circuit("p")
    poisoned.graph["faithfulness"] = NAN
    with pytest.raises(TdbError, match="faithfulness"):
        C.save(poisoned, tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists() and not list(tmp_path.glob("*.tmp"))


def test_a_saved_circuit_with_infinity_loads_and_stays_editable(tmp_path, caplog):
    """A file written before the fix (`"effect": Infinity`): the bad values are dropped to
    null with a warning, and show / add / remove work and write standard JSON again."""
    folder = tmp_path / "circuits"
    folder.mkdir()
    g = C.new_circuit("old")
    C.add_node(g, "L0.H1", effect=1.0)
    C.add_edge(g, "L0.H1", "LOGITS", weight=1.0)
    data = C.to_json(g)
    next(n for n in data["nodes"] if n["id"] == "L0.H1")["effect"] = INF
    data["links"][0]["weight"] = NAN
    (folder / "old.json").write_text(json.dumps(data))  # Python writes Infinity / NaN
    store = CircuitStore({}, tmp_path)
    with caplog.at_level(logging.WARNING):
        assert store.load_saved() == ["old"]
    assert "old.json" in caplog.text and "set to null" in caplog.text
    info = C.info(store.get("old"))
    assert info.nodes[1].effect is None and info.edges[0].weight is None
    with store.edit("old") as h:
        C.add_node(h, "L1.H0", effect=0.25)
    with store.edit("old") as h:
        C.remove_edge(h, "L0.H1", "LOGITS")
    saved = strict(store.path("old").read_text())
    assert {n["id"] for n in saved["nodes"]} == {"LOGITS", "L0.H1", "L1.H0"}


def test_circuit_add_with_infinity_through_the_server_changes_nothing(gpt2_tiny, tmp_path):
    """The arguments as the server has them after parsing a request body (`1e999` parses as
    inf): dispatched by the MCP server itself, below any client that would turn inf into null.
    (Over raw HTTP: tests/test_reliability_http.py.)"""
    bench = Workbench(gpt2_tiny, workspace=tmp_path)
    server = build_server(bench)
    path = tmp_path / "circuits" / "c.json"

    async def go():
        await server.call_tool("circuit_create", {"name": "c", "task": "ioi", "n_pairs": 2})
        await server.call_tool("circuit_add", {"name": "c", "nodes": [{"id": "L0.H1", "effect": 1.0}]})
        file_before = path.read_bytes()
        for nodes, edges in (([{"id": "L1.H0", "effect": INF}], []),
                             ([{"id": "L1.H0", "evidence": [{"tool": "t", "value": NAN}]}], []),
                             ([], [{"source": "L0.H1", "target": "LOGITS", "weight": -INF}])):
            with pytest.raises(ToolError):
                await server.call_tool("circuit_add", {"name": "c", "nodes": nodes, "edges": edges})
            assert path.read_bytes() == file_before
        shown = await server.call_tool("circuit_show", {"name": "c"})
        assert [n["id"] for n in shown.structured_content["nodes"]] == ["LOGITS", "L0.H1"]
        await server.call_tool("circuit_add", {"name": "c", "nodes": [{"id": "L1.H0", "effect": 2.0}]})
        strict(path.read_text())
    asyncio.run(go())


# ------------------------------------------------------------------ 3. cost bounds
def test_circuit_size_limits_name_the_limit_and_change_nothing(tmp_path):
    store = _store(tmp_path, max_circuit_nodes=3, max_circuit_edges=2)
    before = store.path("c").read_bytes()
    with pytest.raises(LimitExceeded, match=r"4 nodes, over the limit max_circuit_nodes=3 .*--max-circuit-nodes"):
        with store.edit("c") as g:
            for n in ("L0.H2", "L1.H0", "L1.H1"):
                C.add_node(g, n)
    with pytest.raises(LimitExceeded, match=r"3 edges, over the limit max_circuit_edges=2"):
        with store.edit("c") as g:
            for s, t in (("L0.H1", "LOGITS"), ("L0.H1", "L1.H0"), ("L1.H0", "LOGITS")):
                C.add_edge(g, s, t)
    assert store.path("c").read_bytes() == before
    with store.edit("c") as g:  # within the limits
        C.add_edge(g, "L0.H1", "L1.H0")
        C.add_edge(g, "L1.H0", "LOGITS")
    assert store.get("c").number_of_edges() == 2


def test_evidence_is_deduplicated_and_capped_so_the_file_stops_growing(tmp_path):
    store = _store(tmp_path, max_evidence=4)
    ev = [{"tool": "attribute", "args": {"prompt": "p"}, "value": 0.5}]
    sizes = []
    for _ in range(5):  # the same call, repeated (an agent retrying, a replayed transcript)
        with store.edit("c") as g:
            C.add_node(g, "L0.H1", evidence=ev)
            C.add_edge(g, "L0.H1", "LOGITS", evidence=ev)
        sizes.append(store.path("c").stat().st_size)
    assert len(set(sizes)) == 1
    assert len(C.get_node(store.get("c"), "L0.H1").evidence) == 2  # the one from _store, and this one
    assert len(C.get_edge(store.get("c"), "L0.H1", "LOGITS").evidence) == 1
    for i in range(10):  # distinct measurements: the newest max_evidence are kept
        with store.edit("c") as g:
            C.add_node(g, "L0.H1", evidence=[{"tool": "ablate", "value": i}])
            C.add_edge(g, "L0.H1", "LOGITS", evidence=[{"tool": "ablate", "value": i}])
    g = store.get("c")
    assert [e.value for e in C.get_node(g, "L0.H1").evidence] == [6, 7, 8, 9]
    assert [e.value for e in C.get_edge(g, "L0.H1", "LOGITS").evidence] == [6, 7, 8, 9]
    on_disk = strict(store.path("c").read_text())
    assert len(next(n for n in on_disk["nodes"] if n["id"] == "L0.H1")["evidence"]) == 4


def test_an_oversized_evidence_item_is_refused():
    g = C.new_circuit("c")
    with pytest.raises(TdbError, match="evidence\\[0\\] is .* characters as JSON; at most"):
        C.add_node(g, "L0.H1", evidence=[{"tool": "attribute", "value": [0.5] * 5000}])
    assert C.components(g) == []


def _ioi_circuit(n_pairs=4):
    g = C.new_circuit("ioi", behaviour=C.Behaviour(task="ioi", n=n_pairs), metric="logit_diff")
    for n in ("L0.H0", "L0.H1", "L1.H0", "L1.H2", "L1.MLP"):
        C.add_node(g, n)
    return g


def test_pruning_refuses_work_over_the_limit_before_any_forward_pass(gpt2_tiny):
    g = _ioi_circuit(n_pairs=4)
    calls = []
    forward = gpt2_tiny.forward
    gpt2_tiny.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    try:
        # 5 prunable nodes x 4 pairs x 2 modes: 2 * 4 * (3 + 5 * 6 / 2) = 144 rows
        with pytest.raises(LimitExceeded, match=r"up to 144 prompt rows .* max_prune_rows=143 .*--max-prune-rows"):
            C.prune(gpt2_tiny, g, threshold=0.5, modes=["mean", "resample"], max_rows=143)
        with pytest.raises(LimitExceeded, match="up to 36 prompt rows"):  # protected nodes are not tried: 4 * (3 + 6)
            C.prune(gpt2_tiny, g, threshold=0.5, protect=["L0.H0", "L1.MLP"], max_rows=10)
    finally:
        del gpt2_tiny.forward
    assert calls == []


def test_pruning_stays_within_its_estimate_and_reports_progress_against_it(gpt2_tiny):
    g = _ioi_circuit(n_pairs=3)
    worst = prune_rows(len(prunable(g)), 3)
    seen = []
    r = C.prune(gpt2_tiny, g, threshold=0.01, batch_size=1, max_rows=worst,
                progress=lambda done, total: seen.append((done, total)))
    plain = C.prune(gpt2_tiny, g, threshold=0.01, batch_size=1)
    assert (r.kept, r.faithfulness) == (plain.kept, plain.faithfulness)  # bounding changes no result
    assert r.forward_passes <= worst  # batch_size 1: one pass per prompt row
    assert seen and all(t == worst for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and seen[-1][0] <= worst


# ------------------------------------------------------------------ 5. several processes, one workspace
WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from tdb_agent import circuits as C
    from tdb_agent.circuits.store import CircuitStore
    from tdb_agent.errors import TdbError
    ws, who, n = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    store = CircuitStore({}, ws)
    store.load_saved()
    print("ready", flush=True)
    sys.stdin.readline()  # start together
    created = []
    for i in range(n):
        with store.edit("shared") as g:
            C.add_node(g, f"L{who}.N{i}", evidence=[{"tool": "writer", "value": who}])
        try:
            store.put(f"race{i}", C.new_circuit(f"race{i}", description=str(who)), overwrite=False)
            created.append(i)
        except TdbError as e:
            assert "exists" in str(e), e
    print(" ".join(map(str, created)), flush=True)
""")


def test_two_processes_on_one_workspace_lose_no_write(tmp_path):
    CircuitStore({}, tmp_path).put("shared", C.new_circuit("shared"))
    n = 30
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(who), str(n)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for who in (0, 1)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    seen_sizes, stop = [], threading.Event()

    def read_while_they_write():
        path = tmp_path / "circuits" / "shared.json"
        while not stop.is_set():
            text = path.read_text()
            seen_sizes.append(len(text))
            strict(text)  # never empty, never half written

    reader = threading.Thread(target=read_while_they_write)
    reader.start()
    try:
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        stop.set()
        reader.join()
    assert [p.returncode for p in procs] == [0, 0], outs
    final = C.load(tmp_path / "circuits" / "shared.json")
    assert set(C.components(final)) == {f"L{w}.N{i}" for w in (0, 1) for i in range(n)}  # every acknowledged add
    created = [set(map(int, out.split())) for out in outs]
    assert created[0].isdisjoint(created[1]) and created[0] | created[1] == set(range(n))  # each name made once
    for i in range(n):
        owner = C.load(tmp_path / "circuits" / f"race{i}.json").graph["description"]
        assert i in created[int(owner)]
    assert seen_sizes and min(seen_sizes) > 0
    assert not list((tmp_path / "circuits").glob("*.tmp"))  # no temporary file left behind
