"""The bundled model's shipped activation dataset and explanations (neurons, heads, SAE
latents and transcoder features; stored gzipped)."""

import json
import random

import pytest
import torch

from tdb_agent.datasets import ActivationDataset
from tdb_agent.datasets.store import BUNDLED_DATASET, DATA, EXPLANATIONS, read_member
from tests.test_datasets import _no_io
from tdb_agent.datasets.components import component_name
from tdb_agent.engine.sae import attach_saes
from tdb_agent.engine.transcoder import attach_transcoders
from tdb_agent.explain import Explainer, ExplainerLLM
from tdb_agent.tasks import task_examples
from tdb_agent.tasks import vocab as V


@pytest.fixture(scope="module")
def eng(bundled):
    """The bundled model with its shipped SAEs and transcoders (detached again after this
    module: the engine is shared by the session)."""
    from tdb_agent.engine.sae import SAESet

    saved, saved_tc = bundled.saes, bundled.transcoders
    bundled.saes = SAESet()
    attach_saes(bundled)
    attach_transcoders(bundled)
    yield bundled
    bundled.saes, bundled.transcoders = saved, saved_tc


@pytest.fixture(scope="module")
def ds(eng):
    assert (BUNDLED_DATASET / "manifest.json").exists(), "the bundled dataset is missing (tdb-agent build-dataset)"
    return ActivationDataset.open(BUNDLED_DATASET, eng)


def test_dataset_covers_every_component_over_held_out_text(eng, ds, monkeypatch):
    m = ds.manifest
    assert m["n_tokens"] >= 200_000
    assert m["n_components"] == eng.spec.n_layers * (eng.spec.d_mlp + eng.spec.n_heads) + sum(
        s.d_sae for _, s in eng.saes.items()) + sum(eng.transcoders.sizes().values())
    assert (BUNDLED_DATASET / f"{DATA}.gz").exists() and not (BUNDLED_DATASET / DATA).exists()
    assert m["config"]["top_k"] >= 20
    for cid in ("L0.N5", "L3.H7", "L2.resid.F100", "L1.tc.F7"):
        ex = ds.examples(cid)
        assert len(ex) >= 20 and all(len(e.tokens) == len(e.activations) for e in ex)
        # a repeated query is answered from the arrays loaded at open and the cached vocabulary: no
        # file is opened and no token decoded (wall-clock speed: tools/bench_dataset.py)
        with monkeypatch.context() as m:
            _no_io(m, ds)
            again = ds.examples(cid)
            ds.stats(cid)
        assert again == ex


def test_shipped_explanations_match_live_ones(eng, ds):
    shipped = json.loads(read_member(BUNDLED_DATASET, EXPLANATIONS))
    assert len(shipped) == ds.manifest["n_components"]
    x = Explainer(eng, ds, llm=ExplainerLLM(base_url=None, api_key=None))
    rng = random.Random(0)
    tc0 = next(b.offset for b in ds.blocks if b.kind == "transcoder")
    cols = rng.sample(range(tc0), 20) + rng.sample(range(tc0, ds.manifest["n_components"]), 10)
    for col in cols:
        cid = component_name(ds.blocks, col)
        live = x.explain(cid, "heuristic")
        assert live.explanation == shipped[cid]["explanation"]
        assert live.score == pytest.approx(shipped[cid]["score"], abs=1e-4)


@torch.no_grad()
def test_the_latent_tracking_ioi_names_is_explained_as_names(eng, ds):
    """Find, from the model alone, the latent most selective for the names in IOI prompts
    (prompts not in the dataset); its shipped explanation must name them and score well
    above a typical latent."""
    shipped = json.loads(read_member(BUNDLED_DATASET, EXPLANATIONS))
    best, best_sel = None, -1.0
    for (layer, site), sae in eng.saes.items():
        site_name = f"blocks.{layer}.hook_resid_post"
        on, off = [], []
        for ex in task_examples("ioi", 30, seed=3):
            ids = eng.to_tokens(ex.prompt)
            _, a = eng.run_with_cache(ids, [site_name])
            f = sae.encode(a[site_name][0])
            is_name = torch.tensor([t.strip() in V.NAMES for t in eng.str_tokens(ids)])
            on.append(f[is_name])
            off.append(f[~is_name])
        on, off = torch.cat(on), torch.cat(off)
        sel = (on.mean(0) - off.mean(0)) / (torch.cat([on, off]).max(0).values + 1e-6)
        i = int(sel.argmax())
        if sel[i] > best_sel:
            best, best_sel = f"L{layer}.{site}.F{i}", sel[i].item()
    assert best_sel > 0.3, best_sel
    latent_scores = sorted(v["score"] for k, v in shipped.items() if ".F" in k)
    median = latent_scores[len(latent_scores) // 2]
    assert shipped[best]["explanation"].startswith("fires on names"), (best, shipped[best])
    assert shipped[best]["score"] > 0.5 and shipped[best]["score"] > median + 0.2, (best, shipped[best], median)


@torch.no_grad()
def test_transcoder_feature_examples_are_the_model_s(eng, ds):
    """A live transcoder feature's top example: its window is a span of the corpus, and its
    activations are the feature's, recomputed from the model by a plain forward hook on the
    block's MLP (its input encoded by hand: ReLU of the TopK pre-activations)."""
    tcs = eng.transcoders
    col = next(b.offset for b in ds.blocks if b.kind == "transcoder" and b.layer == 2)
    live = [c for c in range(col, col + tcs.layers[2].d_tc) if ds.a["stats.max"][c] > 0]
    assert len(live) > 0.5 * tcs.layers[2].d_tc
    i = live[len(live) // 2] - col
    ex = ds.examples(f"L2.tc.F{i}")[0]
    got = {}
    h = eng.model.transformer.h[2].mlp.register_forward_hook(lambda m, a, o: got.__setitem__("x", a[0][0].float()))
    try:
        toks = ds.a["tokens"]
        d = ex.document
        start = int(ds.doc_starts[d])
        doc = toks[start: start + int(ds.a["doc_lengths"][d])].astype("int64")
        eng.model(torch.tensor(doc)[None])
    finally:
        h.remove()
    tc = tcs.layers[2]
    pre = got["x"] @ tc.W_enc.float() + tc.b_enc.float()
    f = pre.masked_fill(pre < pre.topk(tc.k, dim=-1).values[..., -1:], 0).clamp(min=0)[:, i]
    span = [j for j in range(len(doc)) if doc[j: j + len(ex.token_ids)].tolist() == ex.token_ids][0]
    want = f[span: span + len(ex.token_ids)]
    scale = float(ds.a["scale"][col + i])
    assert max(abs(a - float(w)) for a, w in zip(ex.activations, want)) <= 0.51 * scale + 1e-4
    assert ex.activation == pytest.approx(float(f[1:].max()), rel=2e-3)
