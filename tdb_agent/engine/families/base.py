"""The adapter base class: one uniform view of a model family (docs/DESIGN.md §1, §4).

An adapter names the modules where hook sites live, runs the embedding and the blocks in
the engine's own forward loop (so the engine can start at any layer and compute only the
logits it needs), and exposes the weights in TransformerLens layouts:

    W_O [heads, d_head, d_model]   b_O [d_model]
    W_out [d_mlp, d_model]  b_out [d_model]
    W_U [d_model, vocab]   b_U [vocab]

Module sites are (module, Where): a forward pre-hook rewrites the module's first input, a
forward hook its output; "stream" (hook_resid_mid) rewrites the block's own residual tensor
in place, so the change reaches the MLP and resid_post (engine/sites.py). `hook_attn_out` /
`hook_mlp_out` are what the block writes into the residual stream: after the post-norm in
families that have one (Gemma-2/3, OLMo-2). Attention internals are served by `engine.attention`.

A family names its modules in class attributes (BLOCKS, ATTN, O_PROJ, MLP_ACT, ...: the
Llama layout is the default) and overrides methods only where its computation differs.
What a family may add beyond the plain pre-norm block:
* `norm_offset` 1.0: the norm multiplies by (1 + weight) (Gemma).
* `post_attn_norm` / `post_mlp_norm`: an RMSNorm on the block's output before the residual
  add; decompositions freeze its scale at the clean value (docs/DESIGN.md §4).
* `logit_scale`, `final_softcap`: logits = softcap * tanh(scale * W_U x / softcap).
* `layer_kwargs`: block arguments that differ per layer (Gemma-3's per-layer-type rotary).
"""

from __future__ import annotations

from functools import reduce
from typing import Literal

import torch
from torch import nn

from tdb_agent.engine.placement import param
from tdb_agent.engine.spec import ModelSpec

# output_copy: the block changes the output in place; stream: the input is the block's own
# residual stream tensor, which hooks rewrite in place (engine/sites.py)
Where = Literal["input", "output", "output_copy", "stream"]


