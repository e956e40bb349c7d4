"""SAEs: SAELens layout, encode/decode, exact splice, and latents in every operation,
each checked against a hand computation on a tiny random GPT-2."""

import json

import pytest
import torch

from tdb_agent import ops
from tdb_agent.components import hook_site, parse_component
from tdb_agent.engine.sae import SAE, SAEConfig, SAEError, load_saes, splice_hook
from tdb_agent.errors import TdbError, UnknownComponent

PROMPT = "When Mary and John went to the store , John gave a drink to"
CORRUPT = "When Mary and John went to the store , Anna gave a drink to"


def random_sae(d_in: int, d_sae: int, hook: str, arch: str = "standard", seed: int = 0, k: int = 4) -> SAE:
    g = torch.Generator().manual_seed(seed)
    w = {"W_enc": torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5,
         "b_enc": torch.randn(d_sae, generator=g) * 0.1,
         "W_dec": torch.randn(d_sae, d_in, generator=g) / d_sae ** 0.5,
         "b_dec": torch.randn(d_in, generator=g) * 0.1}
    if arch == "jumprelu":
        w["threshold"] = torch.rand(d_sae, generator=g) * 0.3
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, hook_name=hook, architecture=arch, k=k if arch == "topk" else None)
    return SAE(cfg, w)


@pytest.fixture()
def eng(gpt2_tiny):
    """The tiny GPT-2 with ReLU SAEs at L0.resid and L1.mlp (detached after the test)."""
    e = gpt2_tiny
    d = e.spec.d_model
    saved = e.saes
    from tdb_agent.engine.sae import SAESet
    e.saes = SAESet()
    e.saes.add(random_sae(d, 48, "blocks.0.hook_resid_post", seed=1), e.spec.n_layers, d)
    e.saes.add(random_sae(d, 40, "blocks.1.hook_mlp_out", seed=2), e.spec.n_layers, d)
    yield e
    e.saes = saved


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_save_load_roundtrip_and_encode_by_hand(tmp_path, arch):
    sae = random_sae(16, 24, "blocks.1.hook_resid_pre", arch)
    sae.save(tmp_path / arch)
    cfg = json.loads((tmp_path / arch / "cfg.json").read_text())
    assert cfg["d_in"] == 16 and cfg["d_sae"] == 24 and cfg["hook_name"] == "blocks.1.hook_resid_pre"
    back = SAE.load(tmp_path / arch)
    x = torch.randn(3, 5, 16)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    if arch == "standard":
        want = pre.clamp(min=0)
    elif arch == "jumprelu":
        want = torch.where(pre > sae.threshold, pre, torch.zeros_like(pre)).clamp(min=0)
    else:
        want = torch.zeros_like(pre)
        for idx in __import__("itertools").product(range(3), range(5)):
            top = pre[idx].argsort(descending=True)[:4]
            want[idx][top] = pre[idx][top].clamp(min=0)
        assert ((back.encode(x) != 0).sum(-1) <= 4).all()
    torch.testing.assert_close(back.encode(x), want)
    torch.testing.assert_close(back.decode(want), want @ sae.W_dec + sae.b_dec)


def test_saelens_variants_and_errors(tmp_path):
    sae = random_sae(8, 12, "blocks.0.hook_resid_post", "topk", k=3)
    sae.save(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "cfg.json").read_text())
    # older SAELens: architecture standard + activation_fn_str topk with kwargs k
    cfg.update(architecture="standard", activation_fn_str="topk", activation_fn_kwargs={"k": 3}, k=None)
    (tmp_path / "a" / "cfg.json").write_text(json.dumps(cfg))
    assert SAE.load(tmp_path / "a").cfg.k == 3
    with pytest.raises(SAEError, match="allow_download"):
        SAE.load(tmp_path / "nope")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "cfg.json").write_text("{}")
    with pytest.raises(SAEError, match="sae_weights.safetensors is missing"):
        SAE.load(tmp_path / "b")
    bad = random_sae(8, 12, "blocks.0.hook_resid_post")
    with pytest.raises(SAEError, match="shape"):
        SAE(SAEConfig(d_in=8, d_sae=13, hook_name="x"), {n: getattr(bad, n) for n in ("W_enc", "b_enc", "W_dec",
                                                                                      "b_dec")})
    with pytest.raises(SAEError, match="not supported"):
        SAE(SAEConfig(d_in=8, d_sae=12, hook_name="x", architecture="gated"), {})


