"""Activation datasets: the streaming builder against a brute-force pass over each document
alone, the store's checks and speed, and resuming."""

import builtins
import io

import numpy as np
import pytest
import torch

from tdb_agent.datasets import ActivationDataset, BuildConfig, DatasetMismatch, build, documents_from_corpus
from tdb_agent.datasets import store
from tdb_agent.engine.sae import SAESet
from tests.test_graph import random_transcoders
from tests.test_sae import random_sae

CFG = dict(top_k=5, n_random=3, n_quantile_bins=3, per_bin=2, window=8, lead=5, batch_size=7, warmup_docs=14,
           sort_buffer=2)


@pytest.fixture(scope="module")
def eng(tiny_engines):
    e = tiny_engines["gpt2"]
    saved, saved_tc = e.saes, e.transcoders
    e.saes = SAESet()
    e.saes.add(random_sae(e.spec.d_model, 24, "blocks.1.hook_resid_post", seed=5), e.spec.n_layers, e.spec.d_model)
    e.transcoders = random_transcoders(e, n=12, seed=3)
    e.transcoders.layers[1].k = 4  # TopK on one layer, plain ReLU on the other
    yield e
    e.saes, e.transcoders = saved, saved_tc


@torch.no_grad()
def mlp_inputs(e, ids) -> list[torch.Tensor]:
    """Each block's MLP input (ln_2's output), read by plain forward hooks on the HF modules."""
    got, handles = {}, []
    for l, block in enumerate(e.model.transformer.h):
        handles.append(block.ln_2.register_forward_hook(lambda m, i, o, l=l: got.__setitem__(l, o)))
    try:
        e.model(ids)
    finally:
        for h in handles:
            h.remove()
    return [got[l][0].float() for l in range(len(got))]


def hand_encode(x, W_enc, b_enc, k):
    """relu(x W + b), keeping only each token's k largest pre-activations when k is set."""
    pre = x @ W_enc + b_enc
    if k is not None:
        pre = pre.masked_fill(pre < pre.topk(k, dim=-1).values[..., -1:], 0)
    return pre.clamp(min=0)


def _docs(e, n=60):
    return list(documents_from_corpus(n, 77, e.tokenizer, e.spec.n_ctx))


@torch.no_grad()
def brute(e, docs):
    """Per document: activations [L, C] in the dataset's column order, and head key argmax [L, H]."""
    out = []
    sae = e.saes.get(1, "resid")
    for d in docs:
        ids = torch.tensor([d])
        sites = [f"blocks.{l}.{s}" for l in range(2) for s in ("mlp.hook_post", "attn.hook_z", "attn.hook_pattern")]
        _, a = e.run_with_cache(ids, sites + ["blocks.1.hook_resid_post"])
        cols, keys = [], []
        for l in range(2):
            cols.append(a[f"blocks.{l}.mlp.hook_post"][0])
            z = a[f"blocks.{l}.attn.hook_z"][0]  # [s, h, dh]
            W_O = e.model.transformer.h[l].attn.c_proj.weight.view(e.spec.n_heads, -1, e.spec.d_model)
            cols.append(torch.stack([(z[:, h] @ W_O[h]).norm(dim=-1) for h in range(e.spec.n_heads)], -1))
            keys.append(a[f"blocks.{l}.attn.hook_pattern"][0].argmax(-1).T)
        cols.append(sae.encode(a["blocks.1.hook_resid_post"][0]))
        for l, x in enumerate(mlp_inputs(e, ids)):
            tc = e.transcoders.layers[l]
            cols.append(hand_encode(x, tc.W_enc, tc.b_enc, tc.k))
        out.append((torch.cat(cols, -1), torch.cat(keys, -1)))
    return out


