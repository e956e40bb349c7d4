"""Each head's q, k and v as a function of its own copy of the residual stream, per family.

A q, k or v receiver of block l reads the residual stream x entering the block; what the
head makes of it, as the engine's hook_q / hook_k / hook_v carry it, is

    q_h = rotary( qk_norm( ln1(x) · W_Q[h] + b_Q[h] ) )       (k alike, v without both)

* ln1: the block's input norm (gain 1 + w in Gemma, LayerNorm bias where it has one); none
  in OLMo-2, whose attention reads the raw stream.
* OPT scales q by 1/sqrt(d_head) here (its attention function then does not).
* qk_norm: Qwen3 / Gemma-3 (RMSNorm over d_head, shared by the heads), StableLM (one
  LayerNorm per head), Cohere with use_qk_norm (per-head weights), OLMo-2 (one RMSNorm over
  all heads' outputs together: head h's q is then that norm over the whole projection of
  its own copy of x, sliced at h).
* rotary: rotate-half (Llama layout, optionally on the first `rot` dimensions: NeoX,
  StableLM, Phi-3), interleaved pairs (GPT-J, Cohere), or none (GPT-2, GPT-Neo, OPT);
  Gemma-3's tables differ per layer type.

`head_read` computes the values for per-receiver copies of x: exact edge patching (patch.py)
rebuilds removed receivers with it, and where the closed form of grads.py does not
apply (q/k norms, no input norm) the receivers' gradients are its vector-Jacobian product
(capture.py). OLMo-2's norm over all heads makes each
receiver project onto every head: that read costs n_heads times a per-head one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tdb_agent.engine import Engine
from tdb_agent.engine.norms import apply_norm

#: families whose rotary rotates interleaved pairs (d0, d1), (d2, d3), ... (not halves)
INTERLEAVED = ("gptj", "cohere")
#: families that scale q by the attention's `scaling` before the attention function (hook_q carries it)
Q_SCALED = ("opt",)


@dataclass
class Rotary:
    cos: torch.Tensor  # [b, s, rot]
    sin: torch.Tensor
    interleaved: bool


def rotary_block_tables(engine: Engine, x: torch.Tensor, offset: int = 0):
    """The adapter's block keyword arguments for positions offset..offset+s-1 of x [b, s, d]
    (once per run; offset: the run continues a prefix of that many positions)."""
    b, s = x.shape[:2]
    pos = torch.arange(offset, offset + s, device=x.device).unsqueeze(0).expand(b, -1)
    return engine.adapter.block_kwargs(x, pos)


def layer_rotary(engine: Engine, layer: int, kwargs: dict, dtype: torch.dtype) -> Rotary | None:
    """Block `layer`'s rotary tables from `rotary_block_tables` (None without rotary)."""
    pe = engine.adapter.layer_kwargs(layer, kwargs).get("position_embeddings")
    if pe is None:
        return None
    family = engine.model.config.model_type
    if family == "gptj":  # (sin, cos), one entry per pair
        sin, cos = (t.repeat_interleave(2, dim=-1) for t in pe)
    else:
        cos, sin = pe
    return Rotary(cos.to(dtype), sin.to(dtype), family in INTERLEAVED)