def test_load_saes_attaches_and_checks(gpt2_tiny, tmp_path):
    from tdb_agent.engine.sae import SAESet
    e = gpt2_tiny
    saved, e.saes = e.saes, SAESet()
    try:
        random_sae(e.spec.d_model, 20, "blocks.1.hook_resid_pre").save(tmp_path / "s")
        assert load_saes([tmp_path / "s"], e) == [(0, "resid")]  # resid_pre of 1 = resid_post of 0
        with pytest.raises(SAEError, match="already attached"):
            load_saes([tmp_path / "s"], e)
        random_sae(e.spec.d_model + 1, 20, "blocks.0.hook_mlp_out").save(tmp_path / "w")
        with pytest.raises(SAEError, match="d_in"):
            load_saes([tmp_path / "w"], e)
        c = parse_component("L0.resid.F19", e.spec, sae_sizes=e.saes.sizes())
        assert hook_site(c) == ("blocks.0.hook_resid_post", 19)
        with pytest.raises(UnknownComponent, match="0..19"):
            parse_component("L0.resid.F20", e.spec, sae_sizes=e.saes.sizes())
    finally:
        e.saes = saved


def test_splice_is_exact(eng):
    ids = eng.to_tokens(PROMPT)
    base = eng.forward(ids, logit_positions=None).logits
    hooks = {f"blocks.{l}.hook_{'resid_post' if s == 'resid' else 'mlp_out'}": splice_hook(sae)
             for (l, s), sae in eng.saes.items()}
    spliced = eng.forward(ids, hooks=hooks, logit_positions=None).logits
    assert torch.equal(base, spliced)
    # and with the error term really used: reconstruction + error == x
    sae = eng.saes.get(0, "resid")
    _, acts = eng.run_with_cache(ids, ["blocks.0.hook_resid_post"])
    x = acts["blocks.0.hook_resid_post"]
    recon = sae.decode(sae.encode(x))
    assert (recon - x).abs().max() > 1e-2  # a random SAE reconstructs badly: the error term matters
    torch.testing.assert_close(recon + (x - recon), x)


def _logit_diff(engine, ids, hooks=None):
    out = engine.forward(ids, hooks=hooks).logits[0, -1]
    return (out[engine.token_id("Mary")] - out[engine.token_id("John")]).item()


def test_ablate_latent_removes_its_decoder_contribution(eng):
    ids = eng.to_tokens(PROMPT)
    sae = eng.saes.get(0, "resid")
    _, acts = eng.run_with_cache(ids, ["blocks.0.hook_resid_post"])
    f = sae.encode(acts["blocks.0.hook_resid_post"])[0]
    i = int(f.abs().sum(0).argmax())
    assert f[:, i].abs().sum() > 0

    def by_hand(x, site):
        return x - f[:, i, None] * sae.W_dec[i]

    want = _logit_diff(eng, ids, {"blocks.0.hook_resid_post": by_hand})
    r = ops.ablate(eng, PROMPT, [f"L0.resid.F{i}"], "Mary", "John")
    assert abs(r.after - want) < 1e-4 and abs(r.before - _logit_diff(eng, ids)) < 1e-5
    assert abs(r.delta) > 1e-4
    # one position only, and mean mode: f_i -> mean_i at that position
    t = int(f[:, i].argmax())
    mean = ops.sae_ops.latent_mean(eng, 0, "resid")

    def by_hand_mean(x, site):
        x = x.clone()
        x[0, t] += (mean[i] - f[t, i]) * sae.W_dec[i]
        return x

    want = _logit_diff(eng, ids, {"blocks.0.hook_resid_post": by_hand_mean})
    r = ops.ablate(eng, PROMPT, [f"L0.resid.F{i}@{t}"], "Mary", "John", mode="mean")
    assert abs(r.after - want) < 1e-4
    with pytest.raises(TdbError, match="no SAE is loaded at L1.resid"):
        ops.ablate(eng, PROMPT, ["L1.resid.F0"], "Mary", "John")


def test_sweep_matches_single_ablations(eng):
    res = ops.ablation_sweep(eng, PROMPT, "sae", "Mary", "John", batch_size=16)
    ids = {r.id: r.delta for r in res.rows}
    assert res.n_components == 48 + 40 and res.rows
    for row in res.rows[:3] + res.rows[-2:]:
        single = ops.ablate(eng, PROMPT, [row.id], "Mary", "John")
        assert abs(single.delta - ids[row.id]) < 1e-4
    resm = ops.ablation_sweep(eng, PROMPT, "sae", "Mary", "John", mode="mean", positions="last", top_k=5)
    for row in resm.rows:
        single = ops.ablate(eng, PROMPT, [row.id + f"@{eng.to_tokens(PROMPT).shape[1] - 1}"], "Mary", "John",
                            mode="mean")
        assert abs(single.delta - row.delta) < 1e-4


def test_direct_effect_of_latents_by_hand(eng):
    ids = eng.to_tokens(PROMPT)
    r = ops.attribute(eng, PROMPT, "Mary", "John", kinds=["sae"], top_k=None)
    assert {row.kind for row in r.rows} == {"sae"} and len(r.rows) == 88
    _, acts = eng.run_with_cache(ids, ["hook_resid_final", "blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"])
    x = acts["hook_resid_final"][0, -1]
    ln = eng.model.transformer.ln_f
    scale = 1 / torch.sqrt(x.var(unbiased=False) + ln.eps)
    wu = ln.weight * (eng.model.lm_head.weight[eng.token_id("Mary")] - eng.model.lm_head.weight[eng.token_id("John")])
    g = scale * (wu - wu.mean())
    got = {row.id: row.effect for row in r.rows}
    for (layer, site), name in [((0, "resid"), "blocks.0.hook_resid_post"), ((1, "mlp"), "blocks.1.hook_mlp_out")]:
        sae = eng.saes.get(layer, site)
        f = sae.encode(acts[name][0, -1])
        want = f * (sae.W_dec @ g)
        for i in want.abs().topk(3).indices.tolist():
            assert abs(got[f"L{layer}.{site}.F{i}"] - want[i].item()) < 1e-4
    assert abs(sum(abs(row.share) for row in r.rows) - 1) < 1e-5  # shares over all SAEs' latents


