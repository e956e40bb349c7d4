"""Module hook sites: the forward hooks that run the engine's hooks at a module's input or
output, and what a change made at each site does to the rest of the forward pass.

Every site's result is what flows on (TransformerLens semantics; tests/test_resid_mid.py,
tests/test_families.py):

* hook_embed, hook_pos_embed: their sum is the residual stream entering block 0.
* blocks.{l}.hook_resid_pre: the block's input, so both the attention's input and the
  residual the block adds to (in parallel blocks, also the MLP's input).
* attn.hook_q / hook_k / hook_v / hook_attn_scores / hook_pattern / hook_z: the attention
  computation from there on (engine/attention.py).
* hook_attn_out: what attention writes (after the post-norm where there is one), added to
  the residual stream: resid_mid = resid_pre + attn_out (as hooked).
* hook_resid_mid (sequential blocks only): the residual stream between attention and MLP,
  both the MLP's input and what the block adds the MLP's output to: resid_post =
  resid_mid (as hooked) + mlp_out. Parallel blocks (GPT-J, Falcon parallel/new, Cohere,
  NeoX and StableLM with parallel residual) have no such stream, since attention and MLP
  read the same input, and the site is refused by name (use hook_resid_pre, hook_attn_out,
  hook_mlp_out).
* ln2.hook_normalized: the MLP's input (after its norm; OLMo-2: the unnormalised stream),
  read by the MLP alone; the residual stream keeps resid_mid.
* mlp.hook_pre, mlp.hook_post: the MLP computation from there on.
* hook_mlp_out: what the MLP writes (after the post-norm), added to the residual stream;
  in Falcon's parallel blocks attention is then added to it in place, on a copy.
* hook_resid_post: the block's output, the next block's hook_resid_pre.
* hook_resid_final, ln_final.hook_normalized, hook_logits: the final norm's input, the
  unembedding's input, the logits returned (engine.forward).
* ln_final.hook_scale: read only (computed beside the final norm, which ignores it): a hook
  that returns a tensor there gets a TdbError rather than a change that is silently lost.

In half-precision models the residual-stream sites (resid_pre, resid_mid, resid_post,
resid_final) carry float32, the sites inside a block the model's dtype (engine/precision.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tdb_agent.errors import TdbError

Apply = Callable[[str, torch.Tensor], torch.Tensor]


def install_hook(module: nn.Module, where: str, site: str, apply: Apply):
    """Register the torch hook that runs `apply(site, tensor)` at `where` of `module`
    (the adapter's Where); returns its handle."""
    if where == "stream":  # before precision.py's cast: hooks see the float32 stream
        return module.register_forward_pre_hook(_stream_hook(site, apply), with_kwargs=True, prepend=True)
    if where == "input":
        def pre_hook(mod, args, kwargs):
            if args:
                return (apply(site, args[0]),) + tuple(args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = apply(site, kwargs["hidden_states"])
            return args, kwargs
        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def post_hook(mod, args, output):
        if isinstance(output, tuple):
            return (apply(site, output[0]),) + tuple(output[1:])
        out = apply(site, output)
        return out.clone() if where == "output_copy" else out  # what hooks saw stays as they saw it
    return module.register_forward_hook(post_hook)


def _stream_hook(site: str, apply: Apply):
    """The module reads the very tensor the block adds again after it (`residual = x;
    x = ln2(x); ...; residual + mlp(x)`), so the hooks' result is written back into that
    tensor and flows into both. Hooks get a copy: what they keep stays as they saw it."""
    def pre_hook(mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        y = apply(site, x.clone())
        if y.shape != x.shape:
            raise TdbError(f"a hook at {site} returned shape {list(y.shape)}; it must keep the residual stream's "
                           f"shape {list(x.shape)} (the block adds the MLP's output to it in place)")
        x.copy_(y)  # autograd: copy_ routes the gradient to the hooks' result
    return pre_hook
