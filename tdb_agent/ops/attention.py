"""A head's attention pattern on a prompt: top keys per query, and a PNG heatmap."""

from __future__ import annotations

import io

import numpy as np
import torch
from pydantic import BaseModel, Field, PrivateAttr

from tdb_agent.components import parse_component
from tdb_agent.engine import Engine
from tdb_agent.errors import TdbError
from tdb_agent.ops.runs import RunCache, get_run


class KeyWeight(BaseModel):
    position: int
    token: str
    weight: float


class QueryRow(BaseModel):
    position: int
    token: str
    top_keys: list[KeyWeight]


class AttentionPatternResult(BaseModel):
    prompt: str
    head: str
    tokens: list[str]
    queries: list[QueryRow] = Field(description="for each query position, its most attended key positions")
    pattern: list[list[float]] | None = Field(None, description="the full [query, key] pattern (prompts up to "
                                              "64 tokens)")
    #: the pattern as computed, so a PNG of it does not run the head again (not serialised)
    _pattern: torch.Tensor | None = PrivateAttr(None)


@torch.no_grad()
def head_pattern(engine: Engine, prompt: str, component: str, cache: RunCache | None = None) -> tuple[torch.Tensor, list[str], str]:
    """The [query, key] pattern of one head, its tokens and the head id."""
    with engine.lock:
        run = get_run(engine, prompt, cache)
        c = parse_component(component, engine.spec, n_positions=run.n_tokens)
        if c.kind != "head":
            raise TdbError(f"attention_pattern takes a head like L1.H3, not {c.id}")
        site = f"blocks.{c.layer}.attn.hook_pattern"
        _, acts = engine.run_with_cache(run.ids, [site], start_layer=c.layer,
                                        resid=run.acts[f"blocks.{c.layer}.hook_resid_pre"], stop_layer=c.layer + 1)
        return acts[site][0, c.index].float(), engine.str_tokens(run.ids), f"L{c.layer}.H{c.index}"


def attention_pattern(engine: Engine, prompt: str, component: str, top_k: int = 3,
                      cache: RunCache | None = None) -> AttentionPatternResult:
    """Where one head looks: its attention pattern on the prompt.

    Args:
        prompt: the text to run.
        component: a head, e.g. L1.H3.
        top_k: how many of the most attended key positions to list per query.

    Returns:
        AttentionPatternResult: the head id, the tokens, per query position its top_k keys
        (position, token, attention weight), and the full [query, key] pattern for prompts of
        up to 64 tokens (None otherwise).
    """
    pattern, tokens, head = head_pattern(engine, prompt, component, cache)
    s = pattern.shape[0]
    k = min(top_k, s)
    top = pattern.topk(k, dim=-1)
    values, indices = top.values.tolist(), top.indices.tolist()
    queries = []
    for q in range(s):
        keys = [KeyWeight(position=j, token=tokens[j], weight=w) for w, j in zip(values[q], indices[q]) if j <= q]
        queries.append(QueryRow(position=q, token=tokens[q], top_keys=keys))
    full = [[round(v, 5) for v in row] for row in pattern.tolist()] if s <= 64 else None
    result = AttentionPatternResult(prompt=prompt, head=head, tokens=tokens, queries=queries, pattern=full)
    result._pattern = pattern
    return result


def pattern_png(pattern: torch.Tensor, cell: int = 12) -> bytes:
    """A heatmap (white = 0, dark blue = 1) of a [query, key] pattern as PNG bytes."""
    from PIL import Image  # Pillow: encodes the PNG

    p = pattern.detach().float().clamp(0, 1).cpu().numpy()
    rgb = np.stack([255 - 225 * p, 255 - 160 * p, 255 - 40 * p], axis=-1).astype(np.uint8)
    img = Image.fromarray(rgb, mode="RGB").resize((p.shape[1] * cell, p.shape[0] * cell), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
