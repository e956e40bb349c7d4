"""Tiny random-initialised models of each supported family, built locally from configs
and saved as Hugging Face folders (the engine loads them like any model)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM,
                          LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from tdb_agent.tasks.tokenizer import build_tokenizer


def _config(family: str, vocab: int):
    if family == "gpt2":
        return GPT2LMHeadModel, GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2,
                                           n_head=4, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    if family == "gpt_neox":
        return GPTNeoXForCausalLM, GPTNeoXConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=4, intermediate_size=64,
                                                 max_position_embeddings=64, rotary_pct=0.5,
                                                 use_parallel_residual=True)
    if family == "llama":
        return LlamaForCausalLM, LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             intermediate_size=48, max_position_embeddings=64)
    if family == "qwen2":
        return Qwen2ForCausalLM, Qwen2Config(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             intermediate_size=48, max_position_embeddings=64)
    if family == "mistral":
        return MistralForCausalLM, MistralConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=1,
                                                 intermediate_size=48, max_position_embeddings=64)
    raise ValueError(family)


FAMILIES = ["gpt2", "gpt_neox", "llama", "qwen2", "mistral"]


def build_tiny(family: str, folder: Path, seed: int = 0) -> Path:
    tok = build_tokenizer()
    cls, cfg = _config(family, len(tok))
    cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = tok.bos_token_id
    torch.manual_seed(seed)
    model = cls(cfg)
    with torch.no_grad():  # give biases and norms non-trivial values, so tests see them
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
