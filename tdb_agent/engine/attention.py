"""The attention function the engine installs in every model it loads.

`transformers` computes q, k, v (rotary already applied) and hands them to a pluggable
attention function; ours exposes the internal hook sites (q, k, v, scores, pattern, z),
reuses cached keys/values of a prompt prefix when the engine asks for it, and otherwise
runs PyTorch's fused kernel. The causal mask is built here (the engine never pads), so
`transformers` passes no mask of its own.

Shapes: query [batch, heads, q_pos, d_head]; key/value [batch, kv_heads, k_pos, d_head].
Hook sites see TransformerLens layouts: q/k/v/z [batch, pos, heads, d_head], scores and
pattern [batch, heads, q_pos, k_pos].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

NAME = "tdb"
INTERNAL_SITES = ("hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern", "hook_z")


def _site(module, name: str) -> str:
    return f"blocks.{module._tdb_layer}.attn.{name}"


def tdb_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    state = getattr(module, "_tdb_state", None)
    if state is None:  # a model we did not wrap: behave like plain eager attention
        raise RuntimeError("tdb attention used on a module the engine did not prepare")
    layer = module._tdb_layer
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling

    prefix = state.prefix_kv.get(layer) if state.prefix_kv else None
    if prefix is not None:  # keys/values of earlier positions from a cached clean run
        pk, pv = prefix  # [1, kv_heads, prefix_pos, d_head]
        pk, pv = pk.to(key.device), pv.to(value.device)  # cached on the home device (device maps)
        key = torch.cat([pk.expand(key.shape[0], -1, -1, -1), key], dim=2)
        value = torch.cat([pv.expand(value.shape[0], -1, -1, -1), value], dim=2)

    groups = query.shape[1] // key.shape[1]
    hooked = state.has_attention_hooks(layer)
    q_len, k_len = query.shape[2], key.shape[2]

    if not hooked:
        k = key.repeat_interleave(groups, dim=1) if groups > 1 else key
        v = value.repeat_interleave(groups, dim=1) if groups > 1 else value
        mask = None if q_len == k_len else _causal_mask(q_len, k_len, query.device)
        z = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, is_causal=q_len == k_len,
                                           scale=scaling)
        return z.transpose(1, 2), None

    apply = state.apply
    query = apply(_site(module, "hook_q"), query.transpose(1, 2)).transpose(1, 2)
    key = apply(_site(module, "hook_k"), key.transpose(1, 2)).transpose(1, 2)
    value = apply(_site(module, "hook_v"), value.transpose(1, 2)).transpose(1, 2)
    k = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    v = value.repeat_interleave(groups, dim=1) if groups > 1 else value

    if not state.has_pattern_hooks(layer):  # q/k/v/z only: the fused kernel still serves
        mask = None if q_len == k_len else _causal_mask(q_len, k_len, query.device)
        z = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, is_causal=q_len == k_len, scale=scaling)
        return apply(_site(module, "hook_z"), z.transpose(1, 2)), None

    scores = torch.matmul(query, k.transpose(-1, -2)) * scaling  # [b, h, q, k]
    scores = scores.masked_fill(~_causal_mask(q_len, k_len, query.device), float("-inf"))
    scores = apply(_site(module, "hook_attn_scores"), scores)
    pattern = torch.softmax(scores.float(), dim=-1).to(value.dtype)
    pattern = apply(_site(module, "hook_pattern"), pattern)
    z = torch.matmul(pattern, v).transpose(1, 2)  # [b, q, h, d_head]
    z = apply(_site(module, "hook_z"), z)
    return z, pattern


def _causal_mask(q_len: int, k_len: int, device) -> torch.Tensor:
    """True where query i (the last q_len of k_len positions) may attend to key j."""
    q_idx = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    return torch.arange(k_len, device=device)[None, :] <= q_idx


AttentionInterface.register(NAME, tdb_attention)
