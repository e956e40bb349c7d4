"""On the bundled model: model_info lists the loaded transcoders; the dataset tools answer
for transcoder features (the shipped dataset records them) and refuse them with a clear
message where a dataset was built without them; an SAE-latent graph's supernodes carry the
shipped explanations."""

from __future__ import annotations

import asyncio
import json

import pytest
from mcp import Client

from tdb_agent.datasets.store import BUNDLED_DATASET, EXPLANATIONS, read_member
from tdb_agent.engine import Engine
from tdb_agent.engine.sae import attach_saes
from tdb_agent.engine.transcoder import BUNDLED_TRANSCODERS, attach_transcoders
from tdb_agent.ops.basic import model_info
from tdb_agent.server import build_server
from tdb_agent.workbench import Workbench
from tests.test_graph import attached, random_transcoders


def test_model_info_lists_transcoders(tiny_engines):
    e = tiny_engines["gpt2"]
    assert model_info(e).transcoders == []
    L = e.spec.n_layers
    with attached(e, random_transcoders(e, n=16, cross_layer=True)):
        info = model_info(e).transcoders
    assert [t.layer for t in info] == list(range(L)) and all(t.features == 16 for t in info)
    assert info[0].kind == "relu + skip, cross-layer" and info[0].writes_to == list(range(L))
    assert info[-1].writes_to == [L - 1]
    with attached(e, random_transcoders(e, n=8, skip=False)):
        assert {t.kind for t in model_info(e).transcoders} == {"relu"}


def test_bundled_model_info_and_transcoder_features_in_the_dataset(bundled, tmp_path):
    if not BUNDLED_TRANSCODERS.is_dir():
        pytest.skip("the bundled transcoders are not built (python tools/train_transcoders.py)")
    engine = Engine.load()
    attach_saes(engine, [], bundled=True)
    attach_transcoders(engine)

    async def go():
        async with Client(build_server(Workbench(engine, workspace=tmp_path))) as c:
            info = (await c.call_tool("model_info", {})).structured_content
            r = await c.call_tool("top_examples", {"component": "L1.tc.F3"})
            x = await c.call_tool("explain_component", {"component": "L1.tc.F3", "method": "heuristic"})
            ok = await c.call_tool("top_examples", {"component": "L0.resid.F15", "k": 2})
            return info, r, x, ok

    info, r, x, ok = asyncio.run(go())
    tcs = engine.transcoders
    assert [(t["layer"], t["features"]) for t in info["transcoders"]] == [(l, tc.d_tc) for l, tc in tcs.layers.items()]
    assert all(t["kind"].startswith("topk (k=16)") for t in info["transcoders"])
    for res in (r, x):
        assert not res.is_error, res.content
    assert r.structured_content["examples"] and x.structured_content["explanation"]
    assert not ok.is_error


def test_a_dataset_without_transcoders_refuses_their_features(tiny_engines, tmp_path):
    from tdb_agent.datasets import ActivationDataset, BuildConfig, build, documents_from_corpus
    from tdb_agent.service.dataset_tools import TopExamplesArgs, top_examples
    from tdb_agent.service.tool import Job
    from tdb_agent.errors import TdbError

    e = tiny_engines["gpt2"]
    docs = list(documents_from_corpus(20, 5, e.tokenizer, e.spec.n_ctx))
    build(e, iter(docs), tmp_path / "ds", BuildConfig(top_k=2, n_random=1, n_quantile_bins=2, per_bin=1, window=6,
                                                      lead=3, warmup_docs=8), progress=False)
    bench = Workbench(e, workspace=tmp_path)
    with attached(e, random_transcoders(e, n=8)):
        bench.dataset = ActivationDataset.open(tmp_path / "ds", e)
        with pytest.raises(TdbError, match="built without transcoders"):
            top_examples(bench, TopExamplesArgs(component="L1.tc.F3"), Job())


def test_bundled_sae_graph_supernodes_carry_shipped_explanations(bundled, tmp_path):
    """On the bundled model with its residual SAEs and dataset (no transcoders), the graph is
    over SAE latents and its supernodes are labelled with the shipped explanations."""
    engine = Engine.load()
    attach_saes(engine, [], bundled=True)
    shipped = json.loads(read_member(BUNDLED_DATASET, EXPLANATIONS))

    async def go():
        async with Client(build_server(Workbench(engine, workspace=tmp_path))) as c:
            r = await c.call_tool("attribution_graph", {"prompt": "When Eric and Ryan went to the harbor , Eric "
                                                        "gave a pen to", "target": "Ryan", "distractor": "Eric",
                                                        "name": "ioi"})
            assert not r.is_error, r.content
            return (await c.call_tool("graph_supernodes", {"name": "ioi", "threshold": 0.9})).structured_content

    sn = asyncio.run(go())
    assert sn["features"] > 0
    for node in sn["supernodes"]:
        for member, text in node["explanations"].items():
            assert text == shipped[member.split("@")[0]]["explanation"]
        assert set(node["explanations"]) == set(node["members"])  # every shipped latent has one
        assert node["label"] == node["explanations"][node["members"][0]]
