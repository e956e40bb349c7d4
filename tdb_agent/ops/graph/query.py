"""Naming and walking an attribution graph: node ids, rows and columns, strongest paths.

Node ids: `L{l}.tc.F{i}@p` (transcoder feature; the component `L{l}.tc.F{i}` at position
p), `L{l}.resid.F{i}@p` (residual SAE latent), `ERR.L{l}.mlp@p` / `ERR.L{l}.resid@p` (error
nodes), `EMB@p` (token embedding), `LOGIT[label]` (a target).
"""

from __future__ import annotations

import re

from tdb_agent.errors import TdbError
from tdb_agent.ops.graph.build import AttributionGraph

_FEAT = re.compile(r"L([0-9]+)\.(tc|resid)\.F([0-9]+)@([0-9]+)")
_ERR = re.compile(r"ERR\.L([0-9]+)\.(mlp|resid)@([0-9]+)")
_EMB = re.compile(r"EMB@([0-9]+)")


def col_tid(graph: AttributionGraph, col: int) -> str:
    src = graph.src
    if col < src.n_feat:
        l, p, i = src.feat[col].tolist()
        return f"L{l}.{'tc' if graph.mode == 'transcoders' else 'resid'}.F{i}@{p}"
    if col < src.n_feat + src.n_err:
        site, l = src.err_keys[(col - src.n_feat) // src.n_pos]
        return f"ERR.L{l}.{site}@{(col - src.n_feat) % src.n_pos}"
    return f"EMB@{col - src.n_feat - src.n_err}"


def row_tid(graph: AttributionGraph, row: int) -> str:
    nf = len(graph.rows)
    return col_tid(graph, int(graph.rows[row])) if row < nf else f"LOGIT[{graph.logits[row - nf].label}]"


def sq_tid(graph: AttributionGraph, sq, i: int) -> str:
    """The node id of index i of the square graph (`influence.square`)."""
    n_src = len(sq.cols)
    return col_tid(graph, int(sq.cols[i])) if i < n_src else row_tid(graph, len(graph.rows) + i - n_src)


def find_col(graph: AttributionGraph, tid: str) -> int:
    """The source column of a node id."""
    src = graph.src
    m = _FEAT.fullmatch(tid)
    if m:
        l, _, i, p = map(lambda g: int(g) if g.isdigit() else g, m.groups())
        hit = ((src.feat[:, 0] == l) & (src.feat[:, 1] == p) & (src.feat[:, 2] == i)).nonzero()
        if len(hit):
            return int(hit[0, 0])
        raise TdbError(f"{tid} is not an active feature node of this graph")
    m = _ERR.fullmatch(tid)
    if m and (m.group(2), int(m.group(1))) in src.err_keys:
        if int(m.group(3)) < src.n_pos:
            return src.err_index(m.group(2), int(m.group(1)), int(m.group(3)))
    m = _EMB.fullmatch(tid)
    if m and int(m.group(1)) < src.n_pos:
        return src.emb_index(int(m.group(1)))
    raise TdbError(f"unknown graph node {tid!r}; nodes look like L1.tc.F7@4, ERR.L1.mlp@4, EMB@2 or LOGIT[label]")


def find_row(graph: AttributionGraph, tid: str) -> int:
    """The adjacency row of a node id (an expanded feature or a target; 'LOGIT' = the first)."""
    nf = len(graph.rows)
    if tid.startswith("LOGIT"):
        for j, ln in enumerate(graph.logits):
            if tid in ("LOGIT", f"LOGIT[{ln.label}]"):
                return nf + j
        raise TdbError(f"no target {tid!r}; targets: {[f'LOGIT[{ln.label}]' for ln in graph.logits]}")
    row = graph.row_of_feature(find_col(graph, tid))
    if row is None:
        raise TdbError(f"{tid} has no incoming edges computed (not among the expanded features)")
    return row


def strongest_paths(graph: AttributionGraph, row: int, n_paths: int = 3, max_len: int = 12) -> list[list[str]]:
    """From a target row, follow the n strongest incoming edges, each then back along the
    strongest incoming edge until a node without computed inputs (embedding, error,
    unexpanded feature). Each path is listed from its start to the target."""
    E = graph.edges
    into = E.row(row)
    first = into.abs().topk(min(n_paths, E.n_cols)).indices.tolist()
    paths = []
    for col in first:
        if float(into[col]) == 0:
            continue
        path = [row_tid(graph, row), col_tid(graph, col)]
        r = graph.row_of_feature(col) if col < graph.src.n_feat else None
        while r is not None and len(path) < max_len and E.row(r).abs().max() > 0:
            col = int(E.row(r).abs().argmax())
            path.append(col_tid(graph, col))
            r = graph.row_of_feature(col) if col < graph.src.n_feat else None
        paths.append(path[::-1])
    return paths
