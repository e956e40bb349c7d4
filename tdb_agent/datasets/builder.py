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


class Group:
    """Running kept examples of one kind for every component: [n, C] keys and [n, C, W] acts."""

    def __init__(self, n: int, C: int, W: int, device):
        self.key = torch.full((n, C), -float("inf"), device=device)
        self.value = torch.zeros(n, C, device=device)
        self.start = torch.full((n, C), -1, dtype=torch.long, device=device)  # global token index
        self.length = torch.zeros(n, C, dtype=torch.long, device=device)
        self.center = torch.zeros(n, C, dtype=torch.long, device=device)
        self.attn_key = torch.full((n, C), -1, dtype=torch.long, device=device)  # heads: global index
        self.acts = torch.zeros(n, C, W, device=device)

    FIELDS = ("key", "value", "start", "length", "center", "attn_key", "acts")

    def merge(self, key: torch.Tensor, value: torch.Tensor,
              select: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]) -> None:
        """key, value [b, C] of the batch's candidates; select(rows [m], cols [m]) -> the example
        fields (start, length, center, attn_key [m]; acts [m, W]) of those (batch row, column)
        pairs. Only columns where some candidate beats the lowest kept key are looked at, and
        only the winning candidates' windows are read; each takes the slot of a dropped
        example (slots are unordered; `finish` sorts)."""
        n = self.key.shape[0]
        cols = (key.amax(0) > self.key.amin(0)).nonzero().squeeze(1)
        if cols.numel() == 0:
            return
        idx = torch.cat([self.key[:, cols], key[:, cols]]).topk(n, dim=0).indices  # [n, c]
        keep = torch.zeros(n + key.shape[0], len(cols), dtype=torch.bool, device=key.device)
        keep.scatter_(0, idx, True)
        # pair, column by column, the k-th freed slot with the k-th winning candidate
        free_c, free_slot = (~keep[:n]).T.nonzero(as_tuple=True)
        win_c, win_row = keep[n:].T.nonzero(as_tuple=True)
        if win_c.numel() == 0:
            return
        col = cols[win_c]
        new = select(win_row, col)
        self.key[free_slot, col] = key[win_row, col]
        self.value[free_slot, col] = value[win_row, col]
        for f in ("start", "length", "center", "attn_key", "acts"):
            getattr(self, f)[free_slot, col] = new[f]

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{f}": getattr(self, f).contiguous() for f in self.FIELDS}

    def load(self, prefix: str, d: dict[str, torch.Tensor]) -> None:
        for f in self.FIELDS:
            setattr(self, f, d[f"{prefix}.{f}"].to(self.key.device))


