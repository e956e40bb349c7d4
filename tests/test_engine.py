"""The engine against plain `transformers` forwards and hand-written computations."""

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from tdb_agent.engine import Engine, StopForward
from tdb_agent.engine.interventions import intervention
from tdb_agent.errors import ModelNotFound, PromptTooLong, TdbError, TokenizationError, UnknownSite
from tests.tiny_models import FAMILIES

PROMPT = "When Mary and John went to the store , John gave a drink to"


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_plain_transformers(family, tiny_dirs, tiny_engines):
    eng = tiny_engines[family]
    ref = AutoModelForCausalLM.from_pretrained(tiny_dirs[family], dtype=torch.float32).eval()
    ids = eng.to_tokens(PROMPT)
    with torch.no_grad():
        expected = ref(ids).logits
        got = eng.forward(ids, logit_positions=None).logits
        # with every site hooked (the slow, fully instrumented attention path) too
        out, cache = eng.run_with_cache(ids, eng.site_names(), logit_positions=None)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=0)
    assert f"blocks.{eng.spec.n_layers - 1}.attn.hook_pattern" in cache
    assert eng.active_hook_count() == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_head_writes_plus_bias_sum_to_attn_out(family, tiny_engines):
    eng = tiny_engines[family]
    ids = eng.to_tokens(PROMPT)
    with torch.no_grad():
        _, cache = eng.run_with_cache(ids, ["blocks.1.attn.hook_z", "blocks.1.hook_attn_out"])
    z = cache["blocks.1.attn.hook_z"][0]  # [s, h, dh]
    per_head = torch.einsum("shd,hdm->shm", z, eng.adapter.W_O(1))
    bias = eng.adapter.b_O(1)
    total = per_head.sum(1) + (bias if bias is not None else 0)
    torch.testing.assert_close(total, cache["blocks.1.hook_attn_out"][0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_mlp_post_through_W_out_is_mlp_out(family, tiny_engines):
    eng = tiny_engines[family]
    ids = eng.to_tokens(PROMPT)
    with torch.no_grad():
        _, cache = eng.run_with_cache(ids, ["blocks.0.mlp.hook_post", "blocks.0.hook_mlp_out"])
    b = eng.adapter.b_out(0)
    out = cache["blocks.0.mlp.hook_post"][0] @ eng.adapter.W_out(0) + (b if b is not None else 0)
    torch.testing.assert_close(out, cache["blocks.0.hook_mlp_out"][0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_patching_clean_activations_changes_nothing(family, tiny_engines):
    eng = tiny_engines[family]
    ids = eng.to_tokens(PROMPT)
    sites = ["blocks.0.attn.hook_z", "blocks.1.mlp.hook_post", "blocks.1.hook_resid_pre"]
    with torch.no_grad():
        clean, cache = eng.run_with_cache(ids, sites)
        hooks = {s: intervention("patch", s, value=cache[s]) for s in sites}
        patched = eng.forward(ids, hooks=hooks)
    torch.testing.assert_close(patched.logits, clean.logits, atol=0, rtol=0)


def test_zero_ablating_a_head_matches_hand_written_hook(gpt2_tiny, tiny_dirs):
    """Zeroing head 2 of layer 1 = removing its slice of c_proj's input in plain transformers."""
    eng = gpt2_tiny
    ref = AutoModelForCausalLM.from_pretrained(tiny_dirs["gpt2"], dtype=torch.float32).eval()
    ids = eng.to_tokens(PROMPT)
    dh = eng.spec.d_head

    def zero_head(mod, args):
        x = args[0].clone()
        x[..., 2 * dh:3 * dh] = 0
        return (x,)

    h = ref.transformer.h[1].attn.c_proj.register_forward_pre_hook(zero_head)
    try:
        with torch.no_grad():
            expected = ref(ids).logits[:, -1]
    finally:
        h.remove()
    with torch.no_grad():
        got = eng.forward(ids, hooks={"blocks.1.attn.hook_z": intervention(
            "zero", "blocks.1.attn.hook_z", units=[2])}).logits[:, -1]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_start_layer_and_prefix_kv_reuse_match_full_run(family, tiny_engines):
    eng = tiny_engines[family]
    ids = eng.to_tokens(PROMPT)
    s = ids.shape[1]
    L = eng.spec.n_layers
    sites = [f"blocks.{l}.attn.hook_{x}" for l in range(L) for x in "kv"] + ["blocks.1.hook_resid_pre"]
    with torch.no_grad():
        full, cache = eng.run_with_cache(ids, sites)
        resumed = eng.forward(ids, start_layer=1, resid=cache["blocks.1.hook_resid_pre"])
        # last token only, reusing the keys/values of the first s-1 positions
        prefix = {l: (cache[f"blocks.{l}.attn.hook_k"][:, :-1].transpose(1, 2),
                      cache[f"blocks.{l}.attn.hook_v"][:, :-1].transpose(1, 2)) for l in range(L)}
        last = eng.forward(ids[:, -1:], position_offset=s - 1, prefix_kv=prefix)
    torch.testing.assert_close(resumed.logits, full.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(last.logits, full.logits, atol=1e-5, rtol=0)


def test_only_requested_logits(gpt2_tiny):
    ids = gpt2_tiny.to_tokens(PROMPT)
    with torch.no_grad():
        full = gpt2_tiny.forward(ids, logit_positions=None).logits
        part = gpt2_tiny.forward(ids, logit_positions=[-1, 3], logit_ids=[5, 7]).logits
    torch.testing.assert_close(part, full[:, [-1, 3]][:, :, [5, 7]])


def test_hooks_are_removed_after_exception(gpt2_tiny):
    ids = gpt2_tiny.to_tokens(PROMPT)

    def boom(x, site):
        raise RuntimeError("boom")

    for site in ["blocks.1.attn.hook_pattern", "blocks.0.mlp.hook_post", "blocks.1.hook_resid_pre"]:
        with pytest.raises(RuntimeError, match="boom"):
            gpt2_tiny.forward(ids, hooks={site: boom})
        assert gpt2_tiny.active_hook_count() == 0

    def stop(x, site):
        raise StopForward

    assert gpt2_tiny.forward(ids, hooks={"blocks.0.hook_resid_post": stop}).logits is None
    assert gpt2_tiny.active_hook_count() == 0
    with torch.no_grad():
        a = gpt2_tiny.forward(ids).logits
    assert torch.isfinite(a).all()


def test_read_only_site_refuses_a_change(gpt2_tiny):
    """ln_final.hook_scale can be read; a hook that returns a new scale gets an error, not a
    change the final norm would silently ignore."""
    ids = gpt2_tiny.to_tokens(PROMPT)
    seen = []
    with torch.no_grad():
        clean = gpt2_tiny.forward(ids).logits
        read = gpt2_tiny.forward(ids, hooks={"ln_final.hook_scale": lambda x, site: seen.append(x.shape) and None})
        torch.testing.assert_close(read.logits, clean)
        assert seen == [(1, ids.shape[1], 1)]
        with pytest.raises(TdbError, match="read only"):
            gpt2_tiny.forward(ids, hooks={"ln_final.hook_scale": lambda x, site: x * 2})
    assert gpt2_tiny.active_hook_count() == 0


def test_bad_input_errors(gpt2_tiny, tmp_path):
    with pytest.raises(UnknownSite, match="did you mean"):
        gpt2_tiny.forward(gpt2_tiny.to_tokens("a"), hooks={"blocks.0.attn.hook_zz": lambda x, s: x})
    with pytest.raises(TokenizationError, match="tokenizes as"):
        gpt2_tiny.token_id("Mary John")
    with pytest.raises(TokenizationError, match="vocabulary"):
        gpt2_tiny.token_id("Zzyzx")
    with pytest.raises(PromptTooLong, match="context is 64"):
        gpt2_tiny.to_tokens(" ".join(["the"] * 100))
    with pytest.raises(ModelNotFound, match="allow_download"):
        Engine.load("someone/not-a-local-model")
    assert gpt2_tiny.token_id(" Mary") == gpt2_tiny.token_id("Mary")


def test_concurrent_callers_get_serial_results(gpt2_tiny):
    prompts = [PROMPT, "The capital of Zorvia is", "Alice and Bob went home"]
    with torch.no_grad():
        serial = [gpt2_tiny.forward(gpt2_tiny.to_tokens(p)).logits for p in prompts]
    results: dict[int, torch.Tensor] = {}

    def work(i):
        for _ in range(5):
            hooks = {"blocks.0.attn.hook_z": intervention("zero", "blocks.0.attn.hook_z", units=[0])} if i == 0 else None
            with torch.no_grad():
                out = gpt2_tiny.forward(gpt2_tiny.to_tokens(prompts[i % 3]), hooks=hooks).logits
            if i != 0:
                results[i] = out

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, out in results.items():
        torch.testing.assert_close(out, serial[i % 3], atol=0, rtol=0)
    assert gpt2_tiny.active_hook_count() == 0


def test_bfloat16_loads_and_runs(tiny_dirs):
    eng = Engine.load(tiny_dirs["llama"], dtype="bfloat16")
    assert eng.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(eng.forward(eng.to_tokens(PROMPT)).logits.float()).all()


@pytest.mark.gpu
def test_cuda_matches_cpu(tiny_dirs):
    cpu = Engine.load(tiny_dirs["gpt2"], device="cpu")
    gpu = Engine.load(tiny_dirs["gpt2"], device="cuda")
    with torch.no_grad():
        a = cpu.forward(cpu.to_tokens(PROMPT)).logits
        b = gpu.forward(gpu.to_tokens(PROMPT)).logits
    torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=0)
