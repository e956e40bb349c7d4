"""The shape of a loaded model, as every layer above the engine sees it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class ModelSpec(BaseModel):
    family: str
    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    vocab_size: int
    n_ctx: int
    norm: Literal["layernorm", "rmsnorm"]
    parallel_residual: bool
    gated_mlp: bool