def _turn(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if interleaved:
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def rotate(t: torch.Tensor, rot: Rotary | None, inverse: bool = False) -> torch.Tensor:
    """The rotary rotation (or its transpose) of t [b, s, heads, d_head] on its first `rot` dims."""
    if rot is None:
        return t
    cos, sin = rot.cos.unsqueeze(2), rot.sin.unsqueeze(2)
    r = cos.shape[-1]
    a, rest = t[..., :r], t[..., r:]
    out = a * cos - _turn(a * sin, rot.interleaved) if inverse else a * cos + _turn(a, rot.interleaved) * sin
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out


def qk_norms(engine: Engine, layer: int) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
    """The attention's q and k norms (None, None without)."""
    attn = engine.adapter.attn(layer)
    if getattr(attn, "use_qk_norm", True) is False:  # Cohere builds none then
        return None, None
    for q, k in (("q_norm", "k_norm"), ("q_layernorm", "k_layernorm")):
        if getattr(attn, q, None) is not None:
            return getattr(attn, q), getattr(attn, k)
    return None, None


def closed_form(engine: Engine) -> bool:
    """Whether grads.py's closed form gives the receivers' gradients: an input
    norm and no q/k norm (the rotary's transpose and `q_scale` are applied before it)."""
    return engine.adapter.ln1(0) is not None and qk_norms(engine, 0)[0] is None


def q_scale(engine: Engine, layer: int) -> float:
    """What the family multiplies q by before hook_q (OPT's 1/sqrt(d_head); 1 elsewhere)."""
    return engine.adapter.attn(layer).scaling if engine.model.config.model_type in Q_SCALED else 1.0


def read_norm(engine: Engine, module: torch.nn.Module | None, x: torch.Tensor, frozen: bool = False) -> torch.Tensor:
    """A receiver's input norm applied to x (identity where the family has none); frozen:
    its scale detached (norm="frozen")."""
    if module is None:
        return x
    if frozen:
        return apply_norm(engine.adapter, module, x, engine.spec.norm, frozen=True).to(x.dtype)
    return module(x)


def _bias(lin: torch.nn.Module, engine: Engine) -> torch.Tensor | None:
    return engine.param(lin, "bias") if getattr(lin, "bias", None) is not None else None


def _normed(engine: Engine, norm: torch.nn.Module, lin: torch.nn.Module, xn: torch.Tensor) -> torch.Tensor:
    """q/k norm of each receiver's own projection: xn [b, s, n, d] -> [b, s, n, d_head]."""
    family = engine.model.config.model_type
    W = engine.param(lin)  # [n * dh, d]
    n = xn.shape[2]
    dh = W.shape[0] // n
    b = _bias(lin, engine)
    if family == "olmo2":  # one norm over all heads: every receiver projects onto all of them
        full = xn @ W.T.to(xn.dtype) + (b.to(xn.dtype) if b is not None else 0)  # [b, s, n, n * dh]
        out = norm(full).view(*full.shape[:3], n, dh)
        return out.diagonal(dim1=2, dim2=3).transpose(-1, -2)
    pre = torch.einsum("bsnd,ned->bsne", xn, W.view(n, dh, -1).to(xn.dtype))
    if b is not None:
        pre = pre + b.view(n, dh).to(pre.dtype)
    if family == "stablelm":  # per-head LayerNorms over [b, heads, s, d_head]
        return norm(pre.transpose(1, 2)).transpose(1, 2)
    return norm(pre)


def head_read(engine: Engine, layer: int, kind: int, x: torch.Tensor, xs: torch.Tensor, run: torch.Tensor,
              rot: Rotary | None, frozen: bool = False) -> torch.Tensor:
    """The heads' q (kind 0) [b, s, H, dh], k (1) or v (2) [b, s, KV, dh] with head i reading
    its own copy xs[:, :, i] [b, s, n, d] of the stream instead of x [b, s, d]. `run`: this
    run's values at the hook site; linear reads are added to it as differences (biases
    cancel), q and k through a q/k norm are recomputed in full."""
    a = engine.adapter
    norm = a.ln1(layer)
    xn = read_norm(engine, norm, xs, frozen)
    qk = qk_norms(engine, layer)[kind] if kind < 2 else None
    if qk is not None:
        attn = a.attn(layer)
        return rotate(_normed(engine, qk, attn.q_proj if kind == 0 else attn.k_proj, xn), rot).to(run.dtype)
    dxn = xn - read_norm(engine, norm, x, frozen).unsqueeze(2)
    d = torch.einsum("bshd,hdk->bshk", dxn, a.W_QKV(layer)[kind].to(dxn.dtype))
    if kind == 0:
        d = d * q_scale(engine, layer)
    return run + (rotate(d, rot) if kind < 2 else d).to(run.dtype)
