"""The attention function the engine installs in every model it loads.

`transformers` computes q, k, v (rotary already applied) and hands them to a pluggable
attention function; ours exposes the internal hook sites (q, k, v, scores, pattern, z),
reuses cached keys/values of a prompt prefix when the engine asks for it (the q/k/v hooks
see this run's positions only, before the prefix's are put in front), and otherwise
runs PyTorch's fused kernel. The mask is built here (the engine never pads), so
`transformers` passes no mask of its own: causal, and limited to the last
`sliding_window` keys where the module passes one (Mistral, Qwen2's sliding layers,
Gemma-2/3 local layers), exactly as transformers' `sliding_window_overlay`
(key j visible from query i when i - window < j <= i). A `softcap` the module passes
(Gemma-2 attention-logit soft-capping) is applied to the scores before the mask:
scores = softcap * tanh(scores / softcap).

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


def tdb_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                  softcap=None, **kwargs):
    state = getattr(module, "_tdb_state", None)
    if state is None:  # a model we did not wrap: behave like plain eager attention
        raise RuntimeError("tdb attention used on a module the engine did not prepare")
    layer = module._tdb_layer
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling

    apply = state.apply
    hooked = state.has_attention_hooks(layer)
    if hooked:  # this run's positions only (as TransformerLens's hooks see them with a cache)
        query = apply(_site(module, "hook_q"), query.transpose(1, 2)).transpose(1, 2)
        key = apply(_site(module, "hook_k"), key.transpose(1, 2)).transpose(1, 2)
        value = apply(_site(module, "hook_v"), value.transpose(1, 2)).transpose(1, 2)

    prefix = state.prefix_kv.get(layer) if state.prefix_kv else None
    if prefix is not None:  # keys/values of earlier positions from a cached run
        pk, pv = prefix  # [1 or batch, kv_heads, prefix_pos, d_head]
        pk, pv = pk.to(key.device, key.dtype), pv.to(value.device, value.dtype)  # cached on the home device
        key = torch.cat([pk.expand(key.shape[0], -1, -1, -1), key], dim=2)
        value = torch.cat([pv.expand(value.shape[0], -1, -1, -1), value], dim=2)

    groups = query.shape[1] // key.shape[1]
    q_len, k_len = query.shape[2], key.shape[2]
    window = sliding_window if sliding_window is not None and sliding_window < k_len else None
    k = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    v = value.repeat_interleave(groups, dim=1) if groups > 1 else value

    if softcap is None and not state.has_pattern_hooks(layer):  # the fused kernel serves
        plain_causal = q_len == k_len and window is None
        mask = None if plain_causal else visible(q_len, k_len, query.device, window)
        z = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, is_causal=plain_causal,
                                           scale=scaling).transpose(1, 2)
        return (apply(_site(module, "hook_z"), z) if hooked else z), None

    scores = torch.matmul(query, k.transpose(-1, -2)) * scaling  # [b, h, q, k]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~visible(q_len, k_len, query.device, window), float("-inf"))
    scores = apply(_site(module, "hook_attn_scores"), scores)
    pattern = torch.softmax(scores.float(), dim=-1).to(value.dtype)
    pattern = apply(_site(module, "hook_pattern"), pattern)
    z = torch.matmul(pattern, v).transpose(1, 2)  # [b, q, h, d_head]
    z = apply(_site(module, "hook_z"), z)
    return z, pattern


def visible(q_len: int, k_len: int, device, window: int | None = None) -> torch.Tensor:
    """True where query i (the last q_len of k_len positions) may attend to key j:
    j <= i, and i - window < j with a sliding window."""
    q_idx = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_idx = torch.arange(k_len, device=device)[None, :]
    mask = k_idx <= q_idx
    return mask & (k_idx > q_idx - window) if window is not None else mask


AttentionInterface.register(NAME, tdb_attention)