@pytest.fixture(scope="module")
def built(eng, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds")
    docs = _docs(eng)
    build(eng, iter(docs), out, BuildConfig(**CFG), progress=False)
    ds = ActivationDataset.open(out, eng)
    # documents in the order the builder read them (it groups documents of similar length)
    lens = ds.a["doc_lengths"]
    in_order = [d.tolist() for d in np.split(ds.a["tokens"].astype(np.int64), np.cumsum(lens)[:-1])]
    assert sorted(map(tuple, in_order)) == sorted(map(tuple, docs))
    return ds, in_order, brute(eng, in_order)


def test_top_examples_and_stats_match_brute_force(eng, built):
    ds, docs, acts = built
    d_mlp, H = eng.spec.d_mlp, eng.spec.n_heads
    base = 2 * (d_mlp + H)
    comps = {"L0.N3": 3, "L1.N100": d_mlp + H + 100, "L0.H2": d_mlp + 2, "L1.H1": 2 * d_mlp + H + 1,
             "L1.resid.F7": base + 7, "L0.tc.F5": base + 24 + 5, "L1.tc.F2": base + 24 + 12 + 2}
    assert [(b.kind, b.layer, b.n) for b in ds.blocks[-2:]] == [("transcoder", 0, 12), ("transcoder", 1, 12)]
    assert ds.manifest["transcoder_fingerprints"].keys() == {"L0.tc", "L1.tc"}
    allv = torch.cat([a[1:] for a, _ in acts])
    for cid, col in comps.items():
        maxima = torch.tensor([a[1:, col].max().item() for a, _ in acts])
        assert ".F" not in cid or maxima.max() > 0, cid  # features that fire, so their ranking is tested
        order = maxima.argsort(descending=True)[:5]
        ex = ds.examples(cid, "top")
        assert len(ex) == 5
        scale = float(ds.a["scale"][col])
        for e_, di in zip(ex, order.tolist()):
            a, keys = acts[di]
            assert abs(e_.activation - maxima[di].item()) < 2e-3 * max(1, abs(maxima[di].item()))
            p = int(a[1:, col].argmax()) + 1
            assert e_.document == di
            d = docs[di]
            start = e_.token_ids
            assert d[p - e_.position: p - e_.position + len(start)] == start
            want = a[p - e_.position: p - e_.position + len(start), col]
            assert np.allclose(e_.activations, want.numpy(), atol=scale * 0.51 + 1e-6)
            assert max(e_.activations) == pytest.approx(e_.activations[e_.position], abs=scale)
            if ".H" in cid:
                h = col - (d_mlp if cid.startswith("L0") else 2 * d_mlp + H) + (0 if cid.startswith("L0") else H)
                assert e_.attended_offset == int(keys[p, h]) - p
        st = ds.stats(cid)
        assert st.mean == pytest.approx(allv[:, col].mean().item(), rel=1e-4, abs=1e-6)
        assert st.max == pytest.approx(allv[:, col].max().item(), rel=1e-5)
        assert st.frac_active == pytest.approx((allv[:, col] > 0).float().mean().item(), abs=1e-6)


def test_random_and_quantile_examples_are_real(eng, built):
    ds, docs, acts = built
    col = ds.column("L1.resid.F3")
    edges = ds.a["quantile.edges"][col]
    for group in ("random", "quantile"):
        ex = ds.examples("L1.resid.F3", group)
        assert ex and len(ex) <= (3 if group == "random" else 6)
        for e_ in ex:
            a, _ = acts[e_.document]
            # the example's window is a span of its document, and its value the activation there
            d = docs[e_.document]
            starts = [i for i in range(len(d)) if d[i:i + len(e_.token_ids)] == e_.token_ids]
            assert starts
            pos = starts[0] + e_.position
            assert abs(e_.activation - a[pos, col].item()) < 2e-3
            if group == "quantile":
                assert e_.activation == pytest.approx(a[1:, col].max().item(), abs=2e-3)
                assert e_.document >= 14  # drawn after the warm-up documents fixed the bin edges
        if group == "quantile":
            bins = {int(np.searchsorted(edges, e_.activation)) for e_ in ex}
            assert len(bins) >= 2  # samples spread over the distribution, not only its top


def _no_io(m, ds):
    """Within the monkeypatch context `m`: any file read, dataset reload or vocabulary decode raises."""
    def forbidden(*a, **k):
        raise AssertionError(f"a dataset query touched the disk: {a[:1]}")
    m.setattr(store, "load_bytes", forbidden)
    m.setattr(builtins, "open", forbidden)
    m.setattr(io, "open", forbidden)
    m.setattr(ds, "tokenizer", None)  # the vocabulary must come from the cache decoded on first use


def test_query_speed_and_mismatch(eng, built, tiny_engines, monkeypatch):
    ds, _, _ = built
    ds.examples("L0.N5")  # vocabulary decoded once
    want = ds.examples("L1.N9", "top")
    # queries read only the arrays loaded at open and the cached vocabulary: no file is opened and
    # no token decoded again (wall-clock speed is measured by tools/bench_dataset.py, not here)
    with monkeypatch.context() as m:
        _no_io(m, ds)
        for _ in range(20):
            got = ds.examples("L1.N9", "top")
            stats = ds.stats("L1.N9")
    assert got == want and len(got) > 0 and stats.max >= stats.mean
    saved = eng.saes
    eng.saes = SAESet()
    try:
        with pytest.raises(DatasetMismatch, match="L1.resid"):
            ds.check(eng)
    finally:
        eng.saes = saved
    with pytest.raises(DatasetMismatch, match="fingerprint"):
        ds.check(tiny_engines["llama"])
    saved_tc = eng.transcoders
    eng.transcoders = random_transcoders(eng, n=12, seed=4)  # other transcoders: refused, named
    try:
        with pytest.raises(DatasetMismatch, match="transcoder at L0.tc"):
            ds.check(eng)
        eng.transcoders = None  # none loaded: the rest of the dataset still answers
        ds.check(eng)
    finally:
        eng.transcoders = saved_tc


def test_a_gzipped_store_reads_the_same(eng, built, tmp_path):
    import shutil

    ds, _, _ = built
    folder = tmp_path / "gz"
    shutil.copytree(ds.folder, folder)
    (folder / store.EXPLANATIONS).write_text('{"L0.N1": {"explanation": "x", "score": 0.5}}')
    sizes = store.compress(folder)
    assert not (folder / store.DATA).exists() and (folder / f"{store.DATA}.gz").exists()
    assert sizes[store.DATA][1] < sizes[store.DATA][0]
    again = ActivationDataset.open(folder, eng)
    assert again.a.keys() == ds.a.keys() and all(np.array_equal(ds.a[k], again.a[k]) for k in ds.a)
    assert again.examples("L1.tc.F2") == ds.examples("L1.tc.F2")
    assert store.read_member(folder, store.EXPLANATIONS) == b'{"L0.N1": {"explanation": "x", "score": 0.5}}'
    first = (folder / f"{store.DATA}.gz").read_bytes()
    (folder / f"{store.DATA}.gz").rename(folder / "x.gz")
    (folder / store.DATA).write_bytes(store.read_member(folder, "x"))
    store.compress(folder, (store.DATA,))
    assert (folder / f"{store.DATA}.gz").read_bytes() == first  # reproducible: no timestamp in the file


def test_resume_gives_the_same_dataset(eng, tmp_path, built):
    ds, _, _ = built
    docs = _docs(eng)

    def interrupted():
        for i, d in enumerate(docs):
            if i == 45:
                raise KeyboardInterrupt
            yield d

    cfg = BuildConfig(**(CFG | dict(checkpoint_every=2, sort_buffer=2)))
    with pytest.raises(KeyboardInterrupt):
        build(eng, interrupted(), tmp_path / "r", cfg, progress=False)
    assert (tmp_path / "r" / "partial" / "state.safetensors").exists()
    build(eng, iter(docs), tmp_path / "r", cfg, progress=False)
    again = ActivationDataset.open(tmp_path / "r", eng)
    for name, arr in ds.a.items():
        assert np.array_equal(arr, again.a[name]), name


def test_a_tokenizer_without_bos_builds_a_dataset(tmp_path, capsys):
    """Qwen2-style tokenizers declare no BOS token (`bos_token: null`): nothing is prepended to
    prompts or corpus documents, and `tdb-agent build-dataset` completes (it crashed on
    `[None] + ids`). The stored maxima are checked against a plain transformers forward."""
    from transformers import AutoModelForCausalLM

    from tdb_agent.cli import main
    from tdb_agent.datasets.command import DATASET_SEED
    from tdb_agent.engine import Engine
    from tdb_agent.tasks import corpus_documents
    from tdb_agent.tasks.tokenizer import build_tokenizer
    from tests.tiny_models import build_tiny

    folder = build_tiny("llama", tmp_path / "llama-no-bos")
    tok = build_tokenizer()
    tok.bos_token = None
    tok.save_pretrained(folder)
    engine = Engine.load(folder, device="cpu")
    assert engine.tokenizer.bos_token_id is None
    text = "the cat sat on the mat"
    assert engine.to_tokens(text)[0].tolist() == tok(text, add_special_tokens=False)["input_ids"]

    out = tmp_path / "ds"
    n_docs = 24
    assert main(["build-dataset", "--model", str(folder), "--device", "cpu", "--no-bundled-saes", "--corpus-docs",
                 str(n_docs), "--batch-size", "8", "--top-k", "3", "--n-random", "2", "--window", "8", "--lead", "4",
                 "--out", str(out)]) == 0
    assert '"n_documents": ' in capsys.readouterr().out
    ds = ActivationDataset.open(out, engine)
    lens = ds.a["doc_lengths"]
    stored = [d.tolist() for d in np.split(ds.a["tokens"].astype(np.int64), np.cumsum(lens)[:-1])]
    docs = [tok(t, add_special_tokens=False)["input_ids"][:engine.spec.n_ctx]
            for t in corpus_documents(n_docs, seed=DATASET_SEED)]
    assert sorted(map(tuple, stored)) == sorted(tuple(d) for d in docs if len(d) >= 2)  # nothing prepended

    # every layer-0 neuron's top value = its largest post-activation over the documents
    # (position 0 left out), read from the input of a plain transformers model's down_proj
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    seen = []
    handle = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0][0, 1:]))
    try:
        with torch.no_grad():
            for d in stored:
                model(torch.tensor([d]))
    finally:
        handle.remove()
    expect = torch.cat(seen).max(0).values.numpy()
    cols = [ds.column(f"L0.N{n}") for n in range(engine.spec.d_mlp)]
    got = ds.a["top.value"][cols, 0].astype(np.float32)
    np.testing.assert_allclose(got, expect, rtol=2e-3, atol=1e-4)  # stored as float16


