"""The BOS prefix, written once: every prompt, corpus document and task prompt starts with
the tokenizer's BOS token, when it has one. Some tokenizers declare none (Qwen2/2.5:
`bos_token: null`); their models read text from its first token, so nothing is prepended."""

from __future__ import annotations


def bos_prefix(tokenizer) -> list[int]:
    """[BOS id], or [] for a tokenizer without a BOS token."""
    bos = tokenizer.bos_token_id
    return [] if bos is None else [bos]


def with_bos(tokenizer, ids: list[int]) -> list[int]:
    """`ids` with the tokenizer's BOS token first (unchanged without one)."""
    return bos_prefix(tokenizer) + list(ids)
