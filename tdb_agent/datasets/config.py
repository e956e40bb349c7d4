"""The settings of an activation-dataset build (recorded in its manifest and checked on resume)."""

from __future__ import annotations

from dataclasses import dataclass

FORMAT_VERSION = 1  # of the store written by `pipeline.build` (manifest.json + data.safetensors)


@dataclass
class BuildConfig:
    top_k: int = 20
    n_random: int = 10
    n_quantile_bins: int = 5
    per_bin: int = 2
    window: int = 24
    lead: int = 19  # tokens before the centre in a window
    batch_size: int = 64  # documents per forward pass
    warmup_docs: int = 256
    seed: int = 0
    checkpoint_every: int = 50  # batches
    sort_buffer: int = 16  # batches whose documents are grouped by length
