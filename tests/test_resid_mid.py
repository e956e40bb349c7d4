"""blocks.{l}.hook_resid_mid carries a change forward (TransformerLens semantics): the MLP
reads the hooked stream and the block adds its output to it, resid_post = resid_mid (as
hooked) + mlp_out. Checked on every sequential-block family (post-norm Gemma-2/3 and
OLMo-2 included) against the plain `transformers` model with a hand-written hook on what
attention writes (resid_mid = resid_pre + attn_out, so a change there is a change of
resid_mid that the plain block itself carries into both paths). Found during issue #14."""

import pytest
import torch

from tdb_agent.engine import Engine
from tdb_agent.engine.interventions import intervention
from tdb_agent.errors import TdbError, UnknownSite
from tests.test_families import PROMPT, blocks, plain, writers  # noqa: F401 (plain: a fixture)
from tests.tiny_models import ALL_FAMILIES, build_tiny

CORRUPT = "When Anna and Peter went to the store , Peter gave a drink to Anna and then Peter went"
PARALLEL = {"gpt_neox", "gptj", "falcon", "falcon:new", "cohere", "stablelm:parallel"}  # one input for both
SEQUENTIAL = [f for f in ALL_FAMILIES if f not in PARALLEL]


def plain_run(model, family, ids, layer, edit=None):
    """Logits [s, vocab] and block `layer`'s input and output of the plain model; `edit(out,
    resid_pre)` rewrites what attention writes into the residual stream at that layer."""
    block = blocks(model)[layer]
    seen = {}

    def pre(mod, args, kwargs):
        seen["pre"] = (args[0] if args else kwargs["hidden_states"]).clone()

    def post(mod, args, out):
        seen["post"] = (out[0] if isinstance(out, tuple) else out).clone()

    def write(mod, args, out):
        first = out[0] if isinstance(out, tuple) else out
        seen["attn_out"] = first.clone()
        new = edit(first, seen["pre"]) if edit else first
        return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new

    handles = [block.register_forward_pre_hook(pre, with_kwargs=True), block.register_forward_hook(post),
               writers(family, block)[0].register_forward_hook(write)]
    try:
        with torch.no_grad():
            logits = model(ids).logits[0]
    finally:
        for h in handles:
            h.remove()
    return logits, seen


def sites(layer):
    p = f"blocks.{layer}."
    return [p + "hook_resid_mid", p + "hook_mlp_out", p + "hook_resid_post"]


@pytest.mark.parametrize("family", SEQUENTIAL)
def test_adding_at_resid_mid_reaches_the_mlp_and_resid_post(family, tiny_engines, plain):
    eng, model = tiny_engines[family], plain(family)
    ids = eng.to_tokens(PROMPT)
    v = torch.randn(eng.spec.d_model, generator=torch.Generator().manual_seed(1)) * 5
    for layer in range(eng.spec.n_layers):
        mid = f"blocks.{layer}.hook_resid_mid"
        with torch.no_grad():
            out, c = eng.run_with_cache(ids, sites(layer), hooks={mid: intervention("add", mid, value=v)},
                                        logit_positions=None)
            _, clean = eng.run_with_cache(ids, sites(layer))
        p = f"blocks.{layer}."
        # the sum the block makes, with the hooked stream (it was off by exactly v before)
        torch.testing.assert_close(c[p + "hook_resid_post"], c[mid] + c[p + "hook_mlp_out"], atol=1e-5, rtol=0)
        torch.testing.assert_close(c[mid], clean[mid] + v, atol=1e-5, rtol=0)
        shift = c[p + "hook_resid_post"] - clean[p + "hook_resid_post"]
        torch.testing.assert_close(shift, v + c[p + "hook_mlp_out"] - clean[p + "hook_mlp_out"], atol=1e-4, rtol=0)
        ref_logits, ref = plain_run(model, family, ids, layer, edit=lambda o, pre: o + v)
        torch.testing.assert_close(c[p + "hook_resid_post"], ref["post"], atol=1e-5, rtol=0)
        torch.testing.assert_close(out.logits[0], ref_logits, atol=1e-4, rtol=0)
    assert eng.active_hook_count() == 0


@pytest.mark.parametrize("family", SEQUENTIAL)
def test_patching_resid_mid_from_another_run_matches_the_plain_model(family, tiny_engines, plain):
    eng, model = tiny_engines[family], plain(family)
    ids, corrupt = eng.to_tokens(PROMPT), eng.to_tokens(CORRUPT)
    assert ids.shape == corrupt.shape
    layer, positions = eng.spec.n_layers - 1, [2, 5, ids.shape[1] - 1]
    mid = f"blocks.{layer}.hook_resid_mid"
    with torch.no_grad():
        _, cc = eng.run_with_cache(corrupt, [mid])
        out = eng.forward(ids, hooks={mid: intervention("patch", mid, positions=positions, value=cc[mid])},
                          logit_positions=None)
    # by hand: the corrupted run's resid_mid = its resid_pre + what its attention wrote
    _, rc = plain_run(model, family, corrupt, layer)
    mid_b = rc["pre"] + rc["attn_out"]

    def patch(o, pre):
        o = o.clone()
        o[:, positions] = mid_b[:, positions] - pre[:, positions]  # the block adds pre back: mid = mid_b
        return o
    ref_logits, _ = plain_run(model, family, ids, layer, edit=patch)
    clean_logits, _ = plain_run(model, family, ids, layer)
    torch.testing.assert_close(out.logits[0], ref_logits, atol=1e-4, rtol=0)
    changed = (ref_logits - clean_logits).abs().amax(-1)
    assert changed[positions].min() > 1e-3  # the patch reaches the logits at every patched position
    assert changed[: positions[0]].max() == 0  # and nothing before the first (causal)