def _activations(engine: Engine, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


class DatasetBuilder:
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
        self.sum = torch.zeros(self.C, dtype=torch.float64, device=dev)
        self.max = torch.full((self.C,), -float("inf"), device=dev)
        self.active = torch.zeros(self.C, dtype=torch.float64, device=dev)
        self.count = 0
        self.tokens: list[np.ndarray] = []
        self.n_tokens = 0
        self.docs_done = 0
        self.warm: list[torch.Tensor] = []
        self.edges: torch.Tensor | None = None
        self.rng = torch.Generator(device="cpu").manual_seed(self.cfg.seed)
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
        A, K = _activations(self.engine, ids)  # [b, s, C], [b, s, LH]
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
        self.sum += ((torch.ones(1, b * s, device=dev) @ Af)[0] - A[:, 0].sum(0)).double()  # gemv: fast
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
        self.groups["top"].merge(torch.where(has, mx, torch.full_like(mx, -float("inf"))), mx, selector(None))
        # random: documents with uniform keys, a uniform position in 1..len-1 (same for all components)
        u = torch.rand(b, generator=self.rng).to(dev)
        rpos = (torch.rand(b, generator=self.rng).to(dev) * (lens - 1).clamp(min=1)).long() + 1
        rpos = torch.minimum(rpos, (lens - 1).clamp(min=0))
        rval = A[torch.arange(b, device=dev), rpos]  # [b, C]
        rkey = torch.where(lens[:, None] > 1, u[:, None].expand(-1, self.C), torch.full_like(rval, -float("inf")))
        self.groups["random"].merge(rkey, rval, selector(rpos))
        # quantiles of the per-document maximum
        if self.edges is None:
            self.warm.append(mx.masked_fill(~has, float("nan")))
            if self.docs_done + b >= cfg.warmup_docs:
                self._fix_edges()
        else:
            self._merge_quantiles(mx, has, selector(None))
        self.tokens += [np.asarray(d, dtype=np.int32) for d in docs]
        self.n_tokens += int(lens.sum())
        self.docs_done += b

    def _fix_edges(self) -> None:
        warm = torch.cat(self.warm)  # [n, C]
        warm = warm.masked_fill(~(warm > 0), float("nan"))
        nb = self.cfg.n_quantile_bins
        q = torch.linspace(0, 1, nb + 1, device=warm.device)[1:-1]
        edges = torch.nanquantile(warm.T.float(), q, dim=1).T  # [C, nb-1]
        self.edges = torch.nan_to_num(edges, nan=float("inf"))  # never active in warm-up: all in bin 0
        self.warm = []

    def _merge_quantiles(self, mx, has, select) -> None:
        cfg = self.cfg
        b = mx.shape[0]
        binid = torch.searchsorted(self.edges.contiguous(), mx.T.contiguous().clamp(min=-1e30)).T  # [b, C]
        u = torch.rand(b, self.C, generator=self.rng).to(mx.device)
        g = self.groups["quantile"]
        # the lowest kept key of each document's bin: only (document, column) pairs above it
        # can enter, and bins without any are skipped
        lowest = g.key.view(cfg.n_quantile_bins, cfg.per_bin, self.C).amin(1)  # [bins, C]
        enters = has & (mx > 0) & (u > lowest.gather(0, binid.clamp(max=cfg.n_quantile_bins - 1)))
        for j in range(cfg.n_quantile_bins):  # bin j keeps rows j*per_bin.. (views: merged in place)
            ok = enters & (binid == j)
            if not bool(ok.any()):
                continue
            sl = slice(j * cfg.per_bin, (j + 1) * cfg.per_bin)
            sub = Group(0, 0, 0, mx.device)
            for f in Group.FIELDS:
                setattr(sub, f, getattr(g, f)[sl])
            sub.merge(torch.where(ok, u, torch.full_like(u, -float("inf"))), mx, select)

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, torch.Tensor]:
        d = {}
        for name, g in self.groups.items():
            d |= g.state(name)
        d |= {"stats.sum": self.sum, "stats.max": self.max, "stats.active": self.active,
              "tokens": torch.from_numpy(np.concatenate(self.tokens) if self.tokens else np.zeros(0, np.int32)),
              "doc_lengths": torch.tensor([len(t) for t in self.tokens], dtype=torch.int32),
              "rng": self.rng.get_state()}
        if self.edges is not None:
            d["edges"] = self.edges.contiguous()
        if self.warm:
            d["warm"] = torch.cat(self.warm)
        return d

    def load_state(self, d: dict[str, torch.Tensor], meta: dict) -> None:
        for name, g in self.groups.items():
            g.load(name, d)
        dev = self.engine.device
        self.sum, self.max, self.active = d["stats.sum"].to(dev), d["stats.max"].to(dev), d["stats.active"].to(dev)
        toks, lens = d["tokens"].numpy(), d["doc_lengths"].numpy()
        self.tokens = np.split(toks, np.cumsum(lens)[:-1]) if len(lens) else []
        self.n_tokens = int(lens.sum())
        self.docs_done = len(lens)
        self.count = int(meta["count"])
        self.rng.set_state(d["rng"])
        self.edges = d["edges"].to(dev) if "edges" in d else None
        self.warm = [d["warm"].to(dev)] if "warm" in d else []

    # ------------------------------------------------------------------ output
    def finish(self) -> dict[str, np.ndarray]:
        """Arrays of the store: per group sorted by value (descending); acts as int8 with a
        per-component scale."""
        arrays: dict[str, np.ndarray] = {}
        scale = torch.zeros(self.C, device=self.engine.device)
        for g in self.groups.values():
            ok = torch.isfinite(g.key)
            scale = torch.maximum(scale, (g.acts.abs() * ok[..., None]).amax((0, 2)))
        scale = (scale / 127).clamp(min=1e-12)
        for name, g in self.groups.items():
            ok = torch.isfinite(g.key)
            val = torch.where(ok, g.value, torch.full_like(g.value, -float("inf")))
            order = val.argsort(dim=0, descending=True, stable=True)
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
        arrays["stats.mean"] = (self.sum / count).float().cpu().numpy()
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


