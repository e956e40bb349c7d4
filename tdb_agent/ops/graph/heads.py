"""Attention in attribution graphs: which heads carried an edge, and why a head attended.

* Per-head split of the edges into a target at attention layer L. Every path from a source
  to the target either passes through exactly one head of layer L (through its values; the
  pattern is frozen) or bypasses that layer's attention. With g_h = ∂target/∂z_h (the head's
  output before W_O), the paths through head h sum to ∂(Σ_q g_h[q]·z_h[q])/∂source, since
  the frozen model is affine. One forward on n_heads copies and two backward passes give the
  split of every edge into the target at once; bypass = edge - Σ_h (reported, and checked
  independently in the tests).
* QK decomposition of one attention score: with the norm frozen, a head's query and key
  (after rotary) are affine in the graph's sources, q = Σ_a q_a + q_bias and k = Σ_b k_b +
  k_bias, so score = scaling · q·k = Σ_{a,b} scaling · q_a·k_b (bias rows included). d_head
  backward rows per side, one forward.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field

from tdb_agent.errors import TdbError
from tdb_agent.ops.graph.build import AttributionGraph, _objective
from tdb_agent.ops.graph.nodes import edge_block


def _leaves(graph: AttributionGraph, batch: int, grad: bool = True):
    rep, src = graph.rep, graph.src
    names = rep.leaf_names()
    leaves = {n: src.leaves[n].detach().unsqueeze(0).expand(batch, -1, -1).clone().requires_grad_(grad)
              for n in names}
    return names, leaves


def _logit_ids(graph: AttributionGraph) -> list[int]:
    return sorted({t for ln in graph.logits for t in ln.token_ids})


def row_target(graph: AttributionGraph, row: int) -> tuple[str, int]:
    """The target of adjacency row `row` in the form build._objective takes."""
    nf = len(graph.rows)
    if not 0 <= row < nf + len(graph.logits):
        raise TdbError(f"row {row} is out of range; the graph has {nf + len(graph.logits)} rows")
    return ("feat", int(graph.rows[row])) if row < nf else ("logit", row - nf)


def head_split(graph: AttributionGraph, row: int, layer: int) -> torch.Tensor:
    """[n_heads, n_cols]: the part of every edge into row `row` carried by each head of `layer`."""
    rep, src, e = graph.rep, graph.src, graph.rep.engine
    H = e.spec.n_heads
    t = row_target(graph, row)
    ids = _logit_ids(graph)
    z: dict[int, torch.Tensor] = {}
    with e.lock, torch.enable_grad():
        names, leaves = _leaves(graph, H)
        hook = {f"blocks.{layer}.attn.hook_z": [lambda x, s: z.__setitem__(0, x)]}
        logits, reads = rep.forward(leaves, H, ids, extra_hooks=hook)
        obj = _objective(rep, src, reads, logits, [t], graph.logits, ids)
        (gz,) = torch.autograd.grad(obj, [z[0]], retain_graph=True)
        g0 = gz[0]  # [s, H, dh]: copies are identical, copy 0 carries the target
        hsel = torch.arange(H, device=g0.device)
        through = (z[0][hsel, :, hsel] * g0.permute(1, 0, 2)).sum()  # copy h keeps head h
        grads = torch.autograd.grad(through, [leaves[n] for n in names], allow_unused=True)
    return edge_block(rep, src, dict(zip(names, grads)), H)


class QKPair(BaseModel):
    query_source: int = Field(description="graph column of the query-side node (-1: bias terms)")
    key_source: int = Field(description="graph column of the key-side node (-1: bias terms)")
    contribution: float


def qk_decompose(graph: AttributionGraph, layer: int, head: int, query: int, key: int):
    """(Qc [n_cols + 1, d_head], Kc [n_cols + 1, d_head], scaling, clean score): each source's
    part of the head's query at `query` and key at `key` (last row: the bias terms)."""
    rep, src, e = graph.rep, graph.src, graph.rep.engine
    sp = e.spec
    if not 0 <= head < sp.n_heads:
        raise TdbError(f"head {head} is out of range; heads are 0..{sp.n_heads - 1}")
    if not 0 <= key <= query < src.n_pos:
        raise TdbError(f"need 0 <= key <= query < {src.n_pos}; got query {query}, key {key}")
    kv = head // (sp.n_heads // sp.n_kv_heads)
    dh = sp.d_head
    ids = _logit_ids(graph)
    cap: dict[str, torch.Tensor] = {}
    hooks = {f"blocks.{layer}.attn.hook_q": [lambda x, s: cap.__setitem__("q", x)],
             f"blocks.{layer}.attn.hook_k": [lambda x, s: cap.__setitem__("k", x)]}
    j = torch.arange(dh)
    with e.lock:
        with torch.enable_grad():
            names, leaves = _leaves(graph, dh)
            rep.forward(leaves, dh, ids, extra_hooks=hooks)
            q, k = cap["q"], cap["k"]
            j = j.to(q.device)
            gq = torch.autograd.grad(q[j, query, head, j].sum(), [leaves[n] for n in names], retain_graph=True,
                                     allow_unused=True)
            gk = torch.autograd.grad(k[j, key, kv, j].sum(), [leaves[n] for n in names], allow_unused=True)
        Qc = edge_block(rep, src, dict(zip(names, gq)), dh).T  # [n_cols, dh]
        Kc = edge_block(rep, src, dict(zip(names, gk)), dh).T
        with torch.no_grad():
            zero = {n: torch.zeros_like(src.leaves[n]).unsqueeze(0) for n in names}
            rep.forward(zero, 1, ids, extra_hooks=hooks)
            qb, kb = cap["q"][0, query, head].float(), cap["k"][0, key, kv].float()
    scaling = float(getattr(e.adapter.attn(layer), "scaling", dh ** -0.5))
    score = rep.clean_score(layer, head, query, key)
    return torch.cat([Qc, qb[None]]), torch.cat([Kc, kb[None]]), scaling, score


def qk_pairs(Qc: torch.Tensor, Kc: torch.Tensor, scaling: float, top_k: int = 20) -> tuple[torch.Tensor, list[QKPair]]:
    """The full pair matrix [n_q, n_k] and its top |contributions| (bias row/column = -1)."""
    P = scaling * Qc @ Kc.T
    n = P.shape[0] - 1
    flat = P.abs().flatten()
    top = flat.topk(min(top_k, flat.numel())).indices
    out = []
    for i in top.tolist():
        a, b = divmod(i, P.shape[1])
        out.append(QKPair(query_source=-1 if a == n else a, key_source=-1 if b == n else b,
                          contribution=float(P[a, b])))
    return P, out