def test_prompt_limit_counts_tokens_as_the_engine_reads_them(tmp_path):
    """The max_prompt_tokens check counts the BOS token only where the tokenizer has one: a
    prompt of exactly the limit is accepted on a BOS-less model (it was refused, counted +1)."""
    import pytest

    from tdb_agent.engine import Engine
    from tdb_agent.service.limits import LimitChecks, LimitExceeded
    from tdb_agent.tasks.tokenizer import build_tokenizer
    from tdb_agent.workbench import Limits, Workbench
    from tests.tiny_models import build_tiny

    text = "the cat sat on the mat"
    for bos in (True, False):
        folder = build_tiny("llama", tmp_path / f"llama-{bos}")
        tok = build_tokenizer()
        if not bos:
            tok.bos_token = None
        tok.save_pretrained(folder)
        engine = Engine.load(folder, device="cpu")
        n = engine.to_tokens(text).shape[-1]  # what the engine reads
        assert n == len(tok(text, add_special_tokens=False)["input_ids"]) + bos
        LimitChecks(Workbench(engine, Limits(max_prompt_tokens=n))).text(text)
        with pytest.raises(LimitExceeded, match="max_prompt_tokens"):
            LimitChecks(Workbench(engine, Limits(max_prompt_tokens=n - 1))).text(text)



