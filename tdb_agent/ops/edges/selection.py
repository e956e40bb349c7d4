"""Which edges a faithfulness curve keeps at each budget, and its areas, as the MIB circuit
track computes them (docs/DESIGN.md §4 "edges", where the sources are cited).

* Two rankings: CPR's curve keeps the edges with the highest *signed* support first (an edge
  whose removal moves the metric away from the full model's value; with our EAP sign,
  (reference − clean) · ∂m/∂input, that is −score · sign(m(full) − m(∅))), CMD's curve the
  highest |score| first. An edge that hurts the behaviour thus enters CPR's circuit last.
* A budget p keeps ⌊p · n_edges⌋ edges; the circuit is then cleaned to the part connected to
  both ends: repeatedly, a node (EMB always counts as fed) with no kept incoming edge or no
  kept outgoing edge is dropped with all its edges. A dropped node's edges change nothing
  against the corrupted prompts (a node that reads only reference values writes its
  reference value), but they do against the corpus mean.
* Areas by trapezoids over the budgets themselves (x = p, not the edges left after the
  cleaning), from the first budget to the last, with f not clipped: CPR = ∫ f, CMD = ∫ |1 − f|
  with |1 − f| taken at the points.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tdb_agent.ops.edges.graph import EdgeGraph


def budget_counts(n_total: int, budgets: Sequence[float]) -> list[int]:
    """Edges kept at each budget: ⌊p · n⌋ (MIB's int(pct · n)); a hair of tolerance keeps
    0.1 · 10 from flooring to 0 through binary rounding."""
    return [min(n_total, int(b * n_total + 1e-9)) for b in budgets]


def top_masks(graph: EdgeGraph, keys: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """[len(counts), (s,) U, R] masks keeping the `count` edges of highest key (ties by index;
    invalid pairs never)."""
    valid = graph.valid.to(keys.device).expand_as(keys)
    flat = torch.where(valid, keys.double(), torch.full(keys.shape, -torch.inf, dtype=torch.float64,
                                                        device=keys.device)).flatten()
    order = flat.argsort(descending=True, stable=True)
    masks = torch.zeros((len(counts),) + tuple(keys.shape), dtype=torch.bool, device=keys.device)
    for i, c in enumerate(counts):
        masks[i].view(-1)[order[:min(c, int(valid.sum()))]] = True
    return masks


def support(scores: torch.Tensor, gap: float) -> torch.Tensor:
    """Signed support of each edge for the behaviour: −score · sign(m(full) − m(∅)) (an EAP
    score is the metric's change when the edge is removed)."""
    return -scores * (1.0 if gap >= 0 else -1.0)


def _receiver_nodes(graph: EdgeGraph) -> torch.Tensor:
    """[R, U] bool: receiver r is an input of sender node u (a key/value input of a group
    belongs to every head of the group; LOGITS to none)."""
    m = torch.zeros(graph.n_receivers, graph.n_senders, dtype=torch.bool)
    for r, rec in enumerate(graph.receivers):
        for h in rec.heads:
            if h in graph.sender_index:
                m[r, graph.sender_index[h]] = True
    return m


def prune_dangling(graph: EdgeGraph, keeps: torch.Tensor) -> torch.Tensor:
    """The kept edges connected to both ends: nodes without a kept incoming edge (EMB excepted)
    or without a kept outgoing edge are dropped with their edges until none is. keeps
    [n, U, R] or, position-aware, [n, s, U, R] (a node counts as fed or read when it is at
    any position). Returns a new mask."""
    keeps = keeps.clone()
    recv_node = _receiver_nodes(graph).to(keeps.device).float()
    logits = torch.zeros(graph.n_receivers, dtype=torch.bool, device=keeps.device)
    logits[graph.receiver_index["LOGITS"]] = True
    while True:
        edges = keeps.flatten(1, -3).any(1) if keeps.dim() == 4 else keeps  # [n, U, R]
        has_out = edges.any(-1)
        has_in = (edges.any(-2).float() @ recv_node) > 0
        has_in[:, 0] = True  # EMB is fed by the tokens
        alive = has_out & has_in
        recv_alive = ((alive.float() @ recv_node.T) > 0) | logits
        ok = alive[:, :, None] & recv_alive[:, None, :]
        if keeps.dim() == 4:
            ok = ok[:, None]
        pruned = keeps & ok
        if torch.equal(pruned, keeps):
            return pruned
        keeps = pruned


def mib_areas(budgets: Sequence[float], f_cpr: Sequence[float], f_cmd: Sequence[float]) -> tuple[float, float]:
    """(CPR, CMD): trapezoids over x = the budgets, CPR under CPR's curve, CMD under |1 − f| of
    CMD's curve, each |1 − f| taken at the points (MIB's rule; a segment crossing 1 is not
    split)."""
    xs = list(budgets)
    if len(xs) < 2 or len(f_cpr) != len(xs) or len(f_cmd) != len(xs):
        raise ValueError("an area needs one faithfulness per budget and at least two budgets")
    cpr = sum((xs[i + 1] - xs[i]) * (f_cpr[i] + f_cpr[i + 1]) / 2 for i in range(len(xs) - 1))
    dev = [abs(1 - f) for f in f_cmd]
    cmd = sum((xs[i + 1] - xs[i]) * (dev[i] + dev[i + 1]) / 2 for i in range(len(xs) - 1))
    return float(cpr), float(cmd)


def node_order_keys(graph: EdgeGraph, order: Sequence[str]) -> torch.Tensor:
    """[U, R] keys ranking the edges as a node ranking grows: an edge enters when the later of
    its two nodes does (EMB and LOGITS are always in; a key/value input of a group enters with
    the group's first head), and among edges entering together, the one whose other node
    ranks higher first. So the top edges at the k-th node's boundary are exactly the edges
    among the top k nodes (node patching of the rest); unranked nodes enter last."""
    pos = {n: i for i, n in enumerate(order)}
    last = len(order)
    pos["EMB"] = pos["LOGITS"] = -1
    sp = torch.tensor([pos.get(s, last) for s in graph.senders], dtype=torch.float64)
    rp = torch.tensor([min(pos.get(h, last) for h in r.heads) for r in graph.receivers], dtype=torch.float64)
    later = torch.maximum(sp[:, None], rp[None, :])
    earlier = torch.minimum(sp[:, None], rp[None, :])
    return -(later * (last + 2) + earlier)
