"""Half-precision models: blocks compute in the model's dtype, the residual stream is float32.

Why: in a bfloat16 model every residual add rounds the whole stream to 8 bits of mantissa,
an error of ~2^-9 of the stream's size at each add. A head's ablation delta or direct
effect is a small difference on top of that stream, so this rounding alone put bf16
deltas 1.8% (of the largest delta) off their float32 values on a tiny Llama whose weights
are exact in bf16; rounding every block's output instead cost 0.3%. So the engine carries
the residual stream in float32 between and inside blocks (the block's own `residual + out`
then adds in float32), and each module a block calls on the stream (norms, attention, MLP,
post-norms) gets its input cast to the model's dtype by a forward pre-hook: every matmul,
norm and activation is the model's own half-precision computation on the rounded stream.
Float32 models get no hooks at all. The hook on the stream between attention and MLP
(hook_resid_mid) runs before the cast, so it sees float32 like resid_pre and resid_post."""

from __future__ import annotations

import torch
from torch import nn


def _cast(dtype: torch.dtype):
    def pre_hook(mod, args, kwargs):
        args = tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
        h = kwargs.get("hidden_states")
        if torch.is_tensor(h) and h.is_floating_point():
            kwargs = kwargs | {"hidden_states": h.to(dtype)}
        return args, kwargs
    return pre_hook


def cast_block_inputs(blocks: list[nn.Module], dtype: torch.dtype) -> list:
    """Forward pre-hooks casting the inputs of every module directly under a block to
    `dtype` (none for float32); returns the handles (they stay for the engine's life)."""
    if dtype == torch.float32:
        return []
    return [child.register_forward_pre_hook(_cast(dtype), with_kwargs=True)
            for block in blocks for child in block.children() if any(True for _ in child.parameters())]


def describe(dtype: torch.dtype) -> str:
    """What runs in which precision (model_info)."""
    if dtype == torch.float32:
        return "float32 throughout"
    dt = str(dtype).removeprefix("torch.")
    return (f"weights and every block's computation in {dt}; residual stream, final norm, unembedding, logits, "
            "metrics, direct effects and decompositions in float32")
