"""Clean runs, their LRU cache, and reference (mean) activations.

Agents call many tools on the same prompt, so the clean run of a prompt (its activations
at the sites every operation reads) is computed once and kept in a bounded LRU cache.
Results are identical with and without the cache: the cached tensors are exactly the ones
a fresh run would produce.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from tdb_agent.engine import Engine
from tdb_agent.errors import TdbError
from tdb_agent.tasks import corpus_documents


def clean_sites(engine: Engine) -> list[str]:
    """Sites a clean run keeps: what attribution, ablation, patching and tracing read."""
    sites = ["blocks.0.hook_resid_pre", "hook_resid_final"]
    for layer in range(engine.spec.n_layers):
        p = f"blocks.{layer}."
        sites += [p + "hook_resid_pre", p + "attn.hook_z", p + "attn.hook_k", p + "attn.hook_v",
                  p + "hook_attn_out", p + "mlp.hook_post", p + "hook_mlp_out", p + "hook_resid_post"]
        if not engine.spec.parallel_residual:
            sites.append(p + "hook_resid_mid")
    return list(dict.fromkeys(sites))


@dataclass
class CleanRun:
    prompt: str
    ids: torch.Tensor  # [1, s]
    logits: torch.Tensor  # last position, full vocabulary [vocab]
    acts: dict[str, torch.Tensor]  # site -> [1, ...] (detached)

    @property
    def n_tokens(self) -> int:
        return self.ids.shape[1]

    @property
    def n_layers(self) -> int:
        return sum(1 for k in self.acts if k.endswith("attn.hook_k"))

    def prefix_kv(self, from_layer: int = 0) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Keys/values of all but the last position, per layer, in attention layout
        [1, kv_heads, s - 1, d_head]: what a one-token continuation needs."""
        return {layer: (self.acts[f"blocks.{layer}.attn.hook_k"][:, :-1].transpose(1, 2),
                        self.acts[f"blocks.{layer}.attn.hook_v"][:, :-1].transpose(1, 2))
                for layer in range(from_layer, self.n_layers)}


@torch.no_grad()
def compute_clean_run(engine: Engine, prompt: str) -> CleanRun:
    ids = engine.to_tokens(prompt)
    out, acts = engine.run_with_cache(ids, clean_sites(engine), logit_positions=[-1])
    return CleanRun(prompt=prompt, ids=ids, logits=out.logits[0, -1], acts={k: v.detach() for k, v in acts.items()})


class RunCache:
    """Bounded LRU of clean runs, keyed by prompt (one model per cache)."""

    def __init__(self, engine: Engine, max_runs: int = 8):
        self.engine = engine
        self.max_runs = max_runs
        self._runs: OrderedDict[str, CleanRun] = OrderedDict()
        self._means: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, prompt: str) -> CleanRun:
        with self._lock:
            if prompt in self._runs:
                self._runs.move_to_end(prompt)
                self.hits += 1
                return self._runs[prompt]
        run = compute_clean_run(self.engine, prompt)
        with self._lock:
            self.misses += 1
            self._runs[prompt] = run
            while len(self._runs) > self.max_runs:
                self._runs.popitem(last=False)
        return run

    def mean(self, site: str) -> torch.Tensor:
        return self.means([site])[site]

    def means(self, sites: list[str]) -> dict[str, torch.Tensor]:
        """Reference means of many sites; those not cached yet come from one corpus pass."""
        with self._lock:
            missing = [s for s in sites if s not in self._means]
        if missing:
            values = reference_means(self.engine, missing)
            with self._lock:
                for s, v in values.items():
                    self._means.setdefault(s, v)
        with self._lock:
            return {s: self._means[s] for s in sites}

    def clear(self) -> None:
        with self._lock:
            self._runs.clear()
            self._means.clear()


def get_run(engine: Engine, prompt: str, cache: RunCache | None) -> CleanRun:
    return cache.get(prompt) if cache is not None else compute_clean_run(engine, prompt)


def get_mean(engine: Engine, site: str, cache: RunCache | None) -> torch.Tensor:
    return get_means(engine, [site], cache)[site]


def get_means(engine: Engine, sites: list[str], cache: RunCache | None) -> dict[str, torch.Tensor]:
    """Reference means of several sites: one pass over the reference corpus, not one per site."""
    return cache.means(sites) if cache is not None else reference_means(engine, list(dict.fromkeys(sites)))


REFERENCE_DOCS = 48
REFERENCE_SEED = 4242
REFERENCE_FILE = "reference.txt"


def reference_documents(engine: Engine) -> list[str]:
    """The reference set of mean ablation: the model folder's `reference.txt` (one document
    per line) where it has one, else documents of the built-in synthetic corpus.

    Why: a mean over text the model never sees (another tokenizer's words, all unknown
    tokens) is no "typical activation"; a model trained on other data ships its own."""
    folder = getattr(engine.model.config, "_name_or_path", "") or ""
    path = Path(folder) / REFERENCE_FILE if folder else None
    if path is not None and path.is_file():
        docs = [line for line in path.read_text().splitlines() if line.strip()]
        if docs:
            return docs[:REFERENCE_DOCS]
    return corpus_documents(REFERENCE_DOCS, seed=REFERENCE_SEED)


@torch.no_grad()
def reference_means(engine: Engine, sites: list[str], prompts: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Mean activation per site over every token of a reference set (default: documents of
    the built-in synthetic corpus): shape [units..] without batch and position dims.

    This is the `mean` of mean-ablation and of the act x grad reference (docs/DESIGN.md §4). A site
    named twice is summed once (else its mean would be counted twice).
    """
    sites = list(dict.fromkeys(sites))
    prompts = prompts or reference_documents(engine)
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for text in prompts:
        ids = engine.to_tokens(text, truncate=True)
        _, acts = engine.run_with_cache(ids, sites, logit_positions=[-1], logit_ids=[0])
        for site in sites:
            a = acts[site]
            if a.dim() == 4 and site.endswith(("hook_pattern", "hook_attn_scores")):
                raise TdbError(f"no mean is defined for {site}")
            s = a.float().sum(dim=(0, 1))
            sums[site] = sums[site] + s if site in sums else s
        count += ids.shape[1]
    return {s: (v / count).to(engine.dtype) for s, v in sums.items()}
