"""Architecture adapters: one uniform view of GPT-2, GPT-NeoX (Pythia) and Llama-family models.

An adapter names the modules where hook sites live, runs the embedding and the blocks in
the engine's own forward loop (so the engine can start at any layer and compute only the
logits it needs), and exposes the weights in TransformerLens layouts:

    W_Q/W_K/W_V [heads, d_model, d_head]  (K/V: kv_heads)   b_Q/b_K/b_V [heads, d_head]
    W_O [heads, d_head, d_model]   b_O [d_model]
    W_in [d_model, d_mlp]  b_in [d_mlp]   W_out [d_mlp, d_model]   b_out [d_model]
    W_U [d_model, vocab]   b_U [vocab]

Module sites are (module, "input" | "output"): a forward pre-hook rewrites the module's
first input, a forward hook its output. Attention internals are served by
`engine.attention`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from tdb_agent.engine.placement import param
from tdb_agent.engine.spec import ModelSpec

Where = Literal["input", "output"]


class Adapter:
    """Base class; subclasses fill in the module paths of one family."""

    family = "base"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # ---- structure -------------------------------------------------------------------
    @property
    def base(self) -> nn.Module:
        return self.model.base_model

    def blocks(self) -> list[nn.Module]:
        raise NotImplementedError

    def attn(self, layer: int) -> nn.Module:
        raise NotImplementedError

    def mlp(self, layer: int) -> nn.Module:
        raise NotImplementedError

    def ln1(self, layer: int) -> nn.Module:
        raise NotImplementedError

    def ln2(self, layer: int) -> nn.Module:
        raise NotImplementedError

    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    def unembed(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def embed_modules(self) -> dict[str, nn.Module]:
        """Site name -> embedding module whose output is that site."""
        raise NotImplementedError

    parallel_residual = False
    gated_mlp = False

    def mlp_act(self, layer: int) -> nn.Module:
        raise NotImplementedError

    def mlp_out_proj(self, layer: int) -> nn.Module:
        raise NotImplementedError

    def module_sites(self, n_layers: int) -> dict[str, tuple[nn.Module, Where]]:
        sites: dict[str, tuple[nn.Module, Where]] = {}
        for name, mod in self.embed_modules().items():
            sites[name] = (mod, "output")
        for layer, block in enumerate(self.blocks()):
            p = f"blocks.{layer}."
            sites[p + "hook_resid_pre"] = (block, "input")
            sites[p + "hook_attn_out"] = (self.attn(layer), "output")
            if not self.parallel_residual:
                sites[p + "hook_resid_mid"] = (self.ln2(layer), "input")
            sites[p + "hook_mlp_in"] = (self.mlp(layer), "input")  # the MLP's input: ln2's output
            sites[p + "mlp.hook_pre"] = (self.mlp_act(layer), "input")
            if self.gated_mlp:  # post = act(gate) * up, the input of the down projection
                sites[p + "mlp.hook_post"] = (self.mlp_out_proj(layer), "input")
            else:
                sites[p + "mlp.hook_post"] = (self.mlp_act(layer), "output")
            sites[p + "hook_mlp_out"] = (self.mlp(layer), "output")
            sites[p + "hook_resid_post"] = (block, "output")
        return sites

    # ---- forward pieces --------------------------------------------------------------
    def embed(self, ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def block_kwargs(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict:
        return {}

    # ---- weights ---------------------------------------------------------------------
    def spec(self) -> ModelSpec:
        c = self.config
        n_heads = c.num_attention_heads
        return ModelSpec(
            family=self.family,
            architecture=type(self.model).__name__,
            n_layers=c.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=getattr(c, "num_key_value_heads", None) or n_heads,
            d_model=c.hidden_size,
            d_head=getattr(c, "head_dim", None) or c.hidden_size // n_heads,
            d_mlp=self.W_out(0).shape[0],
            vocab_size=c.vocab_size,
            n_ctx=getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions"),
            norm=self.norm,
            parallel_residual=self.parallel_residual,
            gated_mlp=self.gated_mlp,
        )

    def W_O(self, layer: int) -> torch.Tensor:
        raise NotImplementedError

    def W_QKV(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """W_Q [heads, d_model, d_head], W_K and W_V [kv_heads, d_model, d_head] (no biases,
        before rotary): what each head reads from the normalised residual stream."""
        raise NotImplementedError

    def b_O(self, layer: int) -> torch.Tensor | None:
        raise NotImplementedError

    def W_out(self, layer: int) -> torch.Tensor:
        raise NotImplementedError

    def b_out(self, layer: int) -> torch.Tensor | None:
        raise NotImplementedError

    def W_U(self) -> torch.Tensor:
        return self._p(self.unembed()).T

    def b_U(self) -> torch.Tensor | None:
        return self._p(self.unembed(), "bias")

    home: torch.device | None = None  # set by the engine for models spread over devices

    def _p(self, module: nn.Module, name: str = "weight") -> torch.Tensor | None:
        """A weight, materialised where accelerate offloaded it, on the engine's home device."""
        t = param(module, name)
        return t if t is None or self.home is None or t.device == self.home else t.to(self.home)


