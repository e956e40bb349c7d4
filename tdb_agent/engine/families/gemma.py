"""The Gemma families (docs/DESIGN.md §4): norms that multiply by (1 + weight), embeddings
scaled by sqrt(d_model) inside the embedding module, and from Gemma-2 on sandwich norms
(an RMSNorm after attention and after the MLP, before the residual add), alternating
local (sliding-window) and global layers, attention-logit soft-capping (passed to the
attention function) and final-logit soft-capping. Gemma-3 adds q/k norms and one rotary
embedding per layer type."""

from __future__ import annotations

from tdb_agent.engine.families.base import Adapter


class GemmaAdapter(Adapter):
    family = "gemma"
    norm = "rmsnorm"
    norm_offset = 1.0
    gated_mlp = True


class Gemma2Adapter(GemmaAdapter):
    family = "gemma2"
    LN2 = "pre_feedforward_layernorm"
    POST_ATTN_NORM, POST_MLP_NORM = "post_attention_layernorm", "post_feedforward_layernorm"

    @property
    def final_softcap(self):
        return getattr(self.config, "final_logit_softcapping", None)


class Gemma3Adapter(Gemma2Adapter):
    family = "gemma3_text"

    def block_kwargs(self, hidden, position_ids):
        rotary = self.base.rotary_emb
        return {"position_embeddings": {t: rotary(hidden, position_ids, t) for t in set(self.config.layer_types)},
                "position_ids": position_ids}

    def layer_kwargs(self, layer, kwargs):
        return kwargs | {"position_embeddings": kwargs["position_embeddings"][self.config.layer_types[layer]]}
