"""Streaming builder of activation datasets.

One pass over a corpus (documents, each read alone from a BOS token). For every component
(MLP neuron post-activation; head = norm of its write z_h·W_O[h] at the query position; SAE
latent) it keeps, per document, the position of its maximum, and merges into running sets:

* top:      the k documents with the largest maximum (window around the argmax);
* random:   R documents drawn uniformly (shared by all components; a random position);
* quantile: per quintile bin of the per-document maximum (edges fixed on the first
            `warmup_docs` documents), a few documents drawn uniformly (window at the argmax);
* stats:    mean over tokens, max, fraction of tokens with activation > 0.

Position 0 (the BOS token, identical in every document) is left out of examples and stats.
An example is a window of at most `window` tokens of its document with the per-token
activations; heads also record the key position they attended to most at the centre.
Merges select indices first and gather only the winners, so the bookkeeping is
O(batch x components) per batch plus O(kept x components x window).

The result depends only on the corpus and the settings, not on how the batches were
grouped into chunks or which worker ran them (so a build sharded over Ray workers equals
the single-process one, bit for bit):

* the corpus is cut into chunks of batches (`plan_chunks`): chunk 0 holds the warm-up
  batches that fix the quantile edges, the others `checkpoint_every` batches; each chunk
  is built alone (`run_chunk`) and the chunk states are merged in chunk order (`merge`);
* every random draw is keyed by the document's global index (`_doc_uniforms`), not by a
  stream shared across batches;
* kept examples are ranked by (key descending, document ascending): ties have one answer;
* sums are pairwise over an aligned binary tree of batches (`TreeSum`), whatever the chunks.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from safetensors.torch import load_file as load_torch, save_file as save_torch

from tdb_agent.datasets.components import component_blocks, model_fingerprint, n_components, sae_fingerprints
from tdb_agent.engine import Engine
from tdb_agent.errors import TdbError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
GROUPS = ("top", "random", "quantile")


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


NO_DOC = 2 ** 62  # document index of an empty slot (after every real document)


class Group:
    """Running kept examples of one kind for every component: [n, C] keys and [n, C, W] acts."""

    def __init__(self, n: int, C: int, W: int, device):
        self.key = torch.full((n, C), -float("inf"), device=device)
        self.doc = torch.full((n, C), NO_DOC, dtype=torch.long, device=device)  # global document index
        self.value = torch.zeros(n, C, device=device)
        self.start = torch.full((n, C), -1, dtype=torch.long, device=device)  # global token index
        self.length = torch.zeros(n, C, dtype=torch.long, device=device)
        self.center = torch.zeros(n, C, dtype=torch.long, device=device)
        self.attn_key = torch.full((n, C), -1, dtype=torch.long, device=device)  # heads: global index
        self.acts = torch.zeros(n, C, W, device=device)

    FIELDS = ("key", "doc", "value", "start", "length", "center", "attn_key", "acts")

    def merge(self, key: torch.Tensor, value: torch.Tensor, doc: torch.Tensor,
              select: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]) -> None:
        """key, value, doc [b, C] of candidates from documents after every kept one;
        select(rows [m], cols [m]) -> the example fields (start, length, center, attn_key
        [m]; acts [m, W]) of those (candidate row, column) pairs. The kept set becomes the
        top n by (key descending, document ascending). Only columns where some candidate
        beats the lowest kept key are looked at (a tie goes to the earlier, kept document),
        and only the winners' windows are read; each takes the slot of a dropped example
        (slots are unordered; `finish` sorts)."""
        n = self.key.shape[0]
        cols = (key.amax(0) > self.key.amin(0)).nonzero().squeeze(1)
        if cols.numel() == 0:
            return
        # both sides in document order, kept first: a stable sort then breaks ties by document
        ok = self.doc[:, cols].argsort(dim=0, stable=True)
        oc = doc[:, cols].argsort(dim=0, stable=True)
        both = torch.cat([self.key[:, cols].gather(0, ok), key[:, cols].gather(0, oc)])
        idx = both.sort(dim=0, descending=True, stable=True).indices[:n]  # [n, c]
        keep = torch.zeros(n + key.shape[0], len(cols), dtype=torch.bool, device=key.device)
        keep.scatter_(0, idx, True)
        slot_keep = torch.zeros_like(keep[:n]).scatter_(0, ok, keep[:n])
        row_win = torch.zeros_like(keep[n:]).scatter_(0, oc, keep[n:])
        # pair, column by column, the k-th freed slot with the k-th winning candidate
        free_c, free_slot = (~slot_keep).T.nonzero(as_tuple=True)
        win_c, win_row = row_win.T.nonzero(as_tuple=True)
        if win_c.numel() == 0:
            return
        col = cols[win_c]
        new = select(win_row, col)
        self.key[free_slot, col] = key[win_row, col]
        self.value[free_slot, col] = value[win_row, col]
        self.doc[free_slot, col] = doc[win_row, col]
        for f in ("start", "length", "center", "attn_key", "acts"):
            getattr(self, f)[free_slot, col] = new[f]

    def merge_group(self, other: "Group") -> None:
        """Merge the kept examples of a later chunk (its documents come after ours)."""
        def select(rows, cols):
            return {f: getattr(other, f)[rows, cols] for f in ("start", "length", "center", "attn_key", "acts")}
        self.merge(other.key, other.value, other.doc, select)

    def view(self, sl: slice) -> "Group":
        """Rows `sl` of this group, sharing memory (quantile bins are merged in place)."""
        sub = Group(0, 0, 0, self.key.device)
        for f in Group.FIELDS:
            setattr(sub, f, getattr(self, f)[sl])
        return sub

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{f}": getattr(self, f).contiguous() for f in self.FIELDS}

    def load(self, prefix: str, d: dict[str, torch.Tensor]) -> None:
        for f in self.FIELDS:
            setattr(self, f, d[f"{prefix}.{f}"].to(self.key.device))


def component_activations(engine: Engine, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token activations of every component [b, s, C] (float32) and, for every head,
    the most attended key position [b, s, n_layers * n_heads]."""
    spec = engine.spec
    sites = []
    for layer in range(spec.n_layers):
        sites += [f"blocks.{layer}.mlp.hook_post", f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.attn.hook_pattern"]
    sae_sites = {}
    for (layer, site), sae in engine.saes.items():
        name = f"blocks.{layer}." + {"resid": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}[site]
        sae_sites[(layer, site)] = name
        sites.append(name)
    _, acts = engine.run_with_cache(ids, list(dict.fromkeys(sites)), logit_positions=[-1], logit_ids=[0])
    parts, keys = [], []
    for layer in range(spec.n_layers):
        parts.append(acts[f"blocks.{layer}.mlp.hook_post"].float())
        z = acts[f"blocks.{layer}.attn.hook_z"].float()  # [b, s, h, dh]
        W_O = engine.adapter.W_O(layer).float()  # [h, dh, d]
        gram = W_O @ W_O.transpose(1, 2)  # ||z_h W_O[h]||^2 = z_h G_h z_h: d_head^2 instead of d_head x d_model
        parts.append(torch.einsum("bshk,hkl,bshl->bsh", z, gram, z).clamp(min=0).sqrt())
        keys.append(acts[f"blocks.{layer}.attn.hook_pattern"].argmax(-1).transpose(1, 2))  # [b, q, h]
    for (layer, site), sae in engine.saes.items():
        parts.append(sae.encode(acts[sae_sites[(layer, site)]]).float())
    return torch.cat(parts, -1), torch.cat(keys, -1)


def documents_from_text(path: str | Path, tokenizer, n_ctx: int) -> Iterator[list[int]]:
    """Token ids of each non-empty line (BOS first), split into pieces of at most n_ctx."""
    bos = tokenizer.bos_token_id
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            ids = tokenizer(line, add_special_tokens=False)["input_ids"]
            step = n_ctx - 1
            for i in range(0, len(ids), step):
                yield [bos] + ids[i:i + step]


def documents_from_corpus(n_docs: int, seed: int, tokenizer, n_ctx: int) -> Iterator[list[int]]:
    from tdb_agent.tasks import corpus_documents

    bos = tokenizer.bos_token_id
    for i in range(0, n_docs, 1024):
        for text in corpus_documents(min(1024, n_docs - i), seed=seed + i):
            yield ([bos] + tokenizer(text, add_special_tokens=False)["input_ids"])[:n_ctx]


class TreeSum:
    """Sum of per-batch vectors [C] over an aligned binary tree of batch indices: block
    (level, i) holds batches [i * 2**level, (i + 1) * 2**level) and is always left + right
    of its two halves, so the bits do not depend on which chunks the batches were added
    in, nor on the order chunks are merged (pairwise summation, also more accurate)."""

    def __init__(self):
        self.blocks: dict[tuple[int, int], torch.Tensor] = {}

    def add(self, level: int, index: int, v: torch.Tensor) -> None:
        while (level, index ^ 1) in self.blocks:
            sib = self.blocks.pop((level, index ^ 1))
            v = sib + v if index & 1 else v + sib
            level, index = level + 1, index >> 1
        self.blocks[(level, index)] = v

    def merge(self, other: "TreeSum") -> None:
        for (level, index), v in sorted(other.blocks.items()):
            self.add(level, index, v.to(next(iter(self.blocks.values())).device) if self.blocks else v)

    def total(self, like: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(like)
        for (level, index), v in sorted(self.blocks.items(), key=lambda kv: kv[0][1] << kv[0][0]):
            out = out + v
        return out

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        keys = sorted(self.blocks)
        if not keys:
            return {}
        return {f"{prefix}.keys": torch.tensor(keys, dtype=torch.long),
                f"{prefix}.values": torch.stack([self.blocks[k] for k in keys])}

    def load(self, prefix: str, d: dict[str, torch.Tensor], device) -> None:
        self.blocks = {}
        if f"{prefix}.keys" in d:
            for (level, index), v in zip(d[f"{prefix}.keys"].tolist(), d[f"{prefix}.values"].to(device)):
                self.blocks[(level, index)] = v


def _doc_uniforms(seed: int, first_doc: int, n: int, C: int) -> torch.Tensor:
    """[n, C + 2] uniforms per document, drawn from a generator seeded by (seed, global
    document index): column 0 ranks the random sample, 1 picks its position, 2.. rank the
    quantile samples. The same for a document whichever worker or batch reads it."""
    out = torch.empty(n, C + 2)
    g = torch.Generator(device="cpu")
    for i in range(n):
        g.manual_seed((seed * 0x9E3779B97F4A7C15 + first_doc + i) % 2 ** 63)
        out[i] = torch.rand(C + 2, generator=g)
    return out


class DatasetBuilder:
    """Kept examples and statistics of a run of consecutive batches (a chunk, or all of them).
    `docs_done`, `n_tokens`, `batches_done` are global: the index of the next document, its
    first token and the next batch."""

    def __init__(self, engine: Engine, cfg: BuildConfig | None = None):
        self.engine = engine
        self.cfg = cfg or BuildConfig()
        self.blocks = component_blocks(engine)
        self.C = n_components(self.blocks)
        spec = engine.spec
        self.head_cols = torch.tensor([b.offset + h for b in self.blocks if b.kind == "head" for h in range(b.n)],
                                      device=engine.device)
        self.head_of_col = torch.full((self.C,), -1, dtype=torch.long, device=engine.device)
        self.head_of_col[self.head_cols] = torch.arange(len(self.head_cols), device=engine.device)
        dev = engine.device
        c = self.cfg
        self.groups = {"top": Group(c.top_k, self.C, c.window, dev), "random": Group(c.n_random, self.C, c.window, dev),
                       "quantile": Group(c.n_quantile_bins * c.per_bin, self.C, c.window, dev)}
        self.sum = TreeSum()
        self.max = torch.full((self.C,), -float("inf"), device=dev)
        self.active = torch.zeros(self.C, dtype=torch.float64, device=dev)
        self.count = 0
        self.tokens: list[np.ndarray] = []
        self.n_tokens = 0
        self.docs_done = 0
        self.batches_done = 0
        self.warm: list[torch.Tensor] = []
        self.edges: torch.Tensor | None = None
        self.n_layers_heads = spec.n_layers * spec.n_heads

    # ------------------------------------------------------------------ one batch
    @torch.no_grad()
    def add_batch(self, docs: list[list[int]]) -> None:
        cfg, dev = self.cfg, self.engine.device
        b = len(docs)
        lens = torch.tensor([len(d) for d in docs], device=dev)
        s = int(lens.max())
        bos = self.engine.tokenizer.bos_token_id
        ids = torch.full((b, s), bos if bos is not None else 0, dtype=torch.long)
        for i, d in enumerate(docs):
            ids[i, : len(d)] = torch.tensor(d)
        ids = ids.to(dev)
        base = torch.tensor(np.cumsum([0] + [len(d) for d in docs[:-1]]), device=dev) + self.n_tokens  # doc starts
        doc = (torch.arange(b, device=dev) + self.docs_done)[:, None].expand(b, self.C)  # global document index
        A, K = component_activations(self.engine, ids)  # [b, s, C], [b, s, LH]
        pos = torch.arange(s, device=dev)
        valid = (pos[None] < lens[:, None]) & (pos[None] > 0)  # [b, s]
        # stats
        pad = pos[None] >= lens[:, None]
        if bool(pad.any()):
            A[pad] = -float("inf")  # padding is never read again (windows stop at the document's end)
        mx = A[:, 1:].amax(1)  # [b, C], position 0 (BOS) left out; argmax only where merged
        if bool(pad.any()):
            A[pad] = 0.0
        # stats over valid tokens: padding is 0 now; position 0 is subtracted
        Af = A.view(b * s, self.C)
        self.sum.add(0, self.batches_done, ((torch.ones(1, b * s, device=dev) @ Af)[0] - A[:, 0].sum(0)).double())
        if dev.type == "cpu":  # numpy counts booleans ~8x faster than torch on CPU
            positive = torch.from_numpy(np.count_nonzero(Af.numpy() > 0, axis=0))
        else:
            positive = (Af > 0).sum(0)
        self.active += (positive.to(dev) - (A[:, 0] > 0).sum(0)).double()
        self.count += int(valid.sum())
        self.max = torch.maximum(self.max, mx.max(0).values)
        W, lead = cfg.window, cfg.lead
        offs = torch.arange(W, device=dev)

        head_of = self.head_of_col

        def selector(centers: torch.Tensor | None):
            """select(rows, cols) for examples centred at centers[row] ([b]), or at each
            document's maximum (None)."""
            def select(rows: torch.Tensor, cols: torch.Tensor) -> dict[str, torch.Tensor]:
                if centers is None:  # the argmax over positions 1..len-1, for these pairs only
                    g = A[rows[:, None], pos[None, 1:], cols[:, None]]  # [m, s-1]
                    g = g.masked_fill(pos[None, 1:] >= lens[rows][:, None], -float("inf"))
                    c = g.argmax(-1) + 1
                else:
                    c = centers[rows]
                L = lens[rows]
                st = torch.minimum((c - lead).clamp(min=0), (L - W).clamp(min=0))
                ln = L.clamp(max=W)
                h = head_of[cols]
                key = K[rows, c, h.clamp(min=0)] + base[rows]  # heads: most attended key (global index)
                idx = (st[:, None] + offs).clamp(max=s - 1)  # [m, W]
                w = A[rows[:, None], idx, cols[:, None]]
                return {"start": st + base[rows], "length": ln, "center": c - st,
                        "attn_key": torch.where(h >= 0, key, torch.full_like(key, -1)),
                        "acts": torch.where(offs < ln[:, None], w, torch.zeros((), device=dev))}
            return select

        has = torch.isfinite(mx)
        self.groups["top"].merge(torch.where(has, mx, torch.full_like(mx, -float("inf"))), mx, doc, selector(None))
        # random: documents with uniform keys, a uniform position in 1..len-1 (same for all components)
        r = _doc_uniforms(cfg.seed, self.docs_done, b, self.C).to(dev)
        u, rfrac, uq = r[:, 0], r[:, 1], r[:, 2:]
        rpos = (rfrac * (lens - 1).clamp(min=1)).long() + 1
        rpos = torch.minimum(rpos, (lens - 1).clamp(min=0))
        rval = A[torch.arange(b, device=dev), rpos]  # [b, C]
        rkey = torch.where(lens[:, None] > 1, u[:, None].expand(-1, self.C), torch.full_like(rval, -float("inf")))
        self.groups["random"].merge(rkey, rval, doc, selector(rpos))
        # quantiles of the per-document maximum
        if self.edges is None:
            self.warm.append(mx.masked_fill(~has, float("nan")))
            if self.docs_done + b >= cfg.warmup_docs:
                self._fix_edges()
        else:
            self._merge_quantiles(mx, has, uq, doc, selector(None))
        self.tokens += [np.asarray(d, dtype=np.int32) for d in docs]
        self.n_tokens += int(lens.sum())
        self.docs_done += b
        self.batches_done += 1

    def _fix_edges(self) -> None:
        warm = torch.cat(self.warm)  # [n, C]
        warm = warm.masked_fill(~(warm > 0), float("nan"))
        nb = self.cfg.n_quantile_bins
        q = torch.linspace(0, 1, nb + 1, device=warm.device)[1:-1]
        edges = torch.nanquantile(warm.T.float(), q, dim=1).T  # [C, nb-1]
        self.edges = torch.nan_to_num(edges, nan=float("inf"))  # never active in warm-up: all in bin 0
        self.warm = []

    def _bins(self):
        cfg = self.cfg
        return [self.groups["quantile"].view(slice(j * cfg.per_bin, (j + 1) * cfg.per_bin))
                for j in range(cfg.n_quantile_bins)]

    def _merge_quantiles(self, mx, has, u, doc, select) -> None:
        cfg = self.cfg
        binid = torch.searchsorted(self.edges.contiguous(), mx.T.contiguous().clamp(min=-1e30)).T  # [b, C]
        g = self.groups["quantile"]
        # the lowest kept key of each document's bin: only (document, column) pairs above it
        # can enter, and bins without any are skipped
        lowest = g.key.view(cfg.n_quantile_bins, cfg.per_bin, self.C).amin(1)  # [bins, C]
        enters = has & (mx > 0) & (u > lowest.gather(0, binid.clamp(max=cfg.n_quantile_bins - 1)))
        for j, sub in enumerate(self._bins()):  # bin j keeps rows j*per_bin.. (views: merged in place)
            ok = enters & (binid == j)
            if not bool(ok.any()):
                continue
            sub.merge(torch.where(ok, u, torch.full_like(u, -float("inf"))), mx, doc, select)

    # ------------------------------------------------------------------ chunks
    def merge(self, other: "DatasetBuilder") -> None:
        """Fold in the state of the next chunk (its documents come after ours)."""
        for name in ("top", "random"):
            self.groups[name].merge_group(other.groups[name])
        for mine, theirs in zip(self._bins(), other._bins()):
            mine.merge_group(theirs)
        self.sum.merge(other.sum)
        self.max = torch.maximum(self.max, other.max)
        self.active += other.active
        self.count += other.count
        if self.edges is None:
            self.edges = other.edges
        self.n_tokens, self.docs_done, self.batches_done = other.n_tokens, other.docs_done, other.batches_done

    # ------------------------------------------------------------------ checkpoints
    def state(self, tokens: bool = True) -> dict[str, torch.Tensor]:
        d = {}
        for name, g in self.groups.items():
            d |= g.state(name)
        d |= self.sum.state("stats.sum")
        d |= {"stats.max": self.max, "stats.active": self.active,
              "counters": torch.tensor([self.count, self.n_tokens, self.docs_done, self.batches_done])}
        if tokens:
            d |= {"tokens": torch.from_numpy(np.concatenate(self.tokens) if self.tokens else np.zeros(0, np.int32)),
                  "doc_lengths": torch.tensor([len(t) for t in self.tokens], dtype=torch.int32)}
        if self.edges is not None:
            d["edges"] = self.edges.contiguous()
        if self.warm:
            d["warm"] = torch.cat(self.warm)
        return d

    def load_state(self, d: dict[str, torch.Tensor]) -> None:
        for name, g in self.groups.items():
            g.load(name, d)
        dev = self.engine.device
        self.sum.load("stats.sum", d, dev)
        self.max, self.active = d["stats.max"].to(dev), d["stats.active"].to(dev)
        self.count, self.n_tokens, self.docs_done, self.batches_done = (int(x) for x in d["counters"].tolist())
        if "tokens" in d:
            toks, lens = d["tokens"].numpy(), d["doc_lengths"].numpy()
            self.tokens = np.split(toks, np.cumsum(lens)[:-1]) if len(lens) else []
        self.edges = d["edges"].to(dev) if "edges" in d else None
        self.warm = [d["warm"].to(dev)] if "warm" in d else []

    # ------------------------------------------------------------------ output
    def finish(self) -> dict[str, np.ndarray]:
        """Arrays of the store: per group sorted by value (descending; ties: earlier
        document first); acts as int8 with a per-component scale."""
        if self.edges is None and self.warm:
            self._fix_edges()  # a corpus shorter than the warm-up: edges from what was seen
        arrays: dict[str, np.ndarray] = {}
        scale = torch.zeros(self.C, device=self.engine.device)
        for g in self.groups.values():
            ok = torch.isfinite(g.key)
            scale = torch.maximum(scale, (g.acts.abs() * ok[..., None]).amax((0, 2)))
        scale = (scale / 127).clamp(min=1e-12)
        for name, g in self.groups.items():
            ok = torch.isfinite(g.key)
            val = torch.where(ok, g.value, torch.full_like(g.value, -float("inf")))
            by_doc = g.doc.argsort(dim=0, stable=True)
            order = by_doc.gather(0, val.gather(0, by_doc).argsort(dim=0, descending=True, stable=True))
            take = lambda t: t.gather(0, order)  # noqa: E731
            okk = take(ok)
            arrays[f"{name}.start"] = torch.where(okk, take(g.start), -1).T.cpu().numpy().astype(np.int32)
            arrays[f"{name}.length"] = torch.where(okk, take(g.length), 0).T.cpu().numpy().astype(np.uint8)
            arrays[f"{name}.center"] = take(g.center).T.cpu().numpy().astype(np.uint8)
            arrays[f"{name}.value"] = torch.where(okk, take(g.value), 0).T.cpu().numpy().astype(np.float16)
            acts = g.acts.gather(0, order[..., None].expand_as(g.acts))
            q = (acts / scale[None, :, None]).round().clamp(-127, 127).to(torch.int8)
            arrays[f"{name}.acts"] = q.permute(1, 0, 2).contiguous().cpu().numpy()
            heads = self.head_cols
            arrays[f"{name}.attn_key"] = take(g.attn_key)[:, heads].T.cpu().numpy().astype(np.int32)
        count = max(self.count, 1)
        arrays["scale"] = scale.cpu().numpy().astype(np.float32)
        arrays["stats.mean"] = (self.sum.total(self.active) / count).float().cpu().numpy()
        arrays["stats.max"] = self.max.cpu().numpy().astype(np.float32)
        arrays["stats.frac_active"] = (self.active / count).float().cpu().numpy()
        toks = np.concatenate(self.tokens) if self.tokens else np.zeros(0, np.int32)
        arrays["tokens"] = toks.astype(np.int16 if len(self.engine.tokenizer) < 32768 else np.int32)
        arrays["doc_lengths"] = np.array([len(t) for t in self.tokens], dtype=np.int32)
        if self.edges is not None:
            arrays["quantile.edges"] = self.edges.cpu().numpy().astype(np.float32)
        return arrays


def _batched(docs: Iterable[list[int]], batch_size: int, sort_buffer: int = 16) -> Iterator[list[list[int]]]:
    """Batches of documents; within a buffer of sort_buffer batches, documents of similar
    length go together (less padding); the order is deterministic."""
    buf: list[list[int]] = []
    for d in docs:
        if len(d) < 2:
            continue
        buf.append(d)
        if len(buf) == batch_size * sort_buffer:
            buf.sort(key=len)
            for i in range(0, len(buf), batch_size):
                yield buf[i:i + batch_size]
            buf = []
    buf.sort(key=len)
    for i in range(0, len(buf), batch_size):
        yield buf[i:i + batch_size]


@dataclass
class Chunk:
    """Consecutive batches built alone: index in the build, the global index of its first
    document, token and batch."""
    index: int
    batches: list[list[list[int]]]
    doc0: int
    tok0: int
    batch0: int

    @property
    def n_tokens(self) -> int:
        return sum(len(d) for b in self.batches for d in b)


def plan_chunks(docs: Iterable[list[int]], cfg: BuildConfig, max_tokens: int | None = None) -> Iterator[Chunk]:
    """The corpus as chunks: chunk 0 is the warm-up (batches until `warmup_docs` documents:
    they fix the quantile edges every later chunk uses), then `checkpoint_every` batches each.
    Lazy: reads the documents as the chunks are consumed."""
    n_doc = n_tok = n_batch = 0
    cur: list[list[list[int]]] = []
    start = (0, 0, 0)
    index = 0
    for batch in _batched(docs, cfg.batch_size, cfg.sort_buffer):
        if max_tokens is not None and n_tok >= max_tokens:
            break
        if not cur:
            start = (n_doc, n_tok, n_batch)
        cur.append(batch)
        n_doc, n_tok, n_batch = n_doc + len(batch), n_tok + sum(map(len, batch)), n_batch + 1
        if (n_doc >= cfg.warmup_docs) if index == 0 else len(cur) == cfg.checkpoint_every:
            yield Chunk(index, cur, *start)
            index, cur = index + 1, []
    if cur:
        yield Chunk(index, cur, *start)


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
        "sae_fingerprints": fp["saes"], "source": source, "n_tokens": folded.n_tokens,
        "n_documents": folded.docs_done, "stat_tokens": folded.count, "config": cfg.__dict__,
        "blocks": [b.model_dump() for b in folded.blocks], "n_components": folded.C,
        "build_seconds": round(time.time() - t0, 2), "workers": runner.n_workers,
        "notes": "position 0 (BOS) is excluded from examples and stats; heads: activation = norm of the head's "
                 "write at the query position; acts are int8 x scale[component]",
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if partial.exists():
        for f in partial.iterdir():
            f.unlink()
        partial.rmdir()
    return manifest
