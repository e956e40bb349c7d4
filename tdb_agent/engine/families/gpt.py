"""GPT-style families: GPT-2, GPT-NeoX (Pythia), GPT-J and Falcon (docs/DESIGN.md §4).

GPT-J and Falcon (parallel_attn) run attention and MLP side by side on one normalised
input: residual + attn(ln(x)) + mlp(ln(x)); their `ln2` is that same norm.
"""

from __future__ import annotations

from tdb_agent.engine.attention import tdb_attention
from tdb_agent.engine.families.base import Adapter


class GPT2Adapter(Adapter):
    family = "gpt2"
    BLOCKS, ATTN, O_PROJ, MLP_ACT, MLP_OUT = "h", "attn", "attn.c_proj", "mlp.act", "mlp.c_proj"
    LN1, LN2, FINAL_NORM, EMBED, POS_EMBED = "ln_1", "ln_2", "ln_f", "wte", "wpe"

    def block_kwargs(self, hidden, position_ids):
        return {}

    # Conv1D stores weights as [in, out]
    def W_O(self, layer):
        w = self._p(self.attn_out_proj(layer))  # [h*dh, d]
        return w.reshape(self.config.num_attention_heads, -1, w.shape[-1])

    def W_out(self, layer):
        return self._p(self.mlp_out_proj(layer))  # [d_mlp, d]

    def W_QKV(self, layer):
        w = self._p(self.attn(layer).c_attn)  # [d, 3 * h * dh]
        d, h = w.shape[0], self.config.num_attention_heads
        return tuple(part.reshape(d, h, -1).transpose(0, 1) for part in w.split(w.shape[1] // 3, dim=1))


class GPTNeoAdapter(GPT2Adapter):
    """GPT-Neo: GPT-2's layout with nn.Linear weights, unscaled attention scores, and local
    layers that see the last `window_size` keys. Its attention does not go through
    transformers' attention interface, so the adapter routes each layer's `_attn` (the
    score-softmax-mix step, after q/k/v are split into heads) to the engine's attention."""

    W_QKV = Adapter.W_QKV  # separate q/k/v projections under attn.attention, not GPT-2's c_attn

    family = "gpt_neo"
    ATTN, O_PROJ = "attn.attention", "attn.attention.out_proj"
    W_O, W_out = Adapter.W_O, Adapter.W_out

    def __init__(self, model):
        super().__init__(model)
        for layer, kind in enumerate(model.config.attention_layers):
            mod = self.attn(layer)
            mod._attn = _neo_attention(mod, model.config.window_size if kind == "local" else None)


def _neo_attention(module, window):
    def attn(query, key, value, attention_mask=None):
        z, pattern = tdb_attention(module, query, key, value, None, scaling=1.0, sliding_window=window)
        return z.transpose(1, 2), pattern  # GPT-Neo merges heads from [b, heads, pos, d_head]
    return attn


class OPTAdapter(Adapter):
    """OPT with pre-LayerNorm blocks (every size but 350m). Its block flattens positions
    before the MLP ([b*s, d]); the adapter gives each block the same computation without
    the flattening, so MLP sites keep the [b, s, ...] layout (tested against transformers)."""

    family = "opt"
    O_PROJ, MLP, MLP_ACT, MLP_OUT = "self_attn.out_proj", "fc2", "activation_fn", "fc2"
    LN1, LN2, FINAL_NORM, POS_EMBED = "self_attn_layer_norm", "final_layer_norm", "final_layer_norm", "embed_positions"

    def __init__(self, model):
        super().__init__(model)
        for block in self.blocks():
            block.forward = _opt_block_forward(block)

    @classmethod
    def refusal(cls, config):
        if not config.do_layer_norm_before or getattr(config, "_remove_final_layer_norm", False):
            return ("this OPT configuration normalises after each block (post-LayerNorm, as opt-350m), so "
                    "component writes are not additive in the residual stream")
        if config.word_embed_proj_dim != config.hidden_size:
            return "this OPT configuration projects embeddings in and out of the residual stream"
        return None

    @property
    def base(self):
        return self.model.base_model.decoder

    def embed(self, ids, position_ids):
        return self.base.embed_tokens(ids) + self.base.embed_positions(None, 0, position_ids=position_ids)

    def module_sites(self, n_layers):
        sites = super().module_sites(n_layers)
        for layer, block in enumerate(self.blocks()):  # the MLP's input is fc1's (MLP names fc2, its output)
            sites[f"blocks.{layer}.ln2.hook_normalized"] = (block.fc1, "input")
        return sites

    def block_kwargs(self, hidden, position_ids):
        return {"position_ids": position_ids}


def _opt_block_forward(block):
    def forward(hidden_states, attention_mask=None, position_ids=None, **kwargs):
        attn, _ = block.self_attn(hidden_states=block.self_attn_layer_norm(hidden_states), position_ids=position_ids,
                                  attention_mask=attention_mask, **kwargs)
        hidden_states = hidden_states + attn
        mlp = block.fc2(block.activation_fn(block.fc1(block.final_layer_norm(hidden_states))))
        return hidden_states + mlp
    return forward


class NeoXAdapter(Adapter):
    family = "gpt_neox"
    ATTN, O_PROJ, MLP_ACT, MLP_OUT = "attention", "attention.dense", "mlp.act", "mlp.dense_4h_to_h"
    FINAL_NORM, EMBED = "final_layer_norm", "embed_in"

    def __init__(self, model):
        super().__init__(model)
        self.parallel_residual = bool(model.config.use_parallel_residual)

    def W_QKV(self, layer):
        w = self._p(self.attn(layer).query_key_value)  # [h * 3 * dh, d], rows (head, q|k|v, dh)
        h = self.config.num_attention_heads
        w = w.reshape(h, 3, -1, w.shape[-1]).transpose(-1, -2)  # [h, 3, d, dh]
        return w[:, 0], w[:, 1], w[:, 2]


class GPTJAdapter(Adapter):
    """GPT-J: parallel attention and MLP on one LayerNorm, rotary on the first rotary_dim."""

    family = "gptj"
    parallel_residual = True
    BLOCKS, ATTN, O_PROJ, MLP_ACT, MLP_OUT = "h", "attn", "attn.out_proj", "mlp.act", "mlp.fc_out"
    LN1, LN2, FINAL_NORM, EMBED = "ln_1", "ln_1", "ln_f", "wte"


class FalconAdapter(Adapter):
    """Falcon with rotary positions: sequential, parallel on one LayerNorm, or the new
    decoder architecture (two LayerNorms, grouped-query attention)."""

    family = "falcon"
    BLOCKS, ATTN, O_PROJ = "h", "self_attention", "self_attention.dense"
    MLP_ACT, MLP_OUT, FINAL_NORM, EMBED = "mlp.act", "mlp.dense_4h_to_h", "ln_f", "word_embeddings"

    def __init__(self, model):
        super().__init__(model)
        c = model.config
        self.parallel_residual = bool(c.parallel_attn or c.new_decoder_architecture)
        if c.new_decoder_architecture and (c.num_ln_in_parallel_attn or 2) == 2:
            self.LN1, self.LN2 = "ln_attn", "ln_mlp"
        elif self.parallel_residual:
            self.LN2 = "input_layernorm"

    @classmethod
    def refusal(cls, config):
        if getattr(config, "alibi", False):
            return ("this Falcon configuration uses ALiBi position biases, which the engine's attention "
                    "(built on the causal mask alone) does not apply")
        return None

    def block_kwargs(self, hidden, position_ids):
        return super().block_kwargs(hidden, position_ids) | {"attention_mask": None}

    def module_sites(self, n_layers):
        sites = super().module_sites(n_layers)
        if self.parallel_residual:  # the block adds attention into the MLP's output in place
            for layer in range(n_layers):
                sites[f"blocks.{layer}.hook_mlp_out"] = (self.mlp(layer), "output_copy")
        return sites

    def n_kv_heads(self):
        c = self.config
        return c.num_kv_heads if (c.new_decoder_architecture or not c.multi_query) else 1

    def W_QKV(self, layer):
        """The fused query_key_value rows: per key/value group its queries, key and value (new
        architecture), all queries then one key and one value (multi-query), or q, k, v per head."""
        w = self._p(self.attn(layer).query_key_value)  # [rows, d]
        c, dh, d = self.config, self.W_O(layer).shape[1], w.shape[1]
        if c.new_decoder_architecture:
            g = w.reshape(self.n_kv_heads(), -1, dh, d)
            q, k, v = g[:, :-2].reshape(-1, dh, d), g[:, -2], g[:, -1]
        elif c.multi_query:
            q, k, v = w.reshape(-1, dh, d).split([c.num_attention_heads, 1, 1])
        else:
            q, k, v = w.reshape(c.num_attention_heads, 3, dh, d).unbind(1)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
