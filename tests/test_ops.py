"""Attribution, ablation, sweeps and patching against independent computations on plain
`transformers` models with hand-written hooks."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tdb_agent.errors import TdbError, TokenizationError, UnknownComponent
from tdb_agent.ops.ablate import ablate, ablation_sweep, patch
from tdb_agent.ops.attribute import attribute
from tdb_agent.ops.decompose import frozen_norms
from tdb_agent.ops.runs import RunCache
from tests.reference_hooks import capture_plain, last_logit_diff, plain_hooks
from tests.tiny_models import FAMILIES

PROMPT = "When Mary and John went to the store , John gave a drink to"
CORRUPT = "When Mary and John went to the store , Tom gave a drink to"


@pytest.fixture(scope="module")
def plain(tiny_dirs):
    return {f: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for f, d in tiny_dirs.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_direct_effects_add_up_to_the_metric(family, tiny_engines):
    eng = tiny_engines[family]
    r = attribute(eng, PROMPT, "Mary", "John", kinds=["head", "neuron", "emb"], top_k=None)
    ld = eng.forward(eng.to_tokens(PROMPT), logit_ids=[eng.token_id("Mary"), eng.token_id("John")]).logits[0, -1]
    assert r.metric == pytest.approx((ld[0] - ld[1]).item(), abs=1e-5)
    assert r.sum_check == pytest.approx(r.metric, abs=1e-4)
    assert sum(x.effect for x in r.rows) == pytest.approx(r.total_effect, abs=1e-4)
    assert r.n_ranked == eng.spec.n_layers * (eng.spec.n_heads + eng.spec.d_mlp) + 1


def test_direct_effect_of_a_head_by_hand(gpt2_tiny, plain):
    """DE of L1.H2 = (z·W_O at the last position) · s·center(w ⊙ (W_U[:,t] − W_U[:,d])), computed
    from a plain GPT-2 forward with hand-written hooks."""
    model = plain["gpt2"]
    ids = gpt2_tiny.to_tokens(PROMPT)
    t, d = gpt2_tiny.token_id("Mary"), gpt2_tiny.token_id("John")
    final = {}
    h = model.transformer.ln_f.register_forward_pre_hook(lambda m, a: final.__setitem__("x", a[0].detach()))
    try:
        with capture_plain(model, [("head", 1)]) as z, torch.no_grad():
            model(ids)
    finally:
        h.remove()
    x = final["x"][0, -1]
    ln = model.transformer.ln_f
    s = 1 / torch.sqrt(x.var(unbiased=False) + ln.eps)
    u = model.lm_head.weight[t] - model.lm_head.weight[d]
    wu = ln.weight * u
    g = s * (wu - wu.mean())
    dh = model.config.n_embd // model.config.n_head
    zh = z[("head", 1)][0, -1, 2 * dh:3 * dh]
    write = zh @ model.transformer.h[1].attn.c_proj.weight[2 * dh:3 * dh]
    expected = (write @ g).item()
    r = attribute(gpt2_tiny, PROMPT, "Mary", "John", kinds=["head"], top_k=None)
    got = next(x.effect for x in r.rows if x.id == "L1.H2")
    assert got == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("mode", ["zero", "resample"])
def test_ablate_matches_plain_hooks(family, mode, tiny_engines, plain):
    eng, model = tiny_engines[family], plain[family]
    t, d = eng.token_id("Mary"), eng.token_id("John")
    ids, cids = eng.to_tokens(PROMPT), eng.to_tokens(CORRUPT)
    with capture_plain(model, [("head", 0), ("neuron", 1)]) as corrupted, torch.no_grad():
        model(cids)
    dh = eng.spec.d_head

    def repl(kind, layer, unit, pos=None):
        def fn(old):
            if mode == "zero":
                new = torch.zeros_like(old)
            else:
                src = corrupted[(kind, layer)][0]
                new = src[..., unit * dh:(unit + 1) * dh] if kind == "head" else src[..., unit]
            if pos is None:
                return new
            out = old.clone()
            out[:, pos] = new[pos] if new.dim() == old.dim() - 1 else new[:, pos]
            return out
        return fn

    edits = [("head", 0, 1, repl("head", 0, 1)), ("neuron", 1, 5, repl("neuron", 1, 5, pos=3))]
    with plain_hooks(model, edits):
        expected = last_logit_diff(model, ids, t, d)
    r = ablate(eng, PROMPT, ["L0.H1", "L1.N5@3"], "Mary", "John", mode=mode, corrupted_prompt=CORRUPT)
    assert r.after == pytest.approx(expected, abs=1e-5)
    assert r.delta == pytest.approx(expected - last_logit_diff(model, ids, t, d), abs=1e-5)


def _brute_force_sweep(eng, model, kind, positions, mode="zero"):
    t, d = eng.token_id("Mary"), eng.token_id("John")
    ids = eng.to_tokens(PROMPT)
    s = ids.shape[1]
    clean = last_logit_diff(model, ids, t, d)
    units = {"head": eng.spec.n_heads, "neuron": eng.spec.d_mlp, "attn": 1, "mlp": 1}[kind]
    out = {}
    for layer in range(eng.spec.n_layers):
        # every head and block; a spread of neurons (a plain forward each is slow)
        for u in (range(units) if kind != "neuron" else range(layer, units, max(1, units // 10))):
            def fn(old):
                new = old.clone()
                if positions == "last":
                    new[:, s - 1] = 0
                else:
                    new[:] = 0
                return new
            with plain_hooks(model, [(kind, layer, u, fn)]):
                cid = {"head": f"L{layer}.H{u}", "neuron": f"L{layer}.N{u}", "attn": f"L{layer}.ATTN",
                       "mlp": f"L{layer}.MLP"}[kind]
                out[cid] = last_logit_diff(model, ids, t, d) - clean
    return out


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "mistral"])
@pytest.mark.parametrize("kind", ["head", "neuron", "attn", "mlp"])
@pytest.mark.parametrize("positions", ["all", "last"])
def test_sweep_matches_brute_force(family, kind, positions, tiny_engines, plain):
    eng, model = tiny_engines[family], plain[family]
    expected = _brute_force_sweep(eng, model, kind, positions)
    r = ablation_sweep(eng, PROMPT, kind, "Mary", "John", positions=positions, batch_size=48)
    got = {row.id: row.delta for row in r.rows}
    assert len(got) == r.n_components and set(expected) <= set(got)
    for cid, v in expected.items():
        assert got[cid] == pytest.approx(v, abs=1e-5), cid
    deltas = [abs(row.delta) for row in r.rows]
    assert deltas == sorted(deltas, reverse=True)


def test_sweep_mean_and_resample_match_single_ablations(gpt2_tiny):
    for mode in ("mean", "resample"):
        r = ablation_sweep(gpt2_tiny, PROMPT, "head", "Mary", "John", mode=mode, corrupted_prompt=CORRUPT,
                           positions=[3, 14])
        for row in r.rows[:4]:
            single = ablate(gpt2_tiny, PROMPT, [f"{row.id}@3", f"{row.id}@14"], "Mary", "John", mode=mode,
                            corrupted_prompt=CORRUPT)
            assert row.delta == pytest.approx(single.delta, abs=1e-5)


def test_act_times_grad_is_exact_where_the_model_is_linear(gpt2_tiny):
    """With the final norm's scale frozen the metric is linear in the last layer's neurons, so
    act x grad with the corrupted reference equals the true effect of patching each neuron."""
    eng = gpt2_tiny
    last = eng.spec.n_layers - 1
    with frozen_norms(eng, [eng.adapter.final_norm()]):
        r = attribute(eng, PROMPT, "Mary", "John", method="act_times_grad", corrupted_prompt=CORRUPT,
                      kinds=["neuron"], top_k=None)
        rows = [x for x in r.rows if x.layer == last][:5]
        for row in rows:
            p = patch(eng, PROMPT, CORRUPT, [row.id], "Mary", "John", direction="noise")
            assert row.effect == pytest.approx(p.metric_clean - p.metric_patched, abs=1e-4)


def test_patch_fractions(gpt2_tiny, plain):
    full = patch(gpt2_tiny, PROMPT, CORRUPT, ["EMB"], "Mary", "John")
    assert full.metric_patched == pytest.approx(full.metric_clean, abs=1e-5)
    assert full.fraction_restored == pytest.approx(1.0, abs=1e-2)
    none = patch(gpt2_tiny, PROMPT, CORRUPT, ["EMB"], "Mary", "John", direction="noise")
    assert none.metric_patched == pytest.approx(none.metric_corrupted, abs=1e-5)
    # one head, denoising, against plain hooks
    model, eng = plain["gpt2"], gpt2_tiny
    ids, cids = eng.to_tokens(PROMPT), eng.to_tokens(CORRUPT)
    with capture_plain(model, [("head", 1)]) as clean, torch.no_grad():
        model(ids)
    dh = eng.spec.d_head
    with plain_hooks(model, [("head", 1, 3, lambda old: clean[("head", 1)][..., 3 * dh:4 * dh])]):
        expected = last_logit_diff(model, cids, eng.token_id("Mary"), eng.token_id("John"))
    assert patch(eng, PROMPT, CORRUPT, ["L1.H3"], "Mary", "John").metric_patched == pytest.approx(expected, abs=1e-5)


def test_cache_gives_identical_results(gpt2_tiny):
    cache = RunCache(gpt2_tiny, max_runs=2)
    for _ in range(2):
        a = attribute(gpt2_tiny, PROMPT, "Mary", "John", cache=cache).model_dump()
        b = attribute(gpt2_tiny, PROMPT, "Mary", "John").model_dump()
        assert a == b
        a = ablation_sweep(gpt2_tiny, PROMPT, "head", "Mary", "John", mode="mean", cache=cache).model_dump()
        b = ablation_sweep(gpt2_tiny, PROMPT, "head", "Mary", "John", mode="mean").model_dump()
        assert a == b
    assert cache.hits >= 2


def test_clear_errors(gpt2_tiny):
    with pytest.raises(UnknownComponent, match="heads are 0..3"):
        ablate(gpt2_tiny, PROMPT, ["L0.H9"], "Mary", "John")
    with pytest.raises(UnknownComponent, match="layers are 0..1"):
        ablate(gpt2_tiny, PROMPT, ["L5.MLP"], "Mary", "John")
    with pytest.raises(UnknownComponent, match="position 99"):
        ablate(gpt2_tiny, PROMPT, ["L0.H1@99"], "Mary", "John")
    with pytest.raises(UnknownComponent, match="ids look like"):
        ablate(gpt2_tiny, PROMPT, ["head 3"], "Mary", "John")
    with pytest.raises(TokenizationError, match="tokenizes as"):
        attribute(gpt2_tiny, PROMPT, "Mary John", "John")
    with pytest.raises(TdbError, match="same length"):
        patch(gpt2_tiny, PROMPT, "When Mary went", ["L0.H1"], "Mary", "John")
    with pytest.raises(TdbError, match="out of range"):
        ablation_sweep(gpt2_tiny, PROMPT, "head", "Mary", "John", positions=[40])
    with pytest.raises(TdbError, match="unknown kinds"):
        attribute(gpt2_tiny, PROMPT, "Mary", "John", kinds=["heads"])
    assert gpt2_tiny.active_hook_count() == 0
