"""Logit lens and direct logit attribution per position, against independent computations
on plain `transformers` models: hidden states from `output_hidden_states` with the final
norm applied by hand, head writes captured by hand-written hooks; and the sums that must
add up (block writes + embeddings + the norm's bias = the logit difference at every
position)."""

import asyncio

import pytest
import torch
from mcp import Client

from tdb_agent.ops.lens import direct_logit_attribution, logit_lens, to_vocab
from tdb_agent.server import build_server
from tdb_agent.workbench import Workbench
from tests.reference_hooks import _attn_out_proj, capture_plain

PROMPT = "When Mary and John went to the store , John gave a drink to"
FAMILIES = ["gpt2", "gpt_neox", "llama"]


def _final_norm(model):
    base = model.base_model
    for name in ("ln_f", "final_layer_norm", "norm"):
        if hasattr(base, name):
            return getattr(base, name)


def _norm_by_hand(model, x, layernorm: bool):
    """The final norm written out: (x - mean) / sqrt(var + eps) * w + b, or x / rms * w."""
    mod = _final_norm(model)
    eps = getattr(mod, "eps", None) or getattr(mod, "variance_epsilon")
    x = x.double()
    if layernorm:
        x = x - x.mean(-1, keepdim=True)
    y = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * mod.weight.double()
    return y + mod.bias.double() if getattr(mod, "bias", None) is not None else y


@pytest.mark.parametrize("family", FAMILIES)
def test_logit_lens_matches_hidden_states_through_the_final_norm(family, tiny_engines):
    e = tiny_engines[family]
    model, layernorm = e.model, e.spec.norm == "layernorm"
    ids = e.to_tokens(PROMPT)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    W_U = model.get_output_embeddings().weight.double()
    target = e.str_tokens(ids[0, 2:3])[0]
    lens = logit_lens(e, PROMPT, top_k=3, target=target)
    assert len(lens.layers) == e.spec.n_layers + 1 and lens.n_tokens == ids.shape[1]
    for layer in lens.layers:
        if layer.layer < e.spec.n_layers:  # HF's last hidden state has the final norm applied already
            logits = _norm_by_hand(model, out.hidden_states[layer.layer][0], layernorm) @ W_U.T
        else:
            logits = out.logits[0].double()
        probs = logits.softmax(-1)
        for cell in layer.cells:
            want = probs[cell.position].topk(3)
            assert [t.prob for t in cell.top] == pytest.approx(want.values.tolist(), abs=1e-4)
            assert cell.top[0].token == e.str_tokens([int(want.indices[0])])[0]
            t_id = int(ids[0, 2])
            assert cell.target_prob == pytest.approx(float(probs[cell.position, t_id]), abs=1e-4)
            assert cell.target_rank == int((logits[cell.position] > logits[cell.position, t_id]).sum())
    only_last = logit_lens(e, PROMPT, positions=[-1])
    assert [c.position for c in only_last.layers[0].cells] == [ids.shape[1] - 1]
    with pytest.raises(Exception, match="out of range"):
        logit_lens(e, PROMPT, positions=[99])


