"""Which adapter serves a model, and the refusal of the rest before any weight is read.

Adapters live in `engine/families/` (base class and one module per family group); adding
a family is one adapter class and one line in `ADAPTERS` (docs/DESIGN.md §1).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from torch import nn

from tdb_agent.engine.families.base import Adapter, Where
from tdb_agent.engine.families.gemma import Gemma2Adapter, Gemma3Adapter, GemmaAdapter
from tdb_agent.engine.families.gpt import (FalconAdapter, GPT2Adapter, GPTJAdapter, GPTNeoAdapter, NeoXAdapter,
                                           OPTAdapter)
from tdb_agent.engine.families.llama import CohereAdapter, LlamaAdapter, Olmo2Adapter, Phi3Adapter, StableLmAdapter
from tdb_agent.errors import UnsupportedModel

__all__ = ["ADAPTERS", "Adapter", "Where", "adapter_for", "check_checkpoint", "check_supported"]

ADAPTERS: dict[str, type[Adapter]] = {
    "gpt2": GPT2Adapter,
    "gpt_neox": NeoXAdapter,
    "gpt_neo": GPTNeoAdapter,
    "gptj": GPTJAdapter,
    "opt": OPTAdapter,
    "falcon": FalconAdapter,
    "llama": LlamaAdapter,
    "qwen2": LlamaAdapter,
    "mistral": LlamaAdapter,
    "qwen3": LlamaAdapter,
    "phi3": Phi3Adapter,
    "stablelm": StableLmAdapter,
    "cohere": CohereAdapter,
    "olmo2": Olmo2Adapter,
    "gemma": GemmaAdapter,
    "gemma2": Gemma2Adapter,
    "gemma3_text": Gemma3Adapter,
}

# families transformers has that are refused, with the reason (docs/DESIGN.md §1)
REFUSED: dict[str, str] = {
    "gemma3": "this is the multimodal Gemma-3 checkpoint; load its text model (model_type gemma3_text)",
}


def check_supported(config) -> None:
    """Refuse a model from its configuration alone (no weight read): unknown family, or a
    configuration of a known family that the engine cannot run or decompose exactly."""
    model_type = getattr(config, "model_type", None)
    supported = ", ".join(sorted(ADAPTERS))
    if model_type in REFUSED:
        raise UnsupportedModel(f"model family {model_type!r} is not supported: {REFUSED[model_type]}. "
                               f"Supported families: {supported}")
    if model_type not in ADAPTERS:
        raise UnsupportedModel(f"model family {model_type!r} is not supported (no adapter knows its blocks). "
                               f"Supported families: {supported}")
    reason = ADAPTERS[model_type].refusal(config)
    if reason:
        raise UnsupportedModel(f"this {model_type} model is not supported: {reason}")


def adapter_for(model: nn.Module) -> Adapter:
    check_supported(model.config)
    return ADAPTERS[model.config.model_type](model)


def check_checkpoint(src: str, local: bool, allow_download: bool) -> None:
    """`check_supported` from the checkpoint's config.json, before the tokenizer or any weight
    is read; an unknown model_type is refused from the raw json (transformers may not know it)."""
    from transformers import AutoConfig

    raw = Path(src) / "config.json"
    if local and raw.is_file():
        try:
            model_type = json.loads(raw.read_text()).get("model_type")
        except (OSError, ValueError) as e:
            raise UnsupportedModel(f"{raw} is not a readable model configuration: {e}") from None
        if model_type not in ADAPTERS:
            check_supported(SimpleNamespace(model_type=model_type))
    check_supported(AutoConfig.from_pretrained(src, local_files_only=not allow_download))