class GPT2Adapter(Adapter):
    family = "gpt2"

    def blocks(self):
        return list(self.base.h)

    def attn(self, layer):
        return self.base.h[layer].attn

    def mlp(self, layer):
        return self.base.h[layer].mlp

    def ln1(self, layer):
        return self.base.h[layer].ln_1

    def ln2(self, layer):
        return self.base.h[layer].ln_2

    def final_norm(self):
        return self.base.ln_f

    def embed_modules(self):
        return {"hook_embed": self.base.wte, "hook_pos_embed": self.base.wpe}

    def mlp_act(self, layer):
        return self.base.h[layer].mlp.act

    def mlp_out_proj(self, layer):
        return self.base.h[layer].mlp.c_proj

    def embed(self, ids, position_ids):
        return self.base.wte(ids) + self.base.wpe(position_ids)

    # Conv1D stores weights as [in, out]
    def W_O(self, layer):
        w = self._p(self.attn(layer).c_proj)  # [h*dh, d]
        return w.reshape(self.config.num_attention_heads, -1, w.shape[-1])

    def b_O(self, layer):
        return self._p(self.attn(layer).c_proj, "bias")

    def W_QKV(self, layer):
        w = self._p(self.attn(layer).c_attn)  # [d, 3 * h * dh]
        d, h = w.shape[0], self.config.num_attention_heads
        return tuple(part.reshape(d, h, -1).transpose(0, 1) for part in w.split(w.shape[1] // 3, dim=1))

    def W_out(self, layer):
        return self._p(self.mlp(layer).c_proj)  # [d_mlp, d]

    def b_out(self, layer):
        return self._p(self.mlp(layer).c_proj, "bias")


class NeoXAdapter(Adapter):
    family = "gpt_neox"

    def __init__(self, model):
        super().__init__(model)
        self.parallel_residual = bool(model.config.use_parallel_residual)

    def blocks(self):
        return list(self.base.layers)

    def attn(self, layer):
        return self.base.layers[layer].attention

    def mlp(self, layer):
        return self.base.layers[layer].mlp

    def ln1(self, layer):
        return self.base.layers[layer].input_layernorm

    def ln2(self, layer):
        return self.base.layers[layer].post_attention_layernorm

    def final_norm(self):
        return self.base.final_layer_norm

    def embed_modules(self):
        return {"hook_embed": self.base.embed_in}

    def mlp_act(self, layer):
        return self.mlp(layer).act

    def mlp_out_proj(self, layer):
        return self.mlp(layer).dense_4h_to_h

    def embed(self, ids, position_ids):
        return self.base.embed_in(ids)

    def block_kwargs(self, hidden, position_ids):
        return {"position_embeddings": self.base.rotary_emb(hidden, position_ids=position_ids),
                "position_ids": position_ids}

    def W_O(self, layer):
        w = self._p(self.attn(layer).dense)  # [d, h*dh]
        return w.T.reshape(self.config.num_attention_heads, -1, w.shape[0])

    def b_O(self, layer):
        return self._p(self.attn(layer).dense, "bias")

    def W_QKV(self, layer):
        w = self._p(self.attn(layer).query_key_value)  # [h * 3 * dh, d], rows (head, q|k|v, dh)
        h = self.config.num_attention_heads
        w = w.reshape(h, 3, -1, w.shape[-1]).transpose(-1, -2)  # [h, 3, d, dh]
        return w[:, 0], w[:, 1], w[:, 2]

    def W_out(self, layer):
        return self._p(self.mlp(layer).dense_4h_to_h).T

    def b_out(self, layer):
        return self._p(self.mlp(layer).dense_4h_to_h, "bias")


class LlamaAdapter(Adapter):
    """Llama, Qwen2, Mistral and friends: rotary, RMSNorm, grouped-query attention, gated MLP."""

    family = "llama"
    norm = "rmsnorm"
    gated_mlp = True

    def blocks(self):
        return list(self.base.layers)

    def attn(self, layer):
        return self.base.layers[layer].self_attn

    def mlp(self, layer):
        return self.base.layers[layer].mlp

    def ln1(self, layer):
        return self.base.layers[layer].input_layernorm

    def ln2(self, layer):
        return self.base.layers[layer].post_attention_layernorm

    def final_norm(self):
        return self.base.norm

    def embed_modules(self):
        return {"hook_embed": self.base.embed_tokens}

    def mlp_act(self, layer):
        return self.mlp(layer).act_fn

    def mlp_out_proj(self, layer):
        return self.mlp(layer).down_proj

    def embed(self, ids, position_ids):
        return self.base.embed_tokens(ids)

    def block_kwargs(self, hidden, position_ids):
        return {"position_embeddings": self.base.rotary_emb(hidden, position_ids=position_ids),
                "position_ids": position_ids}

    def W_O(self, layer):
        w = self._p(self.attn(layer).o_proj)  # [d, h*dh]
        return w.T.reshape(self.config.num_attention_heads, -1, w.shape[0])

    def b_O(self, layer):
        return self._p(self.attn(layer).o_proj, "bias")

    def W_QKV(self, layer):
        a = self.attn(layer)

        def heads(lin):
            w = self._p(lin)  # [n * dh, d]
            return w.T.reshape(w.shape[1], -1, a.head_dim).transpose(0, 1)
        return heads(a.q_proj), heads(a.k_proj), heads(a.v_proj)

    def W_out(self, layer):
        return self._p(self.mlp(layer).down_proj).T

    def b_out(self, layer):
        return self._p(self.mlp(layer).down_proj, "bias")


ADAPTERS: dict[str, type[Adapter]] = {
    "gpt2": GPT2Adapter,
    "gpt_neox": NeoXAdapter,
    "llama": LlamaAdapter,
    "qwen2": LlamaAdapter,
    "mistral": LlamaAdapter,
}


def adapter_for(model: nn.Module) -> Adapter:
    model_type = model.config.model_type
    if model_type not in ADAPTERS:
        raise ValueError(f"unsupported architecture {model_type!r}; supported: {', '.join(ADAPTERS)}")
    return ADAPTERS[model_type](model)