@pytest.mark.parametrize("family", FAMILIES)
def test_direct_logit_attribution_per_position_by_hand(family, tiny_engines):
    e = tiny_engines[family]
    model, layernorm = e.model, e.spec.norm == "layernorm"
    ids = e.to_tokens(PROMPT)
    t, d = "Mary", "John"
    ti, di = e.token_id(t), e.token_id(d)
    layer, head = e.spec.n_layers - 1, 1
    resid = {}
    hook = _final_norm(model).register_forward_pre_hook(lambda m, a: resid.__setitem__("x", a[0].detach()))
    try:
        with capture_plain(model, [("head", layer)]) as store, torch.no_grad():
            out = model(ids)
    finally:
        hook.remove()
    dh = e.spec.d_head
    z = store[("head", layer)][0, :, head * dh:(head + 1) * dh].double()
    proj = _attn_out_proj(model, layer).weight.double()
    W_O = proj[head * dh:(head + 1) * dh] if proj.shape[0] == e.spec.n_heads * dh and family == "gpt2" else \
        proj[:, head * dh:(head + 1) * dh].T  # Conv1D [in, out] (GPT-2) or Linear [out, in]
    write = z @ W_O  # [s, d_model]
    x = resid["x"][0].double()
    mod = _final_norm(model)
    eps = getattr(mod, "eps", None) or getattr(mod, "variance_epsilon")
    xc = x - x.mean(-1, keepdim=True) if layernorm else x
    scale = 1 / torch.sqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    wc = write - write.mean(-1, keepdim=True) if layernorm else write
    W_U = model.get_output_embeddings().weight.double()
    want = (wc * scale * mod.weight.double()) @ (W_U[ti] - W_U[di])
    got = direct_logit_attribution(e, PROMPT, f"L{layer}.H{head}", t, d)
    assert [p.effect for p in got.positions] == pytest.approx(want.tolist(), abs=1e-4)
    assert got.total == pytest.approx(float(want.sum()), abs=1e-3)
    at = direct_logit_attribution(e, PROMPT, f"L{layer}.H{head}@3", t, d)
    assert [p.position for p in at.positions] == [3] and at.total == pytest.approx(float(want[3]), abs=1e-4)
    # the writes add up: embeddings + every attention and MLP block + the final norm's bias (and
    # the unembedding's) = the model's logit difference at every position
    parts = ["EMB"] + [f"L{l}.{k}" for l in range(e.spec.n_layers) for k in ("ATTN", "MLP")]
    total = sum(torch.tensor([p.effect for p in direct_logit_attribution(e, PROMPT, c, t, d).positions],
                             dtype=torch.float64) for c in parts)
    bias = getattr(mod, "bias", None)
    const = float(bias.double() @ (W_U[ti] - W_U[di])) if bias is not None else 0.0
    b_U = getattr(model.get_output_embeddings(), "bias", None)
    const += float(b_U[ti] - b_U[di]) if b_U is not None else 0.0
    logit_diff = (out.logits[0, :, ti] - out.logits[0, :, di]).double()
    assert (total + const).tolist() == pytest.approx(logit_diff.tolist(), abs=2e-3)


def test_to_vocab_is_the_models_own_unembedding(gpt2_tiny):
    """A state read with its own scale = the model's logits; a write with the scale frozen
    is linear (two halves add up to the whole)."""
    e = gpt2_tiny
    ids = e.to_tokens(PROMPT)
    out, acts = e.run_with_cache(ids, ["hook_resid_final"])
    x = acts["hook_resid_final"][0]
    assert torch.allclose(to_vocab(e, x), e.model(ids).logits[0].float(), atol=1e-4)
    s = e.final_norm_scale(x)
    assert torch.allclose(to_vocab(e, x / 3, scale=s) + to_vocab(e, 2 * x / 3, scale=s), to_vocab(e, x, scale=s),
                          atol=1e-4)


def test_lens_tools_over_mcp(gpt2_tiny, tmp_path):
    server = build_server(Workbench(gpt2_tiny, workspace=tmp_path))

    async def go():
        async with Client(server) as c:
            tools = {t.name: t for t in (await c.list_tools()).tools}
            assert {"logit_lens", "direct_logit_attribution"} <= set(tools)
            assert tools["logit_lens"].annotations.read_only_hint
            r = await c.call_tool("logit_lens", {"prompt": PROMPT, "top_k": 2, "positions": [-1], "target": "Mary"})
            assert not r.is_error, r.content
            layers = r.structured_content["layers"]
            assert len(layers) == gpt2_tiny.spec.n_layers + 1 and len(layers[-1]["cells"][0]["top"]) == 2
            r = await c.call_tool("direct_logit_attribution", {"prompt": PROMPT, "component": "L1.H0",
                                                               "target": "Mary", "distractor": "John"})
            assert not r.is_error and len(r.structured_content["positions"]) == gpt2_tiny.to_tokens(PROMPT).shape[1]
            bad = await c.call_tool("direct_logit_attribution", {"prompt": PROMPT, "component": "L9.H0",
                                                                 "target": "Mary"})
            assert bad.is_error and "out of range" in bad.content[0].text
            bad = await c.call_tool("direct_logit_attribution", {"prompt": PROMPT, "component": "LOGITS",
                                                                 "target": "Mary"})
            assert bad.is_error and "writes nothing" in bad.content[0].text
    asyncio.run(go())
