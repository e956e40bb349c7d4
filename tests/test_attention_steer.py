"""attention_pattern and steer against plain transformers."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tdb_agent.errors import TdbError
from tdb_agent.ops.attention import attention_pattern, head_pattern, pattern_png
from tdb_agent.ops.steer import steer

PROMPT = "When Mary and John went to the store , John gave a drink to"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_pattern_matches_eager_attentions(family, tiny_dirs, tiny_engines):
    eng = tiny_engines[family]
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[family], dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    ids = eng.to_tokens(PROMPT)
    with torch.no_grad():
        expected = model(ids, output_attentions=True).attentions[1][0, 3]
    got, tokens, head = head_pattern(eng, PROMPT, "L1.H3")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    r = attention_pattern(eng, PROMPT, "L1.H3", top_k=2)
    assert r.head == "L1.H3" and len(r.queries) == ids.shape[1] == len(r.tokens)
    q = r.queries[-1]
    assert q.top_keys[0].weight == pytest.approx(expected[-1].max().item(), abs=1e-5)
    assert all(k.position <= q.position for row in r.queries for k in row.top_keys)
    png = pattern_png(got)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_tool_picture_reuses_the_computed_pattern(gpt2_tiny):
    """The MCP tool's PNG is drawn from the pattern the op computed: no second run of the head."""
    import base64
    import io

    from PIL import Image

    from tdb_agent.service.model_tools import AttentionArgs, attention_content

    class Bench:
        engine, cache = gpt2_tiny, None

    prompt = PROMPT
    r = attention_pattern(gpt2_tiny, prompt, "L1.H3")
    calls = []
    original = gpt2_tiny.run_with_cache
    gpt2_tiny.run_with_cache = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        out = attention_content(Bench, AttentionArgs(prompt=prompt, component="L1.H3"), r)
    finally:
        del gpt2_tiny.run_with_cache
    assert calls == []
    image = next(b for b in out.content if b.type == "image")
    picture = Image.open(io.BytesIO(base64.b64decode(image.data)))
    expected, _, _ = head_pattern(gpt2_tiny, prompt, "L1.H3")
    assert picture.size == (expected.shape[1] * 12, expected.shape[0] * 12)


def test_steer_matches_plain_generation(gpt2_tiny, tiny_dirs):
    eng = gpt2_tiny
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["gpt2"], dtype=torch.float32).eval()
    vec = model.transformer.h[0].mlp.c_proj.weight[5] * 8.0
    h = model.transformer.h[0].mlp.register_forward_hook(lambda m, a, out: out + vec)
    ids = eng.to_tokens(PROMPT)
    try:
        with torch.no_grad():
            expected = []
            for _ in range(6):
                nxt = int(model(ids).logits[0, -1].argmax())
                expected.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    finally:
        h.remove()
    r = steer(eng, PROMPT, "L0.N5", scale=8.0, max_new_tokens=6)
    assert r.steered == eng.tokenizer.decode(expected)
    same = steer(eng, PROMPT, "L0.N5", scale=0.0, max_new_tokens=6)
    assert same.steered == same.baseline


def test_errors(gpt2_tiny):
    with pytest.raises(TdbError, match="takes a head"):
        attention_pattern(gpt2_tiny, PROMPT, "L1.N3")
    with pytest.raises(TdbError, match="neuron"):
        steer(gpt2_tiny, PROMPT, "L1.MLP")


def _greedy_with_hook(model, ids, module, add, n):
    handle = module.register_forward_hook(lambda m, a, out: out + add)
    out = []
    try:
        with torch.no_grad():
            for _ in range(n):
                nxt = int(model(ids).logits[0, -1].argmax())
                out.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    finally:
        handle.remove()
    return out


@pytest.mark.parametrize("family, component", [("gemma2", "L1.H2"), ("gemma2", "L0.N5"), ("olmo2", "L1.H1"),
                                               ("gemma3_text", "L1.N7")])
def test_steer_on_post_norm_families_adds_the_write_that_reaches_the_residual(family, component, tiny_dirs,
                                                                              tiny_engines):
    """Gemma-2/3, OLMo-2: hook_attn_out / hook_mlp_out sit after the post-norm, so the
    direction is the component's write through it (gain / rms of the raw output, per
    reference token), averaged over the reference set: computed here by hand on the plain
    model, added by a hand-written hook on the post-norm's output."""
    from tdb_agent.ops.runs import reference_documents

    eng = tiny_engines[family]
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[family], dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    layer, index = int(component[1]), int(component.split(".")[1][1:])
    head = ".H" in component
    block = model.model.layers[layer]
    post = block.post_attention_layernorm if head else block.post_feedforward_layernorm
    gain = post.weight + (1.0 if family.startswith("gemma") else 0.0)
    eps = getattr(post, "eps", None) or post.variance_epsilon
    proj = block.self_attn.o_proj if head else block.mlp.down_proj
    dh = proj.in_features // model.config.num_attention_heads
    seen = {}
    handles = [proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0][0])),
               post.register_forward_pre_hook(lambda m, a: seen.__setitem__("raw", a[0][0]))]
    total, count = torch.zeros(model.config.hidden_size), 0
    try:
        with torch.no_grad():
            for text in reference_documents(eng):
                model(eng.to_tokens(text, truncate=True))
                x, raw = seen["in"], seen["raw"]
                sl = slice(index * dh, (index + 1) * dh)
                write = x[:, sl] @ proj.weight[:, sl].T if head else proj.weight[:, index].expand(len(x), -1)
                total += (write * gain * torch.rsqrt(raw.pow(2).mean(-1, keepdim=True) + eps)).sum(0)
                count += len(x)
    finally:
        for h in handles:
            h.remove()
    direction = total / count
    scale = 6.0
    expected = _greedy_with_hook(model, eng.to_tokens(PROMPT), post, scale * direction, 6)
    r = steer(eng, PROMPT, component, scale=scale, max_new_tokens=6)
    assert r.site == f"blocks.{layer}.{'hook_attn_out' if head else 'hook_mlp_out'}"
    assert r.direction_norm == pytest.approx(direction.norm().item(), rel=1e-4)
    assert r.steered == eng.tokenizer.decode(expected)
    assert r.baseline == eng.tokenizer.decode(_greedy_with_hook(model, eng.to_tokens(PROMPT), post, 0.0, 6))
    assert r.steered != r.baseline  # the direction does change the continuation (so the check above bites)
