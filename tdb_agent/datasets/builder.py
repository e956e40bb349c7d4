"""Streaming builder of activation datasets: the kept examples and statistics of a run of
consecutive batches.

One pass over a corpus (documents, each read alone from a BOS token where the tokenizer has
one). For every component (MLP neuron post-activation; head = norm of its write z_h·W_O[h]
at the query position; SAE latent) it keeps, per document, the position of its maximum, and
merges into running sets (`kept.Group`):

* top:      the k documents with the largest maximum (window around the argmax);
* random:   R documents drawn uniformly (shared by all components; a random position);
* quantile: per quintile bin of the per-document maximum (edges fixed on the first
            `warmup_docs` documents), a few documents drawn uniformly (window at the argmax);
* stats:    mean over tokens, max, fraction of tokens with activation > 0.

Position 0 (the BOS token, identical in every document; the first token where there is no
BOS) is left out of examples and stats. An example is a window of at most `window` tokens of
its document with the per-token activations; heads also record the key position they
attended to most at the centre. Merges select indices first and gather only the winners, so
the bookkeeping is O(batch x components) per batch plus O(kept x components x window).

The state of one chunk merges exactly into that of the chunks before it (`merge`), so a
build sharded over workers equals the single-process one, bit for bit (`pipeline.build`).
"""

from __future__ import annotations

import numpy as np
import torch

from tdb_agent.datasets.components import component_activations, component_blocks, n_components
from tdb_agent.datasets.config import BuildConfig
from tdb_agent.datasets.kept import Group, TreeSum, doc_uniforms
from tdb_agent.engine import Engine


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
        r = doc_uniforms(cfg.seed, self.docs_done, b, self.C).to(dev)
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