def test_act_times_grad_of_latents_by_hand(eng):
    ids = eng.to_tokens(PROMPT)
    r = ops.attribute(eng, PROMPT, "Mary", "John", method="act_times_grad", kinds=["sae", "head"], top_k=None,
                      corrupted_prompt=CORRUPT)
    got = {row.id: row.effect for row in r.rows}
    # independent: gradient w.r.t. the site activation, then (f - f_corrupt)_i * (W_dec[i] . grad) over positions
    site = "blocks.0.hook_resid_post"
    sae = eng.saes.get(0, "resid")
    box = {}

    def leaf(x, s):
        box["x"] = x.detach().requires_grad_(True)
        return box["x"]

    with torch.enable_grad():
        out = eng.forward(ids, hooks={site: leaf}).logits[0, -1]
        m = out[eng.token_id("Mary")] - out[eng.token_id("John")]
        (gx,) = torch.autograd.grad(m, box["x"])
    _, ca = eng.run_with_cache(eng.to_tokens(CORRUPT), [site])
    f = sae.encode(box["x"].detach()[0])
    fc = sae.encode(ca[site][0])
    want = ((f - fc) * (gx[0] @ sae.W_dec.T)).sum(0)
    for i in want.abs().topk(4).indices.tolist():
        assert abs(got[f"L0.resid.F{i}"] - want[i].item()) < 1e-4


def test_patch_latent_by_hand(eng):
    site = "blocks.0.hook_resid_post"
    sae = eng.saes.get(0, "resid")
    ids_c, ids_x = eng.to_tokens(PROMPT), eng.to_tokens(CORRUPT)
    _, a = eng.run_with_cache(ids_c, [site])
    _, b = eng.run_with_cache(ids_x, [site])
    fc, fx = sae.encode(a[site][0]), sae.encode(b[site][0])
    i = int((fc - fx).abs().sum(0).argmax())
    want = _logit_diff(eng, ids_x, {site: lambda x, s: x + (fc[:, i] - fx[:, i])[:, None] * sae.W_dec[i]})
    r = ops.patch(eng, PROMPT, CORRUPT, [f"L0.resid.F{i}"], "Mary", "John")
    assert abs(r.metric_patched - want) < 1e-4


def test_steer_with_latent(eng):
    sae = eng.saes.get(1, "mlp")
    r = ops.steer(eng, "When Mary and John", "L1.mlp.F3", scale=20.0, max_new_tokens=4)
    assert r.site == "blocks.1.hook_mlp_out"
    assert abs(r.direction_norm - sae.W_dec[3].norm().item()) < 1e-6
    from tdb_agent.ops.steer import greedy
    ids = eng.to_tokens("When Mary and John")
    toks = greedy(eng, ids, 4, hooks={"blocks.1.hook_mlp_out": lambda x, s: x + 20.0 * sae.W_dec[3]})
    assert r.steered == eng.tokenizer.decode(toks)


@pytest.mark.parametrize("site", ["resid", "mlp"])
def test_trace_latent_preactivation(eng, site):
    layer = 0 if site == "resid" else 1
    sae = eng.saes.get(layer, site)
    ids = eng.to_tokens(PROMPT)
    name = "blocks.0.hook_resid_post" if site == "resid" else "blocks.1.hook_mlp_out"
    _, acts = eng.run_with_cache(ids, [name, "blocks.0.hook_resid_pre"])
    t = 5
    pre = (acts[name][0, t] - sae.b_dec) @ sae.W_enc + sae.b_enc
    i = int(pre.argmax())
    r = ops.trace_upstream(eng, PROMPT, f"L{layer}.{site}.F{i}@{t}", top_k=None)
    assert abs(r.value - pre[i].item()) < 1e-5
    const = r.unattributed["output_biases"] + r.unattributed["sae_b_enc_minus_b_dec_term"]
    assert abs(r.sum_of_edges["direct"] + const - r.value) < 1e-4
    assert abs(r.unattributed["rounding"]) < 1e-4
    w = sae.W_enc[:, i]
    if site == "resid":
        emb = next(e for e in r.edges if e.source == f"EMB@{t}")
        assert abs(emb.weight - (acts["blocks.0.hook_resid_pre"][0, t] @ w).item()) < 1e-5
    else:
        assert all(e.source.startswith("L1.N") for e in r.edges)
