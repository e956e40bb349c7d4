"""The edge methods on every family the engine runs, against hand-written hooks on the plain
`transformers` model (tests/edge_hooks.py): EAP scores equal autograd gradients at each
receiver's own input (EAP-IG: integrated gradients there), and edge patching equals brute
force (keep-all = clean, keep-none = corrupted, random edge sets, single edges into a key, a
query, an MLP and the logits); on every variant of tests/tiny_models.py and on configurations
with code paths of their own (Cohere's q/k norms, Phi-3's partial rotary, q/k biases under a
q/k norm, OLMo-2 with one key/value head)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tdb_agent.engine import Engine
from tdb_agent.ops.edges.capture import corrupted_senders, group_pairs, run_senders, shared_positions
from tdb_agent.ops.edges.eap import edge_scores
from tdb_agent.ops.edges.graph import EdgeGraph
from tdb_agent.ops.edges.patch import patched_metrics
from tdb_agent.ops.edges.quadrature import nodes
from tests.edge_hooks import HookedEdges
from tests.test_edges import _pairs
from tests.tiny_models import ALL_FAMILIES, build_tiny


def _sharpen(model):
    """Matrices scaled up (as tests/test_edges.py's `sharp`), so edges have clearly non-zero effects."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(4.0 if "emb" in name or "wte" in name or "word_embeddings" in name else 2.0)


@pytest.fixture(scope="module")
def models(tiny_dirs):
    """family -> (engine, the plain transformers model with eager attention), same weights."""
    cache = {}

    def get(fam):
        if fam not in cache:
            cache[fam] = _load(tiny_dirs[fam])
        return cache[fam]
    return get


def _group(eng, pairs):
    (g,), _ = group_pairs(eng, pairs, True)
    return g


def _load(folder):
    eng = Engine.load(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    _sharpen(eng.model)
    _sharpen(model)
    return eng, model


@pytest.mark.parametrize("fam", ALL_FAMILIES)
def test_eap_equals_autograd_on_hooked_plain_model(fam, models):
    _check_eap(*models(fam))


# configurations with code paths of their own in ops/edges/heads.py beyond tests/tiny_models.py's
MORE = [("cohere", {"use_qk_norm": True}), ("phi3", {"partial_rotary_factor": 0.5}),
        ("qwen3", {"attention_bias": True}), ("olmo2", {"num_key_value_heads": 1})]


@pytest.mark.parametrize(("fam", "overrides"), MORE, ids=[f for f, _ in MORE])
def test_edge_methods_on_more_configurations(fam, overrides, tmp_path):
    eng, model = _load(build_tiny(fam, tmp_path / fam, overrides=overrides))
    _check_eap(eng, model)
    _check_patching(eng, model)


def _check_eap(eng, model):
    pairs = _pairs(2)
    g = _group(eng, pairs)
    assert shared_positions(g.ids, g.corrupted) > 0  # so the passes continue a shared prefix run (capture.Prefix)
    ours = edge_scores(eng, pairs, method="eap").scores
    ref = HookedEdges(model).eap(g.ids, g.corrupted, g.target, g.distractor)
    scale = float(ref.abs().max())
    assert scale > 1e-3  # the comparison means something
    assert (ours - ref).abs().max() <= 1e-5 * max(1.0, scale), float((ours - ref).abs().max())
    whole = edge_scores(eng, pairs, method="eap", reuse_prefix=False).scores  # every position in every pass
    assert (whole - ref).abs().max() <= 1e-5 * max(1.0, scale), float((whole - ref).abs().max())


@pytest.mark.parametrize("fam", ["gpt2", "gemma", "gemma2", "qwen3", "olmo2", "opt", "gptj", "falcon:new"])
def test_eap_ig_equals_integrated_gradients_on_hooked_plain_model(fam, models):
    eng, model = models(fam)
    pairs = _pairs(2)
    g = _group(eng, pairs)
    ours = edge_scores(eng, pairs, method="eap-ig", steps=2).scores
    ref = HookedEdges(model).eap(g.ids, g.corrupted, g.target, g.distractor, ig_steps=2)
    scale = float(ref.abs().max())
    assert scale > 1e-3
    assert (ours - ref).abs().max() <= 1e-5 * max(1.0, scale), float((ours - ref).abs().max())
    # Gauss–Radau: 3 steps of their own weights stacked in one pass (the nodes checked in test_edge_quadrature)
    ours = edge_scores(eng, pairs, method="eap-ig", steps=3, quadrature="radau").scores
    ref = HookedEdges(model).eap(g.ids, g.corrupted, g.target, g.distractor, ig_steps=3, nodes=nodes("radau", 3))
    assert (ours - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max())), float((ours - ref).abs().max())


@pytest.mark.parametrize("fam", ALL_FAMILIES)
def test_edge_patching_equals_hooked_brute_force(fam, models):
    _check_patching(*models(fam))


def _check_patching(eng, model):
    pairs = _pairs(2)
    g = _group(eng, pairs)
    graph = EdgeGraph(eng.spec)
    gen = torch.Generator().manual_seed(1)
    keeps = torch.rand(3, graph.n_senders, graph.n_receivers, generator=gen) < 0.5
    keeps[0], keeps[1] = True, False
    kv = "L1.H0.k" if eng.spec.n_kv_heads == eng.spec.n_heads else "L1.KV0.k"
    for e in (f"EMB->{kv}", "L0.H2->L1.MLP", "L0.H1->L1.H3.q", "L1.MLP->LOGITS"):
        s, r = graph.parse_edge(e)
        k = torch.ones(1, graph.n_senders, graph.n_receivers, dtype=torch.bool)
        k[0, s, r] = False
        keeps = torch.cat([keeps, k])
    ours, _ = patched_metrics(eng, graph, g, run_senders(eng, g.corrupted), keeps, batch_size=4)
    # the same edge sets continuing the pairs' shared prefix (capture.Prefix), as EdgeEvaluator runs them
    p = shared_positions(g.ids, g.corrupted)
    ref_after, prefix = corrupted_senders(eng, g.corrupted, p)
    assert prefix is not None and prefix.offset == p and ref_after.shape[1] == g.ids.shape[1] - p
    continued, _ = patched_metrics(eng, graph, g, ref_after, keeps, batch_size=4, prefix=prefix)
    assert torch.allclose(continued, ours, atol=1e-5), float((continued - ours).abs().max())
    R = HookedEdges(model)
    with torch.no_grad():
        clean, _ = R.run(g.ids, g.target, g.distractor)
        corr, ref = R.run(g.corrupted, g.target, g.distractor)
        assert torch.allclose(ours[0], clean, atol=1e-5) and torch.allclose(ours[1], corr, atol=1e-5)
        for i in range(2, keeps.shape[0]):
            removed = {(int(u), int(r)) for u, r in zip(*torch.nonzero(graph.valid & ~keeps[i], as_tuple=True))}
            want, _ = R.run(g.ids, g.target, g.distractor, ref=ref, removed=removed)
            assert torch.allclose(ours[i], want, atol=1e-5), (i, ours[i], want)
        assert (clean - corr).abs().max() > 1e-3
    assert (ours[-4:] - clean).abs().max() > 1e-4  # single removals move the metric
