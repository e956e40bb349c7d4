"""The computed rows of an attribution graph, stored sparsely (compressed rows).

Only the rows of expanded nodes (features whose inputs were computed, then the targets) are
stored, and in each row only its non-zero entries over every source column. A row of a
feature at layer l and position p is exactly zero on the sources at later layers or later
positions (the frozen model is causal), so a long prompt's rows are far from dense; nothing
here ever builds the node x node matrix. Plain tensors (CSR layout by hand), so it runs on
any device.
"""

from __future__ import annotations

import torch

from tdb_agent.errors import TdbError

DENSE_LIMIT = 64 << 20  # elements: the dense view (tests, small graphs) is refused above this


class SparseRows:
    """Rows x n_cols, compressed: row r's entries are col[crow[r]:crow[r+1]], val[...]."""

    def __init__(self, n_cols: int, device, crow=None, col=None, val=None):
        self.n_cols = n_cols
        self.device = torch.device(device)
        self.crow = crow if crow is not None else torch.zeros(1, dtype=torch.long, device=device)
        self.col = col if col is not None else torch.zeros(0, dtype=torch.int32, device=device)
        self.val = val if val is not None else torch.zeros(0, dtype=torch.float32, device=device)
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    # ------------------------------------------------------------------ building
    def append(self, block: torch.Tensor) -> None:
        """Add dense rows [m, n_cols]; only their non-zero entries are kept."""
        r, c = block.nonzero(as_tuple=True)
        counts = torch.bincount(r, minlength=block.shape[0])
        self._pending.append((counts, c.to(torch.int32), block[r, c].float()))

    def _flush(self) -> None:
        if not self._pending:
            return
        counts = torch.cat([p[0] for p in self._pending])
        self.crow = torch.cat([self.crow, self.crow[-1] + counts.cumsum(0)])
        self.col = torch.cat([self.col] + [p[1] for p in self._pending])
        self.val = torch.cat([self.val] + [p[2] for p in self._pending])
        self._pending = []

    def take_rows(self, order: torch.Tensor) -> SparseRows:
        """A new SparseRows with rows in `order`."""
        self._flush()
        order = order.to(self.crow.device).long()
        start, counts = self.crow[order], self.crow[order + 1] - self.crow[order]
        idx = _ranges(start, counts)
        crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return SparseRows(self.n_cols, self.device, crow, self.col[idx], self.val[idx])

    # ------------------------------------------------------------------ reading
    @property
    def n_rows(self) -> int:
        self._flush()
        return len(self.crow) - 1

    @property
    def nnz(self) -> int:
        self._flush()
        return len(self.val)

    @property
    def nbytes(self) -> int:
        self._flush()
        return self.crow.numel() * 8 + self.col.numel() * 4 + self.val.numel() * 4

    def row_index(self) -> torch.Tensor:
        """The row of every stored entry."""
        self._flush()
        return torch.repeat_interleave(torch.arange(self.n_rows, device=self.crow.device), self.crow.diff())

    def row(self, r: int) -> torch.Tensor:
        self._flush()
        a, b = int(self.crow[r]), int(self.crow[r + 1])
        out = torch.zeros(self.n_cols, device=self.val.device)
        out[self.col[a:b].long()] = self.val[a:b]
        return out

    def column(self, c: int) -> torch.Tensor:
        self._flush()
        hit = (self.col == c).nonzero(as_tuple=True)[0]
        out = torch.zeros(self.n_rows, device=self.val.device)
        out[self.row_index()[hit]] = self.val[hit]
        return out

    def select(self, cols: torch.Tensor) -> torch.Tensor:
        """Dense [n_rows, len(cols)]: the stored rows restricted to these columns."""
        self._flush()
        where = torch.full((self.n_cols,), -1, dtype=torch.long, device=self.val.device)
        where[cols.to(where.device).long()] = torch.arange(len(cols), device=where.device)
        j = where[self.col.long()]
        keep = j >= 0
        out = torch.zeros(self.n_rows, len(cols), device=self.val.device)
        out[self.row_index()[keep], j[keep]] = self.val[keep]
        return out

    def row_sums(self) -> torch.Tensor:
        self._flush()
        return torch.zeros(self.n_rows, device=self.val.device).index_add_(0, self.row_index(), self.val)

    def to_dense(self) -> torch.Tensor:
        n = self.n_rows * self.n_cols
        if n > DENSE_LIMIT:
            raise TdbError(f"this graph's adjacency has {self.n_rows:,} x {self.n_cols:,} entries, too many to "
                           "hold dense; read rows and columns (graph.edges.row / column / select)")
        return self.select(torch.arange(self.n_cols, device=self.val.device))

    def normalised_vecmat(self, w: torch.Tensor) -> torch.Tensor:
        """w @ Â, Â = |rows| each divided by its sum: [n_cols]."""
        self._flush()
        ri = self.row_index()
        a = self.val.abs()
        sums = torch.zeros(self.n_rows, device=a.device).index_add_(0, ri, a).clamp(min=1e-10)
        return torch.zeros(self.n_cols, device=a.device).index_add_(0, self.col.long(), a * (w / sums)[ri])


def _ranges(start: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Concatenation of arange(start[i], start[i] + counts[i])."""
    total = int(counts.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.long, device=start.device)
    offs = torch.repeat_interleave(start - torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]]), counts)
    return torch.arange(total, device=start.device) + offs
