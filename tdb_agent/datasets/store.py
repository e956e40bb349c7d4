"""On-disk activation datasets: `manifest.json` + `data.safetensors` (compact arrays).

Arrays (C = components, n = examples kept per group, W = window):

    tokens                 int16/int32 [N]   every document's tokens, concatenated
    doc_lengths            int32 [D]
    {group}.start          int32 [C, n]      global token index of the window start (-1: none)
    {group}.length         uint8 [C, n]      window length
    {group}.center         uint8 [C, n]      offset of the example's position in the window
    {group}.value          fp16  [C, n]      activation at that position (sorted, descending)
    {group}.acts           int8  [C, n, W]   per-token activations / scale[c]
    {group}.attn_key       int32 [H, n]      heads: most attended key (global token index)
    scale                  fp32  [C]
    stats.mean / stats.max / stats.frac_active   fp32 [C]
    quantile.edges         fp32  [C, bins - 1]

The whole file is read once at open (a few MB); a query slices rows (microseconds). Either
file may be stored gzipped (`data.safetensors.gz`, `explanations.json.gz`: `compress`), as
the bundled dataset is: int8 windows of sparse features are mostly zeros (its data shrinks
from 11.7 to 4.2 MB, its explanations from 1.4 to 0.25 MB), and decompressing costs ~0.2 s at open.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field
from safetensors.numpy import load as load_bytes

from tdb_agent.components import parse_component
from tdb_agent.datasets.components import Block, column, model_fingerprint, sae_fingerprints, transcoder_fingerprints
from tdb_agent.errors import TdbError

#: the bundled model's shipped activation dataset (`tools/build_bundled_assets.sh` builds it)
BUNDLED_DATASET = Path(__file__).resolve().parent.parent / "assets" / "datasets" / "tdb-tiny"

MANIFEST = "manifest.json"
DATA = "data.safetensors"
EXPLANATIONS = "explanations.json"  # precomputed heuristic explanations (tools/precompute_explanations.py)
Group = Literal["top", "random", "quantile"]


def member(folder: str | Path, name: str) -> Path | None:
    """The file `name` of a dataset folder, or its gzipped copy `name.gz`; None if neither."""
    for p in (Path(folder) / name, Path(folder) / f"{name}.gz"):
        if p.is_file():
            return p
    return None


def read_member(folder: str | Path, name: str) -> bytes | None:
    p = member(folder, name)
    if p is None:
        return None
    return gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()


def compress(folder: str | Path, names: tuple[str, ...] = (DATA, EXPLANATIONS)) -> dict[str, tuple[int, int]]:
    """Gzip the named files of a dataset folder in place (`name` -> `name.gz`, reproducibly:
    no timestamp); the store reads either. Returns {name: (bytes before, bytes after)}."""
    out = {}
    for name in names:
        p = Path(folder) / name
        if not p.is_file():
            continue
        raw = p.read_bytes()
        packed = gzip.compress(raw, compresslevel=9, mtime=0)
        tmp = p.with_name(f"{name}.gz.tmp")
        tmp.write_bytes(packed)
        tmp.replace(p.with_name(f"{name}.gz"))
        p.unlink()
        out[name] = (len(raw), len(packed))
    return out


class DatasetMismatch(TdbError):
    pass


class Example(BaseModel):
    tokens: list[str] = Field(description="the window's tokens")
    token_ids: list[int]
    activations: list[float] = Field(description="one per token")
    position: int = Field(description="index in `tokens` of the example's token (the maximum, or the random pick)")
    activation: float = Field(description="activation at `position`")
    document: int = Field(description="document index in the dataset")
    attended_token: str | None = Field(None, description="heads: the key token attended most at `position`")
    attended_offset: int | None = Field(None, description="heads: that key's offset from `position` (<= 0)")


class ComponentStats(BaseModel):
    mean: float
    max: float
    frac_active: float = Field(description="fraction of tokens with activation > 0")


class ActivationDataset:
    def __init__(self, folder: str | Path, tokenizer=None):
        folder = Path(folder)
        if not (folder / MANIFEST).exists() or member(folder, DATA) is None:
            raise TdbError(f"{folder} is not an activation dataset ({MANIFEST} + {DATA} or {DATA}.gz); build one "
                           "with `tdb-agent build-dataset`")
        self.folder = folder
        self.manifest = json.loads((folder / MANIFEST).read_text())
        self.blocks = [Block(**b) for b in self.manifest["blocks"]]
        self.a = load_bytes(read_member(folder, DATA))
        lens = self.a["doc_lengths"].astype(np.int64)
        self.doc_starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        self.head_row = {b.offset + h: i for i, (b, h) in enumerate(
            (b, h) for b in self.blocks if b.kind == "head" for h in range(b.n))}
        self.tokenizer = tokenizer
        self._vocab: list[str] | None = None

    @classmethod
    def open(cls, folder: str | Path, engine=None) -> "ActivationDataset":
        """Open a dataset; with `engine`, refuse one built from another model or other SAEs."""
        ds = cls(folder, tokenizer=engine.tokenizer if engine is not None else None)
        if engine is not None:
            ds.check(engine)
        return ds

    def check(self, engine) -> None:
        m = self.manifest
        fp = model_fingerprint(engine)
        if fp != m["model_fingerprint"]:
            raise DatasetMismatch(f"the dataset {self.folder} was built from model {m['model']!r} (fingerprint "
                                  f"{m['model_fingerprint']}), not the loaded {engine.name!r} ({fp}); rebuild it "
                                  "with `tdb-agent build-dataset`")
        have = sae_fingerprints(engine)
        for key, want in m["sae_fingerprints"].items():
            if have.get(key) != want:
                got = "not loaded" if key not in have else f"fingerprint {have[key]}"
                raise DatasetMismatch(f"the dataset {self.folder} was built with the SAE at {key} (fingerprint "
                                      f"{want}); the loaded one is {got}; load that SAE or rebuild the dataset")
        # transcoders are optional to the rest: without them loaded, their rows are simply not asked for
        have = transcoder_fingerprints(engine)
        for key, want in (m.get("transcoder_fingerprints") or {}).items():
            if key in have and have[key] != want:
                raise DatasetMismatch(f"the dataset {self.folder} was built with the transcoder at {key} (fingerprint "
                                      f"{want}); the loaded one has fingerprint {have[key]}; load those transcoders, "
                                      "or rebuild the dataset")

    # ------------------------------------------------------------------ queries
    @property
    def vocab(self) -> list[str]:
        if self._vocab is None:
            if self.tokenizer is None:
                raise TdbError("the dataset needs a tokenizer to show tokens (open it with the engine)")
            self._vocab = [self.tokenizer.decode([i]) for i in range(len(self.tokenizer))]
        return self._vocab

    def column(self, component: str) -> int:
        return column(self.blocks, parse_component(component))

    def stats(self, component: str) -> ComponentStats:
        c = self.column(component)
        return ComponentStats(mean=float(self.a["stats.mean"][c]), max=float(self.a["stats.max"][c]),
                              frac_active=float(self.a["stats.frac_active"][c]))

    def examples(self, component: str, group: Group = "top", k: int | None = None) -> list[Example]:
        if group not in ("top", "random", "quantile"):
            raise TdbError(f"unknown example group {group!r}; groups: top, random, quantile")
        c = self.column(component)
        a = self.a
        starts = a[f"{group}.start"][c]
        n = int((starts >= 0).sum())
        n = n if k is None else min(k, n)
        scale = float(a["scale"][c])
        toks = a["tokens"]
        vocab = self.vocab
        hrow = self.head_row.get(c)
        out = []
        for j in range(n):
            st, ln, ce = int(starts[j]), int(a[f"{group}.length"][c, j]), int(a[f"{group}.center"][c, j])
            ids = toks[st: st + ln].tolist()
            acts = (a[f"{group}.acts"][c, j, :ln].astype(np.float32) * scale).tolist()
            doc = int(np.searchsorted(self.doc_starts, st, side="right") - 1)
            ex = Example(tokens=[vocab[i] for i in ids], token_ids=ids, activations=acts, position=ce,
                         activation=float(a[f"{group}.value"][c, j]), document=doc)
            if hrow is not None:
                key = int(a[f"{group}.attn_key"][hrow, j])
                if key >= 0:
                    ex.attended_token = vocab[int(toks[key])]
                    ex.attended_offset = key - (st + ce)
            out.append(ex)
        return out

    def info(self) -> str:
        m = self.manifest
        return f"{self.folder.name}: {m['n_tokens']:,} tokens, {m['n_components']:,} components ({m['source']})"
