"""Llama-style families: rotary positions, pre-norm blocks, gated or plain MLPs
(docs/DESIGN.md §4). Llama, Qwen2, Mistral, Qwen3 (q/k norms, head_dim set apart from
d_model / n_heads), Phi-3 (fused qkv and gate_up projections), StableLM (LayerNorm,
partial rotary, optionally parallel), Cohere (parallel, LayerNorm without bias, logit
scale) and OLMo-2 (no pre-norms: RMSNorms on the attention and MLP outputs)."""

from __future__ import annotations

from tdb_agent.engine.families.base import Adapter


class LlamaAdapter(Adapter):
    """Llama, Qwen2, Mistral, Qwen3, Phi-3: rotary, RMSNorm, grouped-query attention, gated MLP.
    Sliding windows (Mistral, Qwen2, Phi-3) arrive in the attention call (engine/attention.py)."""

    family = "llama"
    norm = "rmsnorm"
    gated_mlp = True

    def __init__(self, model):
        super().__init__(model)
        self.family = model.config.model_type


class Phi3Adapter(LlamaAdapter):
    """Phi-3: q, k, v from one fused projection; gate and up from one (hook_pre is the gate)."""

    MLP_ACT = "mlp.activation_fn"

    def W_QKV(self, layer):
        w = self._p(self.attn(layer).qkv_proj)  # [(heads + 2 kv_heads) * dh, d]: q, then k, then v
        dh, h, kv = self.W_O(layer).shape[1], self.config.num_attention_heads, self.n_kv_heads()
        q, k, v = w.split([h * dh, kv * dh, kv * dh])
        return tuple(t.reshape(-1, dh, w.shape[1]).transpose(1, 2) for t in (q, k, v))


class StableLmAdapter(Adapter):
    """StableLM: LayerNorm (with bias), partial rotary, gated MLP, optionally parallel."""

    family = "stablelm"
    gated_mlp = True

    def __init__(self, model):
        super().__init__(model)
        self.parallel_residual = bool(model.config.use_parallel_residual)
        if self.parallel_residual:
            self.LN2 = "input_layernorm"


class CohereAdapter(Adapter):
    """Cohere (Command-R): one LayerNorm (no bias) feeding attention and MLP in parallel;
    logits multiplied by `logit_scale`."""

    family = "cohere"
    parallel_residual = True
    gated_mlp = True

    LN2 = "input_layernorm"

    @property
    def logit_scale(self) -> float:
        return float(self.config.logit_scale)


class Olmo2Adapter(Adapter):
    """OLMo-2: attention and MLP read the raw residual stream; RMSNorms sit on their
    outputs (post-norms, frozen at the clean scale in decompositions)."""

    family = "olmo2"
    norm = "rmsnorm"
    gated_mlp = True

    LN1 = LN2 = None  # hook_resid_mid: the MLP's input
    POST_ATTN_NORM, POST_MLP_NORM = "post_attention_layernorm", "post_feedforward_layernorm"
