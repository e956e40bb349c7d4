"""Scale-out: dataset builds sharded over Ray workers equal the single-process build bit for
bit (also after a killed worker and a resumed driver), whatever the chunking; discovery
runs in parallel over engine actors. One local Ray cluster (2 CPUs) for the module."""

import os

import numpy as np
import pytest
import torch

from tdb_agent.datasets import BuildConfig, build, documents_from_corpus
from tdb_agent.datasets.store import DATA
from tdb_agent.scaleout import EngineSpec
from tests.test_sae import random_sae

CFG = dict(top_k=5, n_random=3, n_quantile_bins=3, per_bin=2, window=8, lead=5, batch_size=6, warmup_docs=12,
           sort_buffer=2, checkpoint_every=2)


@pytest.fixture(scope="module")
def setup(tiny_dirs, tmp_path_factory):
    """The tiny GPT-2 with an SAE saved as a folder (so workers can load the same engine)."""
    root = tmp_path_factory.mktemp("scaleout")
    sae_dir = root / "sae"
    random_sae(32, 24, "blocks.1.hook_resid_post", seed=5).save(sae_dir)
    spec = EngineSpec(model=str(tiny_dirs["gpt2"]), device="cpu", saes=[str(sae_dir)], bundled_saes=False, threads=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the same kernels, the same bits
    engine = spec.load()
    docs = list(documents_from_corpus(80, 91, engine.tokenizer, engine.spec.n_ctx))
    yield engine, spec, docs, root
    torch.set_num_threads(threads)


def _arrays(folder):
    from safetensors.numpy import load_file
    return load_file(str(folder / DATA))


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def single(setup):
    engine, _, docs, root = setup
    build(engine, iter(docs), root / "single", BuildConfig(**CFG), progress=False)
    return _arrays(root / "single")


def test_chunking_does_not_change_the_dataset(setup, single):
    """Chunks of 1, 3 or all batches: the same bits (ties by document, keyed randomness, tree sums)."""
    engine, _, docs, root = setup
    for every in (1, 3, 1000):
        out = root / f"every{every}"
        build(engine, iter(docs), out, BuildConfig(**(CFG | {"checkpoint_every": every})), progress=False)
        b = _arrays(out)
        for k in single:  # the config differs only in chunking
            assert np.array_equal(single[k], b[k]), (every, k)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow  # 25-85 s: two discover runs on a local Ray cluster
def test_discover_batch_on_ray_equals_sequential(ray_cluster, setup, tmp_path):
    """Runs on two engine actors: the same circuits as one after another here, one run
    folder each, a summary table, and a failed run is a row (the others go on).
    (Before the dataset tests: their module-wide workers hold both CPUs of the cluster.)"""
    import json

    from tdb_agent.agent.batch import BatchItem, plan_runs, run_batch
    from tdb_agent.agent.runstore import RunConfig
    _, spec, _, _ = setup
    spec = spec.model_copy(update={"saes": [], "bundled_saes": False})
    items = [BatchItem(task="ioi"), BatchItem(task="induction"), BatchItem(task="no_such_task"),
             BatchItem(name="mine", prompt="When Mary and John went to the store , John gave a drink to",
                       target="Mary", distractor="John",
                       corrupted_prompt="When Mary and John went to the store , Anna gave a drink to")]
    template = RunConfig(model=spec.model)
    results = {}
    for mode in ("local", "ray"):
        root = tmp_path / mode
        s = run_batch(plan_runs(items, template, root), spec, root, ray_address="local" if mode == "ray" else None,
                      workers=2, echo=lambda m: None)
        assert [r.name for r in s.runs] == ["ioi", "induction", "no_such_task", "mine"]
        assert [r.ok for r in s.runs] == [True, True, False, True] and "no_such_task" in s.runs[2].error
        assert (root / "summary.md").read_text().count("\n| [") == 4
        results[mode] = {r.name: (r.faithfulness, json.loads((root / r.name / "graph.json").read_text())["nodes"])
                         for r in s.runs if r.ok}
        if mode == "ray":
            assert s.workers == 2 and len({r.worker for r in s.runs}) == 2
    assert results["ray"] == results["local"]


@pytest.mark.slow
def test_graph_batch_on_ray_equals_sequential(ray_cluster, setup, tmp_path):
    """`tdb-agent graphs --batch FILE --ray --workers 2`: one valid graph JSON per prompt,
    the same graphs as built one after another here, a summary, and a bad item is a row.
    (Before the dataset tests: their module-wide workers hold both CPUs of the cluster.)"""
    import json

    from tdb_agent.cli import main
    from tdb_agent.ops.graph.export import validate
    _, spec, _, _ = setup  # the tiny GPT-2 with a residual SAE: graphs over its latents
    batch = tmp_path / "graphs.jsonl"
    batch.write_text("\n".join(json.dumps(x) for x in [
        {"prompt": "When Mary and John went to the store , John gave a drink to", "target": "Mary",
         "distractor": "John", "name": "ioi"},
        {"prompt": "the cat sat on the mat and the dog", "name": "top"},
        {"prompt": "the cat sat on the mat", "target": "cat", "distractor": "cat", "name": "bad"}]) + "\n")
    common = ["graphs", "--batch", str(batch), "--model", spec.model, "--device", "cpu", "--sae", spec.saes[0],
              "--no-bundled-saes", "--no-bundled-transcoders", "--max-feature-nodes", "12", "--batch-size", "5"]
    graphs = {}
    for mode in ("local", "ray"):
        out = tmp_path / mode
        rc = main(common + ["--out", str(out)] + (["--ray", "--workers", "2"] if mode == "ray" else []))
        assert rc == 1  # the bad item failed, the others did not
        s = json.loads((out / "summary.json").read_text())
        assert [(r["name"], r["ok"]) for r in s["graphs"]] == [("ioi", True), ("top", True), ("bad", False)]
        assert "same token" in s["graphs"][2]["error"]
        assert (out / "summary.md").read_text().count("\n| [") == 3
        graphs[mode] = {n: json.loads((out / f"{n}.json").read_text()) for n in ("ioi", "top")}
        for d in graphs[mode].values():
            assert validate(d) == [] and d["links"]
        if mode == "ray":
            assert s["workers"] == 2 and len({r["worker"] for r in s["graphs"]}) == 2
    for n in ("ioi", "top"):
        a, b = graphs["local"][n], graphs["ray"][n]
        assert [x["node_id"] for x in a["nodes"]] == [x["node_id"] for x in b["nodes"]]
        wa = {(x["source"], x["target"]): x["weight"] for x in a["links"]}
        wb = {(x["source"], x["target"]): x["weight"] for x in b["links"]}
        assert wa.keys() == wb.keys() and all(abs(wa[k] - wb[k]) < 1e-5 for k in wa)


def test_build_dataset_cli_with_ray(ray_cluster, setup, tmp_path, capsys):
    """`tdb-agent build-dataset --ray --workers 2` writes the file the in-process command writes.
    (Also before the module-wide workers exist.)"""
    from tdb_agent.cli import main
    _, spec, _, _ = setup
    common = ["build-dataset", "--model", spec.model, "--device", "cpu", "--sae", spec.saes[0], "--no-bundled-saes",
              "--corpus-docs", "40", "--batch-size", "8", "--top-k", "4", "--threads", "1"]
    assert main(common + ["--out", str(tmp_path / "a")]) == 0
    assert main(common + ["--out", str(tmp_path / "b"), "--ray", "--workers", "2"]) == 0
    assert '"workers": 2' in capsys.readouterr().out
    assert (tmp_path / "a" / DATA).read_bytes() == (tmp_path / "b" / DATA).read_bytes()


@pytest.fixture(scope="module")
def runner(ray_cluster, setup):
    from tdb_agent.datasets.ray_build import RayRunner
    r = RayRunner(setup[1], workers=2)
    yield r
    r.close()


def test_ray_build_equals_single_process(setup, single, runner):
    engine, _, docs, root = setup
    m = build(engine, iter(docs), root / "ray", BuildConfig(**CFG), progress=False, runner=runner)
    assert m["workers"] == 2
    _assert_same(single, _arrays(root / "ray"))
    pids = runner.ray.get([a.pid.remote() for a in runner.actors])
    assert len(set(pids)) == 2 and os.getpid() not in pids  # two worker processes did the work


def test_ray_build_resumes_after_the_driver_stops(setup, single, runner):
    engine, _, docs, root = setup
    out = root / "ray-resume"

    def stop(i):
        if i == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        build(engine, iter(docs), out, BuildConfig(**CFG), progress=False, runner=runner, on_chunk=stop)
    assert (out / "partial" / "state.safetensors").exists()
    merged = []
    build(engine, iter(docs), out, BuildConfig(**CFG), progress=False, runner=runner, on_chunk=merged.append)
    assert merged[0] == 3  # chunks 0..2 came from the checkpoint
    _assert_same(single, _arrays(out))


@pytest.mark.parametrize("how", ["exit", "raise"])
def test_failed_worker_chunk_is_retried(setup, single, runner, tmp_path, how):
    """A worker process that dies (exit) or a chunk that raises: sent again, same dataset."""
    engine, _, docs, _ = setup
    marker = tmp_path / "failed-once"
    runner.fault, retries = {"chunk": 2, "marker": str(marker), "how": how}, runner.retries
    try:
        build(engine, iter(docs), tmp_path / "ds", BuildConfig(**CFG), progress=False, runner=runner)
    finally:
        runner.fault = None
    assert marker.exists() and runner.retries > retries
    _assert_same(single, _arrays(tmp_path / "ds"))
