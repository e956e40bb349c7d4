"""Models spread over devices (accelerate device maps): every operation equals the
single-device run.

This machine has no GPU, so the multi-placement test here maps blocks to "cpu" and to
"disk" (accelerate keeps their weights in an offload folder, the parameters are meta
outside a forward, and its hooks load them per call): every weight the operations read
directly must be materialised, and every result must match the plain load. The cuda/cpu
split runs where a GPU exists (marked gpu)."""

import pytest
import torch

from tdb_agent import ops
from tdb_agent.datasets.components import model_fingerprint
from tdb_agent.engine import Engine
from tdb_agent.engine.placement import DoesNotFit, parse_device_map, parse_max_memory
from tdb_agent.engine.sae import SAESet
from tests.test_sae import random_sae

PROMPT = "When Mary and John went to the store , John gave a drink to"
CORRUPT = "When Mary and John went to the store , Anna gave a drink to"

MAPS = {
    "gpt2": {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h.0": "disk", "transformer.h.1": "cpu",
             "transformer.ln_f": "disk", "lm_head": "cpu"},
    "llama": {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
              "model.layers.1": "disk", "model.norm": "disk", "lm_head": "cpu"},
    # post-norms frozen in decompositions, soft-caps, sliding windows: their weights offloaded too
    "gemma2": {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "disk",
               "model.layers.1": "cpu", "model.norm": "disk", "lm_head": "cpu"},
}


@pytest.fixture(scope="module", params=["gpt2", "llama", "gemma2"])
def pair(request, tiny_dirs, tiny_engines, tmp_path_factory):
    fam = request.param
    spread = Engine.load(tiny_dirs[fam], device_map=MAPS[fam], offload_folder=tmp_path_factory.mktemp("offload"))
    return tiny_engines[fam], spread


def _close(a, b, tol=1e-5):
    assert abs(a - b) <= tol * max(1.0, abs(a)), (a, b)


def test_placement_is_real(pair):
    single, spread = pair
    assert spread.dispatched and not single.dispatched
    p = spread.placement()
    devs = {d.device: d for d in p.devices}
    assert set(devs) == {"cpu", "disk"} and devs["disk"].offloaded and devs["disk"].param_bytes > 0
    # the offloaded weights really are not in memory outside a forward pass
    assert any(q.device.type == "meta" for q in spread.model.parameters())
    assert model_fingerprint(spread) == model_fingerprint(single)
    info = ops.model_info(spread)
    assert info.placement is not None and info.placement.device_map


def test_logits_and_capture_equal(pair):
    single, spread = pair
    ids = single.to_tokens(PROMPT)
    sites = ["blocks.0.attn.hook_z", "blocks.1.mlp.hook_post", "blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern"]
    a, ca = single.run_with_cache(ids, sites, logit_positions=None)
    b, cb = spread.run_with_cache(ids, sites, logit_positions=None)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=0)
    for s in sites:
        torch.testing.assert_close(cb[s], ca[s], atol=1e-5, rtol=0)


def test_gradients_equal(pair):
    single, spread = pair
    ids = single.to_tokens(PROMPT)
    grads = []
    for eng in (single, spread):
        box = {}

        def leaf(x, site):
            box["x"] = x.detach().clone().requires_grad_(True)
            return box["x"]
        with torch.enable_grad():
            out = eng.forward(ids, hooks={"blocks.1.hook_resid_pre": leaf})
            (g,) = torch.autograd.grad(out.logits[0, -1, 5] - out.logits[0, -1, 7], box["x"])
        grads.append(g)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["direct_effect", "act_times_grad"])
def test_attribute_equal(pair, method):
    single, spread = pair
    kw = dict(target="Mary", distractor="John", method=method, top_k=None)
    if method == "act_times_grad":
        kw["corrupted_prompt"] = CORRUPT
    a, b = ops.attribute(single, PROMPT, **kw), ops.attribute(spread, PROMPT, **kw)
    _close(a.metric, b.metric)
    assert [r.id for r in a.rows][:10] == [r.id for r in b.rows][:10]
    for ra, rb in zip(a.rows, b.rows):
        _close(ra.effect, rb.effect, 1e-4)


def test_ablate_sweep_patch_equal(pair):
    single, spread = pair
    for mode in ("zero", "mean", "resample"):
        kw = dict(target="Mary", distractor="John", mode=mode, corrupted_prompt=CORRUPT)
        a = ops.ablate(single, PROMPT, ["L0.H1", "L1.N3", "L1.MLP"], **kw)
        b = ops.ablate(spread, PROMPT, ["L0.H1", "L1.N3", "L1.MLP"], **kw)
        _close(a.after, b.after)
    a = ops.ablation_sweep(single, PROMPT, "head", "Mary", "John", positions="last")
    b = ops.ablation_sweep(spread, PROMPT, "head", "Mary", "John", positions="last")
    assert {r.id: round(r.delta, 4) for r in a.rows} == {r.id: round(r.delta, 4) for r in b.rows}
    a = ops.patch(single, PROMPT, CORRUPT, ["L1.H2", "L0.MLP"], "Mary", "John")
    b = ops.patch(spread, PROMPT, CORRUPT, ["L1.H2", "L0.MLP"], "Mary", "John")
    _close(a.metric_patched, b.metric_patched)


