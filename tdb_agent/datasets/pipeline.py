"""A dataset build from corpus to store, resumable: the corpus is cut into chunks
(`corpus.plan_chunks`): chunk 0 holds the warm-up batches that fix the quantile edges, the
others `checkpoint_every` batches; each chunk is built alone (`run_chunk`, by a runner: here
or on Ray workers), and the chunk states are merged in chunk order and checkpointed after
each, so an interrupted build resumes where it stopped. The result depends only on the
corpus and the settings, not on the chunks or which worker ran them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from safetensors.torch import load_file as load_torch, save_file as save_torch

from tdb_agent.datasets.builder import DatasetBuilder
from tdb_agent.datasets.components import model_fingerprint, sae_fingerprints, transcoder_fingerprints
from tdb_agent.datasets.config import FORMAT_VERSION, BuildConfig
from tdb_agent.datasets.corpus import Chunk, plan_chunks
from tdb_agent.engine import Engine
from tdb_agent.environment import describe
from tdb_agent.errors import TdbError

log = logging.getLogger(__name__)


def run_chunk(engine: Engine, cfg: BuildConfig, chunk: Chunk, edges: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The state (CPU tensors, no tokens) of one chunk built alone: what a worker returns."""
    b = DatasetBuilder(engine, cfg)
    b.docs_done, b.n_tokens, b.batches_done = chunk.doc0, chunk.tok0, chunk.batch0
    b.edges = edges.to(engine.device) if edges is not None else None
    for batch in chunk.batches:
        b.add_batch(batch)
    return {k: v.cpu() for k, v in b.state(tokens=False).items()}


class LocalRunner:
    """Runs chunks one after another in this process (the default)."""

    n_workers = 1

    def __init__(self, engine: Engine):
        self.engine = engine

    def run(self, chunks: Iterable[Chunk], cfg: BuildConfig, edges) -> Iterator[tuple[int, dict]]:
        for c in chunks:
            yield c.index, run_chunk(self.engine, cfg, c, edges)

    def close(self) -> None:
        pass


def build(engine: Engine, docs: Iterable[list[int]], out: str | Path, cfg: BuildConfig | None = None,
          source: str = "", max_tokens: int | None = None, progress: bool = True, resume: bool = True,
          runner=None, on_chunk: Callable[[int], None] | None = None) -> dict:
    """Build a dataset into folder `out` (manifest.json + data.safetensors). With `resume`,
    continues from `out/partial/` after an interruption. `runner` runs the chunks (default
    in this process; `datasets.ray_build.RayRunner` shards them over Ray workers); their
    states are merged here in chunk order. on_chunk(i) is called after chunk i is merged
    and checkpointed. Returns the manifest."""
    from tdb_agent.datasets.store import MANIFEST, DATA

    cfg = cfg or BuildConfig()
    own_runner = runner is None  # a runner passed in is the caller's to close
    runner = runner or LocalRunner(engine)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    folded: DatasetBuilder | None = None
    partial = out / "partial"
    fp = {"model": model_fingerprint(engine), "saes": sae_fingerprints(engine)}
    if engine_tcs := transcoder_fingerprints(engine):  # absent key: resumes partial builds of older versions
        fp["transcoders"] = engine_tcs
    chunks_done = 0
    if resume and (partial / "state.safetensors").exists():
        meta = json.loads((partial / "meta.json").read_text())
        if meta["fingerprints"] != fp or meta["config"] != cfg.__dict__ or meta.get("format") != 2:
            raise TdbError(f"{partial} was started with another model, SAEs or settings; delete it to start over")
        folded = DatasetBuilder(engine, cfg)
        folded.load_state(load_torch(str(partial / "state.safetensors"), device=str(engine.device)))
        chunks_done = meta["chunks_done"]
        log.info("resuming after %d chunks (%d tokens)", chunks_done, folded.n_tokens)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=max_tokens, initial=folded.n_tokens if folded else 0, unit="tok", desc="build-dataset",
                   dynamic_ncols=True)
    t0 = time.time()
    pending: dict[int, Chunk] = {}  # dispatched, not merged yet

    def todo() -> Iterator[Chunk]:
        for c in plan_chunks(docs, cfg, max_tokens):
            if c.index >= chunks_done:
                pending[c.index] = c
                yield c

    def fold(index: int, state: dict) -> None:
        nonlocal folded
        chunk = pending.pop(index)
        part = DatasetBuilder(engine, cfg)
        part.load_state(state)
        if folded is None:
            folded = part
        else:
            folded.merge(part)
        folded.tokens += [np.asarray(d, dtype=np.int32) for b in chunk.batches for d in b]
        partial.mkdir(exist_ok=True)
        save_torch(folded.state(), str(partial / "state.tmp"))
        (partial / "state.tmp").replace(partial / "state.safetensors")
        (partial / "meta.json").write_text(json.dumps({"format": 2, "fingerprints": fp, "config": cfg.__dict__,
                                                       "chunks_done": index + 1}))
        if bar is not None:
            bar.update(chunk.n_tokens)
        if on_chunk is not None:
            on_chunk(index)

    try:
        stream = todo()
        if chunks_done == 0:  # the warm-up chunk first: it fixes the quantile edges the others use
            first = next(stream, None)
            if first is not None:
                for index, state in runner.run([first], cfg, None):
                    fold(index, state)
        edges = folded.edges.cpu() if folded is not None and folded.edges is not None else None
        ready: dict[int, dict] = {}
        next_index = max(chunks_done, 1)
        for index, state in runner.run(stream, cfg, edges):  # completion order; merged in chunk order
            ready[index] = state
            while next_index in ready:
                fold(next_index, ready.pop(next_index))
                next_index += 1
    finally:
        if own_runner:
            runner.close()
        if bar is not None:
            bar.close()
    if folded is None:
        folded = DatasetBuilder(engine, cfg)
    arrays = folded.finish()
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(out / DATA))
    manifest = {
        "format_version": FORMAT_VERSION, "model": engine.name, "model_fingerprint": fp["model"],
        "sae_fingerprints": fp["saes"], "transcoder_fingerprints": fp.get("transcoders", {}), "source": source, "n_tokens": folded.n_tokens,
        "n_documents": folded.docs_done, "stat_tokens": folded.count, "config": cfg.__dict__,
        "blocks": [b.model_dump() for b in folded.blocks], "n_components": folded.C,
        "build_seconds": round(time.time() - t0, 2), "workers": runner.n_workers, "environment": describe(),
        "notes": "position 0 (BOS) is excluded from examples and stats; heads: activation = norm of the head's "
                 "write at the query position; acts are int8 x scale[component]",
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if partial.exists():
        for f in partial.iterdir():
            f.unlink()
        partial.rmdir()
    return manifest