def build(engine: Engine, docs: Iterable[list[int]], out: str | Path, cfg: BuildConfig | None = None,
          source: str = "", max_tokens: int | None = None, progress: bool = True, resume: bool = True) -> dict:
    """Build a dataset into folder `out` (manifest.json + data.safetensors). With `resume`,
    continues from `out/partial/` after an interruption. Returns the manifest."""
    from tdb_agent.datasets.store import MANIFEST, DATA

    cfg = cfg or BuildConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    builder = DatasetBuilder(engine, cfg)
    partial = out / "partial"
    fp = {"model": model_fingerprint(engine), "saes": sae_fingerprints(engine)}
    skip_docs = 0
    if resume and (partial / "state.safetensors").exists():
        meta = json.loads((partial / "meta.json").read_text())
        if meta["fingerprints"] != fp or meta["config"] != cfg.__dict__:
            raise TdbError(f"{partial} was started with another model, SAEs or settings; delete it to start over")
        builder.load_state(load_torch(str(partial / "state.safetensors"), device=str(engine.device)), meta)
        skip_docs = meta["batches_done"]
        log.info("resuming after %d batches (%d tokens)", skip_docs, builder.n_tokens)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=max_tokens, initial=builder.n_tokens, unit="tok", desc="build-dataset", dynamic_ncols=True)
    t0 = time.time()
    batches_done = 0
    for batch in _batched(docs, cfg.batch_size, cfg.sort_buffer):
        if max_tokens is not None and builder.n_tokens >= max_tokens:
            break
        batches_done += 1
        if batches_done <= skip_docs:
            continue
        builder.add_batch(batch)
        if bar is not None:
            bar.update(sum(len(d) for d in batch))
        if batches_done % cfg.checkpoint_every == 0:
            partial.mkdir(exist_ok=True)
            save_torch(builder.state(), str(partial / "state.tmp"))
            (partial / "state.tmp").replace(partial / "state.safetensors")
            (partial / "meta.json").write_text(json.dumps({"fingerprints": fp, "config": cfg.__dict__,
                                                           "batches_done": batches_done, "count": builder.count}))
    if bar is not None:
        bar.close()
    if builder.edges is None and builder.warm:
        builder._fix_edges()  # a corpus shorter than the warm-up: edges from what was seen
    arrays = builder.finish()
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(out / DATA))
    manifest = {
        "format_version": FORMAT_VERSION, "model": engine.name, "model_fingerprint": fp["model"],
        "sae_fingerprints": fp["saes"], "source": source, "n_tokens": builder.n_tokens,
        "n_documents": builder.docs_done, "stat_tokens": builder.count, "config": cfg.__dict__,
        "blocks": [b.model_dump() for b in builder.blocks], "n_components": builder.C,
        "build_seconds": round(time.time() - t0, 2),
        "notes": "position 0 (BOS) is excluded from examples and stats; heads: activation = norm of the head's "
                 "write at the query position; acts are int8 x scale[component]",
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if partial.exists():
        for f in partial.iterdir():
            f.unlink()
        partial.rmdir()
    return manifest

