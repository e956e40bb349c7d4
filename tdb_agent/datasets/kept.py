"""The running sets a dataset build keeps, built so that merging them does not depend on how
the batches were grouped into chunks:

* `Group`: per component, the n kept examples of one kind (top, random or a quantile bin),
  ranked by (key descending, document ascending), so ties have one answer;
* `TreeSum`: sums over an aligned binary tree of batches, the same bits whatever the chunks;
* `doc_uniforms`: random draws keyed by the document's global index, not by a stream shared
  across batches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


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


def doc_uniforms(seed: int, first_doc: int, n: int, C: int) -> torch.Tensor:
    """[n, C + 2] uniforms per document, drawn from a generator seeded by (seed, global
    document index): column 0 ranks the random sample, 1 picks its position, 2.. rank the
    quantile samples. The same for a document whichever worker or batch reads it."""
    out = torch.empty(n, C + 2)
    g = torch.Generator(device="cpu")
    for i in range(n):
        g.manual_seed((seed * 0x9E3779B97F4A7C15 + first_doc + i) % 2 ** 63)
        out[i] = torch.rand(C + 2, generator=g)
    return out