class Adapter:
    """Base class; subclasses fill in the module paths of one family."""

    family = "base"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_offset = 0.0  # Gemma's norms multiply by (1 + weight)
    parallel_residual = False
    gated_mlp = False

    # module names, dotted: BLOCKS, FINAL_NORM and the embeddings under `base`, the rest
    # under a block. None: the family has no such module.
    BLOCKS = "layers"
    ATTN = "self_attn"
    O_PROJ = "self_attn.o_proj"
    MLP = "mlp"
    MLP_ACT = "mlp.act_fn"  # its input is mlp.hook_pre
    MLP_OUT = "mlp.down_proj"  # its input is mlp.hook_post (gated MLPs)
    LN1: str | None = "input_layernorm"
    LN2: str | None = "post_attention_layernorm"
    POST_ATTN_NORM: str | None = None  # RMSNorm on the attention output (Gemma-2/3, OLMo-2)
    POST_MLP_NORM: str | None = None
    FINAL_NORM = "norm"
    EMBED = "embed_tokens"
    POS_EMBED: str | None = None  # learned positions, called with the position ids

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    @classmethod
    def refusal(cls, config) -> str | None:
        """Why this configuration of the family cannot be decomposed exactly (None: it can)."""
        return None

    # ---- structure -------------------------------------------------------------------
    @property
    def base(self) -> nn.Module:
        return self.model.base_model

    def blocks(self) -> list[nn.Module]:
        return list(_get(self.base, self.BLOCKS))

    def block(self, layer: int) -> nn.Module:
        return _get(self.base, self.BLOCKS)[layer]

    def _in_block(self, layer: int, path: str | None) -> nn.Module | None:
        return None if path is None else _get(self.block(layer), path)

    def attn(self, layer: int) -> nn.Module:
        return self._in_block(layer, self.ATTN)

    def mlp(self, layer: int) -> nn.Module:
        return self._in_block(layer, self.MLP)

    def ln1(self, layer: int) -> nn.Module | None:
        return self._in_block(layer, self.LN1)

    def ln2(self, layer: int) -> nn.Module | None:
        return self._in_block(layer, self.LN2)

    def resid_mid_site(self, layer: int) -> tuple[nn.Module, Where]:
        """Where the residual stream between attention and MLP can be hooked: the input of
        the first module the block calls on it, which is the same tensor the block adds to
        the MLP's output (every sequential family, tested)."""
        return (self.ln2(layer), "stream") if self.LN2 else (self.mlp(layer), "stream")

    def post_attn_norm(self, layer: int) -> nn.Module | None:
        return self._in_block(layer, self.POST_ATTN_NORM)

    def post_mlp_norm(self, layer: int) -> nn.Module | None:
        return self._in_block(layer, self.POST_MLP_NORM)

    def final_norm(self) -> nn.Module:
        return _get(self.base, self.FINAL_NORM)

    def unembed(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def embed_modules(self) -> dict[str, nn.Module]:
        """Site name -> embedding module whose output is that site."""
        mods = {"hook_embed": _get(self.base, self.EMBED)}
        return mods | ({"hook_pos_embed": _get(self.base, self.POS_EMBED)} if self.POS_EMBED else {})

    def mlp_act(self, layer: int) -> nn.Module:
        return self._in_block(layer, self.MLP_ACT)

    def mlp_out_proj(self, layer: int) -> nn.Module:
        return self._in_block(layer, self.MLP_OUT)

    def attn_out_proj(self, layer: int) -> nn.Module:
        return self._in_block(layer, self.O_PROJ)

    def module_sites(self, n_layers: int) -> dict[str, tuple[nn.Module, Where]]:
        sites: dict[str, tuple[nn.Module, Where]] = {}
        for name, mod in self.embed_modules().items():
            sites[name] = (mod, "output")
        for layer, block in enumerate(self.blocks()):
            p = f"blocks.{layer}."
            post_attn, post_mlp = self.post_attn_norm(layer), self.post_mlp_norm(layer)
            sites[p + "hook_resid_pre"] = (block, "input")
            sites[p + "hook_attn_out"] = (post_attn or self.attn(layer), "output")
            if not self.parallel_residual:
                sites[p + "hook_resid_mid"] = self.resid_mid_site(layer)
            sites[p + "ln2.hook_normalized"] = (self.mlp(layer), "input")  # the MLP's input (transcoders)
            sites[p + "mlp.hook_pre"] = (self.mlp_act(layer), "input")
            if self.gated_mlp:  # post = act(gate) * up, the input of the down projection
                sites[p + "mlp.hook_post"] = (self.mlp_out_proj(layer), "input")
            else:
                sites[p + "mlp.hook_post"] = (self.mlp_act(layer), "output")
            sites[p + "hook_mlp_out"] = (post_mlp or self.mlp(layer), "output")
            sites[p + "hook_resid_post"] = (block, "output")
        return sites

    # ---- forward pieces --------------------------------------------------------------
    def embed(self, ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = _get(self.base, self.EMBED)(ids)
        return x + _get(self.base, self.POS_EMBED)(position_ids) if self.POS_EMBED else x

    def block_kwargs(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict:
        """Keyword arguments of every block (rotary embeddings, positions)."""
        return {"position_embeddings": self.base.rotary_emb(hidden, position_ids=position_ids),
                "position_ids": position_ids}

    def layer_kwargs(self, layer: int, kwargs: dict) -> dict:
        """The block_kwargs block `layer` gets (the same for every layer unless overridden)."""
        return kwargs

    @property
    def logit_scale(self) -> float:
        return 1.0

    @property
    def final_softcap(self) -> float | None:
        return None

    # ---- weights ---------------------------------------------------------------------
    def spec(self) -> ModelSpec:
        c = self.config
        n_heads = c.num_attention_heads
        return ModelSpec(
            family=self.family,
            architecture=type(self.model).__name__,
            n_layers=c.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=self.n_kv_heads(),
            d_model=c.hidden_size,
            d_head=self.W_O(0).shape[1],
            d_mlp=self.W_out(0).shape[0],
            vocab_size=c.vocab_size,
            n_ctx=getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions"),
            norm=self.norm,
            parallel_residual=self.parallel_residual,
            gated_mlp=self.gated_mlp,
        )

    def n_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads

    def W_O(self, layer: int) -> torch.Tensor:
        w = self._p(self.attn_out_proj(layer))  # nn.Linear: [d, h*dh]
        return w.T.reshape(self.config.num_attention_heads, -1, w.shape[0])

    def b_O(self, layer: int) -> torch.Tensor | None:
        return self._p(self.attn_out_proj(layer), "bias")

    def W_QKV(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """W_Q [heads, d_model, d_head], W_K and W_V [kv_heads, d_model, d_head] (no biases,
        before rotary): what each head reads from the normalised residual stream. Default:
        separate q_proj / k_proj / v_proj linears (the Llama layout)."""
        a = self.attn(layer)
        dh = self.W_O(layer).shape[1]

        def heads(lin):
            w = self._p(lin)  # [n * dh, d]
            return w.T.reshape(w.shape[1], -1, dh).transpose(0, 1)
        return heads(a.q_proj), heads(a.k_proj), heads(a.v_proj)

    def W_out(self, layer: int) -> torch.Tensor:
        return self._p(self.mlp_out_proj(layer)).T

    def b_out(self, layer: int) -> torch.Tensor | None:
        return self._p(self.mlp_out_proj(layer), "bias")

    def W_U(self) -> torch.Tensor:
        return self._p(self.unembed()).T

    def b_U(self) -> torch.Tensor | None:
        return self._p(self.unembed(), "bias")

    def norm_gain(self, module: nn.Module) -> torch.Tensor | None:
        """The multiplier a norm applies after normalising (None: none): weight, or 1 + weight."""
        w = self._p(module)
        return w if w is None or not self.norm_offset else w.float() + self.norm_offset

    home: torch.device | None = None  # set by the engine for models spread over devices

    def _p(self, module: nn.Module, name: str = "weight") -> torch.Tensor | None:
        """A weight, materialised where accelerate offloaded it, on the engine's home device."""
        t = param(module, name)
        return t if t is None or self.home is None or t.device == self.home else t.to(self.home)


def _get(root: nn.Module, path: str) -> nn.Module:
    return reduce(getattr, path.split("."), root)
