"""The fused GELU the engine swaps in at load (engine/activations.py) is transformers' formula:
values and gradients over a wide range, and the engine's logits against the plain model that
keeps its own formula module."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

from tdb_agent.engine import Engine
from tdb_agent.engine.activations import fuse_gelu
from tdb_agent.ops.basic import model_info


@pytest.mark.parametrize("formula", [NewGELUActivation(), FastGELUActivation(), GELUTanh(use_gelu_tanh_python=True)])
def test_fused_gelu_equals_the_formula_values_and_gradients(formula):
    x = torch.cat([torch.linspace(-30, 30, 600_001), torch.randn(100_000) * 3]).requires_grad_(True)
    fused = nn.GELU(approximate="tanh")
    ref = x.detach().double().requires_grad_(True)
    y_ref = formula(ref)  # the formula in float64: the true function
    (g_ref,) = torch.autograd.grad(y_ref.sum(), ref)
    y_ref = y_ref.detach()
    y_f, y_p = fused(x), formula(x)
    (g_f,) = torch.autograd.grad(y_f.sum(), x)
    (g_p,) = torch.autograd.grad(y_p.sum(), x)
    y_f, y_p = y_f.detach(), y_p.detach()
    scale = x.detach().double().abs().clamp(min=1.0)
    # both float32 versions are the float64 function to float32 rounding (relative to max(|x|, 1))
    assert float(((y_f.double() - y_ref) / scale).abs().max()) < 2e-7
    assert float(((y_p.double() - y_ref) / scale).abs().max()) < 2e-7
    assert float((y_f - y_p).abs().max()) < 1e-6  # |x| ≤ 30
    # gradients (order 1): the fused kernel's tail is 0 below x ≈ -5 where the true one is -1e-6
    assert float((g_f.double() - g_ref).abs().max()) < 2e-6
    assert float((g_f - g_p).abs().max()) < 2e-6


def test_the_engine_runs_the_fused_gelu_and_matches_the_plain_model(tiny_dirs, tiny_engines):
    engine = tiny_engines["gpt2"]
    plain = AutoModelForCausalLM.from_pretrained(tiny_dirs["gpt2"], dtype=torch.float32).eval()
    assert isinstance(plain.transformer.h[0].mlp.act, NewGELUActivation)  # the reference keeps its own
    for l in range(engine.spec.n_layers):
        act = engine.adapter.mlp_act(l)
        assert isinstance(act, nn.GELU) and act.approximate == "tanh"
    assert engine.notes and "NewGELUActivation" in engine.notes[0]
    assert model_info(engine).notes == engine.notes
    ids = torch.randint(0, engine.spec.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = engine.forward(ids, logit_positions=None).logits
        ref = plain(ids).logits
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)
    # hook_post is the fused module's output: the plain model's activation on the same input
    _, acts = engine.run_with_cache(ids, ["blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_post"])
    assert torch.allclose(acts["blocks.0.mlp.hook_post"], NewGELUActivation()(acts["blocks.0.mlp.hook_pre"]),
                          atol=1e-6)


def test_other_activations_and_half_precision_are_left_alone(tiny_dirs, tiny_engines):
    half = Engine.load(tiny_dirs["gpt2"], dtype="bfloat16")  # differs at bf16 rounding: the model's own formula
    assert not half.notes and isinstance(half.adapter.mlp_act(0), NewGELUActivation)
    engine = tiny_engines["gpt_neox"]  # exact GELU
    assert not engine.notes and not isinstance(engine.adapter.mlp_act(0), nn.GELU)
    assert fuse_gelu(nn.Sequential(nn.ReLU(), GELUTanh())) == []  # GELUTanh already calls the kernel