_BUILD = """
import json, sys, torch
from tdb_agent.datasets import BuildConfig, build, documents_from_corpus
from tdb_agent.session import EngineSpec
model, sae, out, cfg = sys.argv[1:]
torch.set_num_threads(1)
torch.manual_seed(1234); torch.rand(77)  # a global RNG state of its own
e = EngineSpec(model=model, device="cpu", saes=[sae], bundled_saes=False, bundled_transcoders=False).load()
build(e, documents_from_corpus(60, 77, e.tokenizer, e.spec.n_ctx), out, BuildConfig(**json.loads(cfg)), progress=False)
"""


def test_a_build_in_a_fresh_process_is_identical(tiny_dirs, tmp_path):
    """A build depends on the corpus and its settings only: the same build here and in a fresh
    process (another hash seed, another global RNG state; one CPU thread each, as
    tools/build_bundled_assets.sh runs it) stores the same bytes (the sampled examples are
    keyed by document, not drawn from a stream), manifests equal but for the duration."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    sae = random_sae(32, 24, "blocks.1.hook_resid_post", seed=5).save(tmp_path / "sae")
    out = [tmp_path / "here", tmp_path / "there"]
    subprocess.run([sys.executable, "-c", _BUILD, str(tiny_dirs["gpt2"]), str(sae), str(out[1]), json.dumps(CFG)],
                   cwd=Path(__file__).resolve().parents[1], check=True, env=os.environ | {"PYTHONHASHSEED": "7"})
    from tdb_agent.session import EngineSpec

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        e = EngineSpec(model=str(tiny_dirs["gpt2"]), device="cpu", saes=[str(sae)], bundled_saes=False,
                       bundled_transcoders=False).load()
        build(e, documents_from_corpus(60, 77, e.tokenizer, e.spec.n_ctx), out[0], BuildConfig(**CFG), progress=False)
    finally:
        torch.set_num_threads(threads)
    a, b = ((o / store.DATA).read_bytes() for o in out)
    assert len(a) > 10_000 and a == b
    ma, mb = (json.loads((o / store.MANIFEST).read_text()) for o in out)
    assert ma.pop("build_seconds") >= 0 and mb.pop("build_seconds") >= 0 and ma == mb
    # what it was built with (a build that does not reproduce can be traced to another torch or CPU)
    assert ma["environment"]["torch"] == torch.__version__ and ma["environment"]["cpu"]