@pytest.mark.parametrize("component,via", [("L1.H1", "q"), ("L1.H1", "k"), ("L1.H1", "v"), ("L1.N3", "all")])
def test_trace_equal(pair, component, via):
    single, spread = pair
    kw = dict(via=via, target="Mary", distractor="John", top_k=None)
    a, b = ops.trace_upstream(single, PROMPT, component, **kw), ops.trace_upstream(spread, PROMPT, component, **kw)
    _close(a.value, b.value)
    wa = {(e.source, e.via): e.weight for e in a.edges}
    wb = {(e.source, e.via): e.weight for e in b.edges}
    assert wa.keys() == wb.keys()
    for k in wa:
        _close(wa[k], wb[k], 1e-4)


def test_sae_splice_equal(pair):
    single, spread = pair
    d = single.spec.d_model
    results = []
    for eng in (single, spread):
        saved, eng.saes = eng.saes, SAESet()
        try:
            eng.saes.add(random_sae(d, 24, "blocks.0.hook_resid_post", seed=3), eng.spec.n_layers, d)
            r = ops.attribute(eng, PROMPT, "Mary", "John", kinds=["sae"], top_k=None)
            ab = ops.ablate(eng, PROMPT, ["L0.resid.F3", "L0.resid.F7"], "Mary", "John")
            results.append(({c.id: c.effect for c in r.rows}, ab.after))
        finally:
            eng.saes = saved
    (ea, aa), (eb, ab_) = results
    assert ea.keys() == eb.keys()
    for k in ea:
        _close(ea[k], eb[k], 1e-4)
    _close(aa, ab_)


def test_auto_map_with_memory_cap_offloads(tiny_dirs, tiny_engines, tmp_path):
    """`auto` with a CPU budget smaller than the model: the rest goes to disk (with a
    folder), or a clear error with the estimate (without one)."""
    single = tiny_engines["gpt2"]
    with pytest.raises(DoesNotFit, match=r"needs about .* pass --offload-folder"):
        Engine.load(tiny_dirs["gpt2"], device_map="auto", max_memory="cpu=100KB")
    spread = Engine.load(tiny_dirs["gpt2"], device_map="auto", max_memory="cpu=100KB", offload_folder=tmp_path)
    assert "disk" in {d.device for d in spread.placement().devices}
    ids = single.to_tokens(PROMPT)
    torch.testing.assert_close(spread.forward(ids).logits, single.forward(ids).logits, atol=1e-5, rtol=0)


def test_bad_maps_are_clear_errors(tiny_dirs):
    with pytest.raises(ValueError, match="modules the model does not have"):
        Engine.load(tiny_dirs["gpt2"], device_map={"transformer.nope": "cpu"})
    with pytest.raises(DoesNotFit, match="offload-folder"):
        Engine.load(tiny_dirs["gpt2"], device_map={"": "disk"})
    with pytest.raises(ValueError, match="device-map"):
        parse_device_map("everywhere")
    assert parse_device_map('{"lm_head": 0}') == {"lm_head": 0}
    assert parse_max_memory("0=70GiB, cpu=100GiB") == {0: "70GiB", "cpu": "100GiB"}
    assert parse_max_memory('{"0": "70GiB", "cpu": 1000}') == {0: "70GiB", "cpu": 1000}


@pytest.mark.gpu
def test_cuda_cpu_split(tiny_dirs, tiny_engines):
    """Blocks on the GPU and CPU-offloaded blocks executed on it (accelerate's offload)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    single = tiny_engines["gpt2"]
    m = {"transformer.wte": 0, "transformer.wpe": 0, "transformer.h.0": 0, "transformer.h.1": "cpu",
         "transformer.ln_f": 0, "lm_head": 0}
    spread = Engine.load(tiny_dirs["gpt2"], device_map=m)
    ids = single.to_tokens(PROMPT)
    torch.testing.assert_close(spread.forward(ids).logits.cpu(), single.forward(ids).logits, atol=1e-4, rtol=0)
    a = ops.attribute(single, PROMPT, "Mary", "John", top_k=5)
    b = ops.attribute(spread, PROMPT, "Mary", "John", top_k=5)
    assert [r.id for r in a.rows] == [r.id for r in b.rows]
    t = ops.trace_upstream(spread, PROMPT, "L1.H1", via="all", top_k=5)
    assert t.edges


def test_single_device_that_does_not_fit(tiny_dirs, monkeypatch):
    """A plain load larger than the device's free memory: the estimate, not an OOM crash."""
    from tdb_agent.engine import placement
    monkeypatch.setattr(placement, "_free_bytes", lambda device: 1000)
    with pytest.raises(DoesNotFit, match=r"needs about 0.3 MiB .* cpu has 1 KiB free; spread it with --device-map"):
        Engine.load(tiny_dirs["gpt2"], device="cpu")


def test_cli_reports_placement_errors(tiny_dirs, capsys):
    from tdb_agent.cli import main
    assert main(["demo", "--model", str(tiny_dirs["gpt2"]), "--device-map", "auto", "--max-memory", "cpu=10KB"]) == 2
    assert "would go to disk: pass --offload-folder" in capsys.readouterr().err
