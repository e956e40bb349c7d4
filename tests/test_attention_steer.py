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