@pytest.mark.parametrize("family", SEQUENTIAL)
def test_clean_logits_unchanged_by_hooks_that_change_nothing(family, tiny_engines, plain):
    eng, model = tiny_engines[family], plain(family)
    ids = eng.to_tokens(PROMPT)
    kept = {}

    def keep(x, site):
        kept[site] = x

    def same(x, site):
        return x * 1.0  # a new tensor with the same values
    mids = {f"blocks.{l}.hook_resid_mid": [keep, same] for l in range(eng.spec.n_layers)}
    with torch.no_grad():
        bare = eng.forward(ids, logit_positions=None).logits
        hooked = eng.forward(ids, hooks=mids, logit_positions=None).logits
    assert torch.equal(hooked, bare)
    ref_logits, _ = plain_run(model, family, ids, 0)
    torch.testing.assert_close(bare[0], ref_logits, atol=1e-5, rtol=0)
    assert len(kept) == eng.spec.n_layers


def test_hooks_keep_what_they_saw_and_gradients_take_both_paths(tiny_engines):
    eng = tiny_engines["llama"]
    ids = eng.to_tokens(PROMPT)
    mid, attn_out = "blocks.0.hook_resid_mid", "blocks.0.hook_attn_out"
    kept = {}

    def keep(x, site):
        kept["x"] = x
    with torch.no_grad():
        _, clean = eng.run_with_cache(ids, [mid])
        eng.forward(ids, hooks={mid: [keep, intervention("zero", mid)]})
    assert torch.equal(kept["x"], clean[mid])  # a capture before an intervention is not rewritten
    with pytest.raises(TdbError, match="must keep the residual stream's shape"):
        eng.forward(ids, hooks={mid: lambda x, s: x.expand(3, -1, -1)})
    assert eng.active_hook_count() == 0

    def grad_at(site):
        box = {}

        def leaf(x, _):
            box["leaf"] = x.detach().clone().requires_grad_(True)
            return box["leaf"]
        with torch.enable_grad():
            logit = eng.forward(ids, hooks={site: leaf}).logits[0, -1, 7]
            return torch.autograd.grad(logit, box["leaf"])[0]
    # resid_mid = resid_pre + attn_out: the same gradient (through the MLP and the residual)
    torch.testing.assert_close(grad_at(mid), grad_at(attn_out), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "olmo2", "gemma2"])
def test_half_precision_resid_mid_is_the_float32_stream(family, tmp_path):
    eng = Engine.load(build_tiny(family, tmp_path / family, dtype=torch.bfloat16), dtype="bfloat16")
    ids = eng.to_tokens(PROMPT)
    p, mid = "blocks.0.", "blocks.0.hook_resid_mid"
    names = [p + "hook_resid_pre", p + "hook_attn_out"] + sites(0)
    with torch.no_grad():
        _, c = eng.run_with_cache(ids, names)
        _, a = eng.run_with_cache(ids, names, hooks={mid: intervention("add", mid, value=torch.ones(1))})
    assert c[p + "hook_resid_mid"].dtype == c[p + "hook_resid_pre"].dtype == c[p + "hook_resid_post"].dtype \
        == torch.float32
    # the block's own float32 adds, redone by hand: bit for bit
    assert torch.equal(c[p + "hook_resid_mid"], c[p + "hook_resid_pre"] + c[p + "hook_attn_out"])
    assert torch.equal(a[p + "hook_resid_mid"], c[p + "hook_resid_mid"] + 1)
    assert torch.equal(a[p + "hook_resid_post"], a[p + "hook_resid_mid"] + a[p + "hook_mlp_out"])


@pytest.mark.parametrize("family", sorted(PARALLEL))
def test_parallel_blocks_have_no_resid_mid_and_say_why(family, tiny_engines):
    eng = tiny_engines[family]
    assert eng.spec.parallel_residual
    with pytest.raises(UnknownSite, match="in parallel on the same input.*hook_resid_pre"):
        eng.forward(eng.to_tokens(PROMPT), hooks={"blocks.0.hook_resid_mid": lambda x, s: x})
    with pytest.raises(UnknownSite, match="did you mean"):
        eng.check_site("blocks.0.hook_resid_mod")


@pytest.mark.parametrize("family", ["llama", "olmo2"])
def test_the_mlp_input_site_feeds_the_mlp_alone(family, tiny_engines):
    """ln2.hook_normalized (OLMo-2: on the same module as resid_mid, no norm) is the MLP's
    input only: a change there leaves the residual stream at resid_mid."""
    eng = tiny_engines[family]
    ids = eng.to_tokens(PROMPT)
    p = "blocks.0."
    with torch.no_grad():
        _, clean = eng.run_with_cache(ids, sites(0))
        _, c = eng.run_with_cache(ids, sites(0), hooks={p + "ln2.hook_normalized": lambda x, s: x + 3})
    assert torch.equal(c[p + "hook_resid_mid"], clean[p + "hook_resid_mid"])
    assert (c[p + "hook_mlp_out"] - clean[p + "hook_mlp_out"]).abs().max() > 1e-3
    torch.testing.assert_close(c[p + "hook_resid_post"], clean[p + "hook_resid_mid"] + c[p + "hook_mlp_out"],
                               atol=1e-6, rtol=0)
