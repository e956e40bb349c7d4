"""Conformance of every supported family against plain `transformers` (eager attention)
with hand-written hooks: logits at every position, every hook site's capture, per-head
direct effects by hand, the sum check, a head's zero-ablation and trace_upstream's
reconstruction of an attention score. Tiny random models; prompts longer than every
sliding window. Nothing here reads the engine to compute an expected value."""

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from tdb_agent.ops.ablate import ablate
from tdb_agent.ops.attribute import attribute
from tdb_agent.ops.trace import trace_upstream
from tests.tiny_models import ALL_FAMILIES, model_type

PROMPT = "When Mary and John went to the store , John gave a drink to Mary and then John went"
GEMMA = ("gemma", "gemma2", "gemma3_text")
POST_NORMS = {"gemma2": ("post_attention_layernorm", "post_feedforward_layernorm"),
              "gemma3_text": ("post_attention_layernorm", "post_feedforward_layernorm"),
              "olmo2": ("post_attention_layernorm", "post_feedforward_layernorm")}
LAYERNORM = {"gpt2", "gpt_neo", "gpt_neox", "opt", "gptj", "falcon", "stablelm", "cohere"}


# ---- the plain model's modules, named by hand per family ---------------------------------
def _base(model):
    base = model.base_model
    return getattr(base, "decoder", base)  # OPT


def blocks(model):
    base = _base(model)
    return base.h if hasattr(base, "h") else base.layers


def attn_module(block):
    for name in ("attn", "attention", "self_attention", "self_attn"):
        if hasattr(block, name):
            return getattr(block, name)


def out_proj(block):
    a = attn_module(block)
    a = getattr(a, "attention", a)  # GPT-Neo wraps its self-attention
    for name in ("c_proj", "dense", "out_proj", "o_proj"):
        if hasattr(a, name):
            return getattr(a, name)


def down_proj(block):
    if not hasattr(block, "mlp"):  # OPT: fc1, activation, fc2 inline in the block
        return block.fc2
    for name in ("c_proj", "dense_4h_to_h", "fc_out", "down_proj"):
        if hasattr(block.mlp, name):
            return getattr(block.mlp, name)


def mlp_act(block):
    for owner in (getattr(block, "mlp", None), block):  # OPT keeps its activation in the block
        for name in ("act", "act_fn", "activation_fn"):
            if owner is not None and hasattr(owner, name):
                return getattr(owner, name)


def token_embedding(model):
    base = _base(model)
    for name in ("wte", "embed_in", "embed_tokens", "word_embeddings"):
        if hasattr(base, name):
            return getattr(base, name)


def final_norm(model):
    base = _base(model)
    for name in ("ln_f", "final_layer_norm", "norm"):
        if hasattr(base, name):
            return getattr(base, name)


def writers(family, block):
    """The modules whose outputs are what attention and MLP add to the residual stream."""
    family = model_type(family)
    if family in POST_NORMS:
        return [getattr(block, n) for n in POST_NORMS[family]]
    return [attn_module(block), getattr(block, "mlp", None) or block.fc2]


@pytest.fixture(scope="module")
def plain(tiny_dirs):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = AutoModelForCausalLM.from_pretrained(tiny_dirs[family], dtype=torch.float32,
                                                                 attn_implementation="eager").eval()
        return cache[family]
    return get


