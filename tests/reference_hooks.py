"""Hand-written hooks on plain `transformers` models: the independent computations the
operations are tested against. Nothing here imports the engine."""

from __future__ import annotations

from contextlib import contextmanager

import torch


def _blocks(model):
    base = model.base_model
    return base.h if hasattr(base, "h") else base.layers


def _attn_out_proj(model, layer):
    block = _blocks(model)[layer]
    if hasattr(block, "attn"):
        return block.attn.c_proj
    if hasattr(block, "attention"):
        return block.attention.dense
    return block.self_attn.o_proj


def _mlp_in_of_out_proj(model, layer):
    block = _blocks(model)[layer]
    mlp = block.mlp
    for name in ("c_proj", "dense_4h_to_h", "down_proj"):
        if hasattr(mlp, name):
            return getattr(mlp, name)
    raise ValueError


def _attn_module(model, layer):
    block = _blocks(model)[layer]
    for name in ("attn", "attention", "self_attn"):
        if hasattr(block, name):
            return getattr(block, name)


@contextmanager
def plain_hooks(model, edits):
    """edits: list of (kind, layer, unit, fn) where fn(old_slice) -> new_slice.
    kind 'head': the head's slice of the output projection's input at every position;
    'neuron': column of the MLP out projection's input; 'attn'/'mlp': the block output."""
    handles = []
    d_head = model.config.hidden_size // model.config.num_attention_heads
    for kind, layer, unit, fn in edits:
        if kind == "head":
            def pre(mod, args, unit=unit, fn=fn):
                x = args[0].clone()
                sl = slice(unit * d_head, (unit + 1) * d_head)
                x[..., sl] = fn(x[..., sl])
                return (x,) + args[1:]
            handles.append(_attn_out_proj(model, layer).register_forward_pre_hook(pre))
        elif kind == "neuron":
            def pre(mod, args, unit=unit, fn=fn):
                x = args[0].clone()
                x[..., unit] = fn(x[..., unit])
                return (x,) + args[1:]
            handles.append(_mlp_in_of_out_proj(model, layer).register_forward_pre_hook(pre))
        elif kind in ("attn", "mlp"):
            mod = _attn_module(model, layer) if kind == "attn" else _blocks(model)[layer].mlp

            def post(mod, args, out, fn=fn):
                if isinstance(out, tuple):
                    return (fn(out[0]),) + out[1:]
                return fn(out)
            handles.append(mod.register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_plain(model, layer_kinds):
    """Capture the inputs of output projections: ('head', layer) -> [b, s, h*d_head];
    ('neuron', layer) -> [b, s, d_mlp]; ('attn'|'mlp', layer) -> block outputs."""
    store = {}
    handles = []
    for kind, layer in layer_kinds:
        if kind in ("head", "neuron"):
            mod = _attn_out_proj(model, layer) if kind == "head" else _mlp_in_of_out_proj(model, layer)

            def pre(m, args, key=(kind, layer)):
                store[key] = args[0].detach().clone()
            handles.append(mod.register_forward_pre_hook(pre))
        else:
            mod = _attn_module(model, layer) if kind == "attn" else _blocks(model)[layer].mlp

            def post(m, args, out, key=(kind, layer)):
                store[key] = (out[0] if isinstance(out, tuple) else out).detach().clone()
            handles.append(mod.register_forward_hook(post))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def last_logit_diff(model, ids, t, d) -> float:
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    return (logits[t] - logits[d]).item()
