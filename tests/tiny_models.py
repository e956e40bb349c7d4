"""Tiny random-initialised models of each supported family, built locally from configs
and saved as Hugging Face folders (the engine loads them like any model).

FAMILIES: the five the engine started with, used by most tests (Mistral and Qwen2 with
sliding windows shorter than the test prompts). EXTRA_FAMILIES: the rest, exercised by the
conformance test (tests/test_families.py). Every config keeps prompts longer than any
window, grouped/multi-query attention where the family has it, and randomised norms and
biases."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf

from tdb_agent.tasks.tokenizer import build_tokenizer

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
             max_position_embeddings=64)


def _config(family: str, vocab: int):
    rotary = SMALL | dict(vocab_size=vocab)
    if family == "gpt2":
        return tf.GPT2LMHeadModel, tf.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2,
                                                 n_head=4, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    if family == "gpt_neox":
        return tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig(**rotary | dict(intermediate_size=64), rotary_pct=0.5,
                                                       use_parallel_residual=True)
    if family == "llama":
        return tf.LlamaForCausalLM, tf.LlamaConfig(**rotary, num_key_value_heads=2)
    if family == "qwen2":  # layer 1 slides over 4 keys, layer 0 is global
        return tf.Qwen2ForCausalLM, tf.Qwen2Config(**rotary, num_key_value_heads=2, use_sliding_window=True,
                                                   sliding_window=4, max_window_layers=1)
    if family == "mistral":
        return tf.MistralForCausalLM, tf.MistralConfig(**rotary, num_key_value_heads=1, sliding_window=4)
    if family == "gemma":
        return tf.GemmaForCausalLM, tf.GemmaConfig(**rotary, num_key_value_heads=1, head_dim=8)
    if family == "gemma2":
        return tf.Gemma2ForCausalLM, tf.Gemma2Config(**rotary, num_key_value_heads=2, head_dim=8, sliding_window=4,
                                                     attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                                                     query_pre_attn_scalar=10)
    if family == "gemma3_text":
        return tf.Gemma3ForCausalLM, tf.Gemma3TextConfig(**rotary, num_key_value_heads=2, head_dim=8,
                                                         sliding_window=4, query_pre_attn_scalar=10,
                                                         layer_types=["sliding_attention", "full_attention"])
    if family == "qwen3":
        return tf.Qwen3ForCausalLM, tf.Qwen3Config(**rotary, num_key_value_heads=2, head_dim=12)
    if family == "olmo2":
        return tf.Olmo2ForCausalLM, tf.Olmo2Config(**rotary, num_key_value_heads=2)
    if family == "phi3":
        return tf.Phi3ForCausalLM, tf.Phi3Config(**rotary, num_key_value_heads=2, sliding_window=5,
                                                 resid_pdrop=0, embd_pdrop=0, attention_dropout=0)
    if family == "stablelm":
        return tf.StableLmForCausalLM, tf.StableLmConfig(**rotary, num_key_value_heads=2, partial_rotary_factor=0.25,
                                                         use_qkv_bias=True, qk_layernorm=True)
    if family == "gptj":
        return tf.GPTJForCausalLM, tf.GPTJConfig(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                                 rotary_dim=4, n_inner=48, resid_pdrop=0, embd_pdrop=0,
                                                 attn_pdrop=0)
    if family == "gpt_neo":  # layer 1 is local, with a window of 4
        return tf.GPTNeoForCausalLM, tf.GPTNeoConfig(vocab_size=vocab, max_position_embeddings=64, hidden_size=32,
                                                     num_layers=2, num_heads=4, intermediate_size=48, window_size=4,
                                                     attention_types=[[["global", "local"], 1]], resid_dropout=0,
                                                     embed_dropout=0, attention_dropout=0)
    if family == "opt":
        return tf.OPTForCausalLM, tf.OPTConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, ffn_dim=48,
                                               num_attention_heads=4, max_position_embeddings=64,
                                               word_embed_proj_dim=32, dropout=0, attention_dropout=0)
    if family == "falcon":  # Falcon-7B: parallel on one LayerNorm, multi-query
        return tf.FalconForCausalLM, tf.FalconConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=4, multi_query=True, parallel_attn=True,
                                                     new_decoder_architecture=False, alibi=False, bias=True,
                                                     max_position_embeddings=64)
    if family == "falcon:new":  # Falcon-40B/180B: two LayerNorms, grouped-query
        return tf.FalconForCausalLM, tf.FalconConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=4, num_kv_heads=2, alibi=False, bias=False,
                                                     new_decoder_architecture=True, max_position_embeddings=64)
    if family == "falcon:sequential":
        return tf.FalconForCausalLM, tf.FalconConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=4, multi_query=False, parallel_attn=False,
                                                     new_decoder_architecture=False, alibi=False, bias=True,
                                                     max_position_embeddings=64)
    if family == "gpt_neox:sequential":  # use_parallel_residual=False: attention, then the MLP
        return tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig(**rotary | dict(intermediate_size=64), rotary_pct=0.5,
                                                       use_parallel_residual=False)
    if family == "stablelm:parallel":
        return tf.StableLmForCausalLM, tf.StableLmConfig(**rotary, num_key_value_heads=4, use_parallel_residual=True)
    if family == "cohere":
        return tf.CohereForCausalLM, tf.CohereConfig(**rotary, num_key_value_heads=2, logit_scale=0.5,
                                                     use_qk_norm=False)
    raise ValueError(family)


FAMILIES = ["gpt2", "gpt_neox", "llama", "qwen2", "mistral"]
EXTRA_FAMILIES = ["gemma", "gemma2", "qwen3", "olmo2", "phi3", "gemma3_text", "stablelm", "gpt_neo", "gptj",
                  "opt", "falcon", "cohere"]
# other configurations of a family (name:variant), with their own code paths in the adapter
VARIANTS = ["falcon:new", "falcon:sequential", "stablelm:parallel", "gpt_neox:sequential"]
ALL_FAMILIES = FAMILIES + EXTRA_FAMILIES + VARIANTS


def model_type(family: str) -> str:
    return family.split(":")[0]


def build_tiny(family: str, folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
               overrides: dict | None = None) -> Path:
    """overrides: config fields set on top of the family's tiny configuration."""
    tok = build_tokenizer()
    cls, cfg = _config(family, len(tok))
    for k, v in (overrides or {}).items():
        setattr(cfg, k, v)
    cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = tok.bos_token_id
    torch.manual_seed(seed)
    model = cls(cfg)
    with torch.no_grad():  # give biases and norms non-trivial values, so tests see them
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.to(dtype).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def sharpen(model: torch.nn.Module) -> None:
    """Scale a tiny random model's matrices up in place (embeddings 5x, the others 2.5x), so
    that its edges have clearly non-zero effects."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(5.0 if "emb" in name or "wte" in name else 2.5)