def capture(model, family, ids):
    """A plain forward recording block inputs/outputs, what attention and MLP write, the
    input of each output projection (z) and of each down projection (MLP post), patterns."""
    store, handles = {}, []

    def keep(key, pre=False):
        def hook(mod, args, out=None):
            x = args[0] if pre else (out[0] if isinstance(out, tuple) else out)
            store[key] = x.detach().clone()
        return hook
    for l, block in enumerate(blocks(model)):
        handles.append(block.register_forward_pre_hook(keep(f"blocks.{l}.hook_resid_pre", pre=True)))
        handles.append(block.register_forward_hook(keep(f"blocks.{l}.hook_resid_post")))
        attn_w, mlp_w = writers(family, block)
        handles.append(attn_w.register_forward_hook(keep(f"blocks.{l}.hook_attn_out")))
        handles.append(mlp_w.register_forward_hook(keep(f"blocks.{l}.hook_mlp_out")))
        handles.append(out_proj(block).register_forward_pre_hook(keep(f"blocks.{l}.z", pre=True)))
        handles.append(down_proj(block).register_forward_pre_hook(keep(f"blocks.{l}.mlp.hook_post", pre=True)))
        handles.append(out_proj(block).register_forward_hook(keep(f"blocks.{l}.attn_raw")))
        handles.append(mlp_act(block).register_forward_pre_hook(keep(f"blocks.{l}.mlp.hook_pre", pre=True)))
        mlp_first = getattr(block, "mlp", None) or block.fc1  # OPT: fc1, inline in the block
        handles.append(mlp_first.register_forward_pre_hook(keep(f"blocks.{l}.ln2.hook_normalized", pre=True)))
    handles.append(token_embedding(model).register_forward_hook(keep("hook_embed")))
    handles.append(final_norm(model).register_forward_pre_hook(keep("hook_resid_final", pre=True)))
    try:
        with torch.no_grad():
            out = model(ids, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    store["logits"] = out.logits
    for l, a in enumerate(out.attentions):
        store[f"blocks.{l}.attn.hook_pattern"] = a
    return store


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_forward_and_every_site_match_plain_transformers(family, tiny_engines, plain):
    eng, model = tiny_engines[family], plain(family)
    ids = eng.to_tokens(PROMPT)
    ref = capture(model, family, ids)
    with torch.no_grad():
        got = eng.forward(ids, logit_positions=None).logits
        out, cache = eng.run_with_cache(ids, eng.site_names(), logit_positions=None)
    torch.testing.assert_close(got, ref["logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits, ref["logits"], atol=1e-5, rtol=0)
    sites = ["hook_embed", "hook_resid_final"]
    for l in range(eng.spec.n_layers):
        sites += [f"blocks.{l}.{s}" for s in ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
                                              "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_post",
                                              "attn.hook_pattern")]
        torch.testing.assert_close(cache[f"blocks.{l}.attn.hook_z"].flatten(2), ref[f"blocks.{l}.z"], atol=1e-5,
                                   rtol=0)
        if not eng.spec.parallel_residual:  # between attention and MLP: input + what attention wrote
            mid = ref[f"blocks.{l}.hook_resid_pre"] + ref[f"blocks.{l}.hook_attn_out"]
            torch.testing.assert_close(cache[f"blocks.{l}.hook_resid_mid"], mid, atol=1e-5, rtol=0)
    for s in sites:
        # (OPT's plain block flattens positions inside the MLP: same numbers, [b*s, ...])
        torch.testing.assert_close(cache[s].reshape(ref[s].shape), ref[s], atol=1e-5, rtol=0,
                                   msg=lambda m, s=s: f"{s}: {m}")
    assert eng.active_hook_count() == 0


def attention_inputs(model, family, ids, monkeypatch):
    """q, k, v of every layer as the plain model hands them to its own eager attention
    ([b, heads, pos, d_head]: projections, q/k norms and rotary applied by transformers'
    code), with the scaling and soft-cap it passes; and its attention patterns."""
    seen = []
    if model_type(family) == "gpt_neo":  # its _attn takes unscaled q, k, v
        cls = type(attn_module(blocks(model)[0]).attention)
        orig = cls._attn

        def record_neo(self, q, k, v, mask=None):
            seen.append(dict(q=q, k=k, v=v, scaling=1.0, softcap=None))
            return orig(self, q, k, v, mask)
        monkeypatch.setattr(cls, "_attn", record_neo)
    else:
        ns = sys.modules[type(model).__module__]
        eager = ns.eager_attention_forward

        def record(module, q, k, v, mask, **kw):
            seen.append(dict(q=q, k=k, v=v, scaling=kw["scaling"], softcap=kw.get("softcap")))
            return eager(module, q, k, v, mask, **kw)
        monkeypatch.setattr(ns, "eager_attention_forward", record)
    try:
        with torch.no_grad():
            patterns = model(ids, output_attentions=True).attentions
    finally:
        monkeypatch.undo()
    return seen, patterns


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_q_k_v_and_scores_match_the_plain_models_attention(family, tiny_engines, plain, monkeypatch):
    """hook_q/k/v are the plain model's own q, k, v (GQA keys not repeated); the scores are
    q·k by hand, times the model's scaling, soft-capped, -inf exactly where it masks."""
    eng, model = tiny_engines[family], plain(family)
    ids = eng.to_tokens(PROMPT)
    ref, patterns = attention_inputs(model, family, ids, monkeypatch)
    assert len(ref) == eng.spec.n_layers
    sites = [f"blocks.{l}.attn.{s}" for l in range(eng.spec.n_layers)
             for s in ("hook_q", "hook_k", "hook_v", "hook_attn_scores")]
    with torch.no_grad():
        _, cache = eng.run_with_cache(ids, sites)
    for l, r in enumerate(ref):
        p = f"blocks.{l}.attn."
        for name in ("q", "k", "v"):
            torch.testing.assert_close(cache[p + "hook_" + name], r[name].transpose(1, 2), atol=1e-5, rtol=0,
                                       msg=lambda m, n=name: f"L{l} {n}: {m}")
        k = r["k"].repeat_interleave(r["q"].shape[1] // r["k"].shape[1], dim=1)
        scores = (r["q"] @ k.transpose(-1, -2)) * r["scaling"]
        if r["softcap"]:
            scores = torch.tanh(scores / r["softcap"]) * r["softcap"]
        got, shown = cache[p + "hook_attn_scores"], patterns[l] > 0
        assert torch.equal(got.isneginf(), ~shown), l  # masked exactly where the model masks (windows too)
        torch.testing.assert_close(got[shown], scores[shown], atol=1e-5, rtol=0)


def _hand_gradient(family, model, x, t, d):
    """∂(logit[t] − logit[d])/∂x at the final residual x, the final norm's scale frozen,
    through the logit scale and soft-cap of the family: written out by hand."""
    family = model_type(family)
    norm, head = final_norm(model), model.get_output_embeddings()
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon")
    x = x.detach().clone().requires_grad_(True)
    if family in LAYERNORM:
        c = x - x.mean()
        y = c * torch.rsqrt(c.pow(2).mean() + eps).detach()
    else:
        y = x * torch.rsqrt(x.pow(2).mean() + eps).detach()
    y = y * (norm.weight + (1.0 if family in GEMMA else 0.0))
    if getattr(norm, "bias", None) is not None:
        y = y + norm.bias
    logits = head(y) * getattr(model.config, "logit_scale", 1.0)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    metric = logits[t] - logits[d]
    (g,) = torch.autograd.grad(metric, x)
    return g


def _post_factor(family, block, raw):
    """What the frozen post-norm after attention multiplies the raw output by (1 without one)."""
    family = model_type(family)
    if family not in POST_NORMS:
        return torch.ones(())
    norm = getattr(block, POST_NORMS[family][0])
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon")
    gain = norm.weight + (1.0 if family in GEMMA else 0.0)
    return torch.rsqrt(raw.pow(2).mean() + eps) * gain


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_direct_effects_by_hand_and_the_sum_check(family, tiny_engines, plain):
    eng, model = tiny_engines[family], plain(family)
    ids = eng.to_tokens(PROMPT)
    t, d = eng.token_id("Mary"), eng.token_id("John")
    ref = capture(model, family, ids)
    g = _hand_gradient(family, model, ref["hook_resid_final"][0, -1], t, d)
    r = attribute(eng, PROMPT, "Mary", "John", kinds=["head", "neuron", "emb"], top_k=None)
    assert r.metric == pytest.approx((ref["logits"][0, -1, t] - ref["logits"][0, -1, d]).item(), abs=1e-5)
    assert r.sum_check == pytest.approx(r.metric, abs=1e-4)
    effects = {row.id: row.effect for row in r.rows}
    n_heads = model.config.num_attention_heads
    for l, block in enumerate(blocks(model)):
        z = ref[f"blocks.{l}.z"][0, -1]  # [h * d_head]
        dh = z.numel() // n_heads
        proj = out_proj(block)
        f = _post_factor(family, block, ref[f"blocks.{l}.attn_raw"][0, -1])
        with torch.no_grad():
            for h in range(n_heads):
                only = torch.zeros_like(z)
                only[h * dh:(h + 1) * dh] = z[h * dh:(h + 1) * dh]
                write = (proj(only) - proj(torch.zeros_like(z))) * f  # the head's write, bias removed
                assert effects[f"L{l}.H{h}"] == pytest.approx((write @ g).item(), abs=1e-5), (l, h)
    if family == "gemma2":  # the soft-cap leaves a nonlinear remainder, named
        assert "final_norm_bias_and_softcap_nonlinearity" in r.remainder


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_zero_ablating_a_head_matches_a_hand_written_hook(family, tiny_engines, plain):
    eng, model = tiny_engines[family], plain(family)
    ids = eng.to_tokens(PROMPT)
    t, d = eng.token_id("Mary"), eng.token_id("John")
    proj = out_proj(blocks(model)[1])
    dh = proj.weight.shape[0 if family == "gpt2" else 1] // model.config.num_attention_heads

    def zero_head(mod, args):
        x = args[0].clone()
        x[..., 2 * dh:3 * dh] = 0
        return (x,) + args[1:]

    def diff():
        with torch.no_grad():
            logits = model(ids).logits[0, -1]
        return (logits[t] - logits[d]).item()
    before = diff()
    handle = proj.register_forward_pre_hook(zero_head)
    try:
        after = diff()
    finally:
        handle.remove()
    r = ablate(eng, PROMPT, ["L1.H2"], "Mary", "John", mode="zero")
    assert r.before == pytest.approx(before, abs=1e-5)
    assert r.after == pytest.approx(after, abs=1e-5)
    assert r.delta == pytest.approx(after - before, abs=1e-5)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_trace_reconstructs_an_attention_score(family, tiny_engines):
    """Edges + unattributed terms = the score, and the score is the one the pattern came from."""
    eng = tiny_engines[family]
    ids = eng.to_tokens(PROMPT)
    q = ids.shape[1] - 1
    with torch.no_grad():
        _, cache = eng.run_with_cache(ids, ["blocks.1.attn.hook_attn_scores"])
    k = q - 2  # inside every sliding window of the tiny models
    for via in ("q", "k"):
        r = trace_upstream(eng, PROMPT, f"L1.H1@{q}", via=via, key_position=k, top_k=None)
        assert r.value == pytest.approx(cache["blocks.1.attn.hook_attn_scores"][0, 1, q, k].item(), abs=1e-5)
        assert r.sum_of_edges[via] + sum(r.unattributed.values()) == pytest.approx(r.value, abs=1e-4)


def test_half_precision_accumulates_in_float32(tmp_path):
    """A tiny Llama whose weights are exact in bfloat16, run in float32 and in bfloat16: the
    bf16 run's logits, ablation deltas and direct effects are float32 numbers within 1% of
    the float32 run's (of the largest). Before: bf16 logits, deltas off by 8% of the
    largest; with float32 metrics 1.7%, nearly all of it the residual stream's own bf16
    rounding at every add; with the residual stream in float32 (engine/precision.py) 0.56%,
    what is left being the blocks' bf16 matmuls and activations."""
    from tdb_agent.engine import Engine
    from tdb_agent.ops.ablate import ablation_sweep
    from tdb_agent.ops.basic import model_info
    from tests.tiny_models import build_tiny

    d = build_tiny("llama", tmp_path / "llama", dtype=torch.bfloat16)
    e32, e16 = Engine.load(d), Engine.load(d, dtype="bfloat16")
    prompt = "When Mary and John went to the store , John gave a drink to"
    assert e16.forward(e16.to_tokens(prompt)).logits.dtype == torch.float32
    assert "bfloat16" in model_info(e16).precision and "residual stream" in model_info(e16).precision
    with torch.no_grad():  # the stream between blocks is float32, each block computes in bf16
        _, cache = e16.run_with_cache(e16.to_tokens(prompt), ["blocks.1.hook_resid_pre", "blocks.1.attn.hook_z"])
    assert cache["blocks.1.hook_resid_pre"].dtype == torch.float32
    assert cache["blocks.1.attn.hook_z"].dtype == torch.bfloat16 and e16.active_hook_count() == 0
    a = {r.id: r.delta for r in ablation_sweep(e32, prompt, "head", "Mary", "John", top_k=None).rows}
    b = {r.id: r.delta for r in ablation_sweep(e16, prompt, "head", "Mary", "John", top_k=None).rows}
    largest = max(abs(v) for v in a.values())
    assert max(abs(a[k] - b[k]) for k in a) < 0.01 * largest
    ra = {r.id: r.effect for r in attribute(e32, prompt, "Mary", "John", kinds=["head"], top_k=None).rows}
    rb = attribute(e16, prompt, "Mary", "John", kinds=["head"], top_k=None)
    assert max(abs(ra[r.id] - r.effect) for r in rb.rows) < 0.01 * max(abs(v) for v in ra.values())
    assert rb.sum_check == pytest.approx(rb.metric, abs=1e-2)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_trace_via_values_reconstructs_the_heads_direct_effect(family, tiny_engines):
    """via v: the head's direct effect at the last position (through any frozen post-norm)
    = edges + unattributed, and equals what `attribute` reports for that head."""
    eng = tiny_engines[family]
    r = trace_upstream(eng, PROMPT, "L1.H1", via="v", target="Mary", distractor="John", top_k=None)
    assert r.sum_of_edges["v"] + sum(r.unattributed.values()) == pytest.approx(r.value, abs=1e-4)
    de = {row.id: row.effect for row in attribute(eng, PROMPT, "Mary", "John", kinds=["head"], top_k=None).rows}
    assert r.value == pytest.approx(de["L1.H1"], abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_end_to_end_serve_discover_build_dataset(family, tiny_dirs, plain, tmp_path):
    """A new user's path on every family: `tdb-agent serve --model DIR` answers predict /
    attribute / ablate over the SDK's stdio client (a subprocess), `tdb-agent discover`
    finds an IOI circuit and `tdb-agent build-dataset` writes a dataset (in process)."""
    import asyncio
    import json

    from mcp import Client

    from tdb_agent.cli import main
    from tests.test_server_stdio import _params

    model = plain(family)

    async def served():
        async with Client(_params(tiny_dirs[family], tmp_path / "ws"), read_timeout_seconds=120) as c:
            info = (await c.call_tool("model_info", {})).structured_content
            assert info["spec"]["architecture"] == type(model).__name__
            assert info["precision"] == "float32 throughout"
            args = {"prompt": PROMPT, "target": "Mary", "distractor": "John"}
            pred = await c.call_tool("predict", args | {"top_k": 3})
            assert not pred.is_error, pred
            attr = (await c.call_tool("attribute", args)).structured_content
            assert attr["sum_check"] == pytest.approx(attr["metric"], abs=1e-4)
            abl = await c.call_tool("ablate", args | {"components": ["L1.H2"]})
            assert not abl.is_error, abl
            return attr["metric"], abl.structured_content

    metric, abl = asyncio.run(served())
    tok = _tokenizer(tiny_dirs[family])
    one = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    ids = torch.tensor([[tok.bos_token_id] + one(PROMPT)])
    with torch.no_grad():  # the served numbers are the plain model's
        logits = model(ids).logits[0, -1]
    (t,), (d,) = one("Mary"), one("John")
    assert metric == pytest.approx((logits[t] - logits[d]).item(), abs=1e-5)
    assert abl["before"] == pytest.approx(metric, abs=1e-5)

    run = tmp_path / "run"
    assert main(["discover", "--task", "ioi", "--model", str(tiny_dirs[family]), "--out", str(run)]) == 0
    graph = json.loads((run / "graph.json").read_text())
    assert len(graph["nodes"]) > 1 and graph["graph"]["validation"]["faithfulness"] is not None
    assert (run / "report.md").exists()

    ds = tmp_path / "ds"
    assert main(["build-dataset", "--model", str(tiny_dirs[family]), "--out", str(ds), "--corpus-docs", "24",
                 "--no-bundled-saes", "--top-k", "4", "--n-random", "2"]) == 0
    manifest = json.loads((ds / "manifest.json").read_text())
    n_layers = model.config.num_hidden_layers
    assert manifest["n_components"] >= n_layers * model.config.num_attention_heads and manifest["n_tokens"] > 0


def _tokenizer(folder):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(folder)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_trace_reconstructs_a_neurons_preactivation(family, tiny_engines):
    eng = tiny_engines[family]
    ids = eng.to_tokens(PROMPT)
    with torch.no_grad():
        _, cache = eng.run_with_cache(ids, ["blocks.1.mlp.hook_pre"])
    t = ids.shape[1] - 3
    r = trace_upstream(eng, PROMPT, f"L1.N5@{t}", top_k=None)
    assert r.value == pytest.approx(cache["blocks.1.mlp.hook_pre"][0, t, 5].item(), abs=1e-5)
    assert r.sum_of_edges["direct"] + sum(r.unattributed.values()) == pytest.approx(r.value, abs=1e-4)
