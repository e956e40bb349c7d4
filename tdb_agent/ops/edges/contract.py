"""The EAP contraction score[(t,) u, r] += Σ_b (Σ_t) D[u, b, t] · G[r, b, t], a chunk of
positions at a time.

D (sender u's reference − clean output) and G (the gradient at receiver r's input) are both
[b, s, d] per node: held whole for a GPT-2-small batch they are hundreds of MB. They are
built here from their small parts (SenderActs differences: z in head space; ReceiverGrads:
head-space gradient sums) for `rows` positions × batch at a time, D for every sender and G a
group of consecutive blocks' receivers at a time, and reduced into the scores at once: one
matrix product per group, the senders upstream of the group's last receiver × its receivers.
A product with a few dozen receivers (one GPT-2 block's 37) runs at under half the speed of
one with ~150 on a CPU (the senders' side is packed once per product whatever the receivers'
count), so groups take at least GROUP_RECEIVERS receivers; the entries they compute that are
not edges (a receiver and a sender of its own or a later block in the group) are masked by
the caller.
"""

from __future__ import annotations

import torch

from tdb_agent.engine import Engine
from tdb_agent.ops.edges.capture import SenderActs
from tdb_agent.ops.edges.grads import BlockWeights, ReceiverGrads, block_weights
from tdb_agent.ops.edges.graph import EdgeGraph

#: bytes of the sender chunk D [n_senders, b, positions, d] (float32), and of a group's G (at
#: most glibc's largest reused block: larger ones are fresh pages at every call)
CHUNK_BYTES = 1 << 25
#: fewest receivers one product takes (consecutive blocks grouped; the logits join the last)
GROUP_RECEIVERS = 128


def _sender_chunk(engine: Engine, delta: SenderActs, weights: BlockWeights, b: int, P: slice, n: int) -> torch.Tensor:
    """D [n_senders, b, n, d] at positions P (delta broadcasts over b and positions for means)."""
    spec = engine.spec
    H, d = spec.n_heads, spec.d_model

    def rows(t: torch.Tensor, tail: int) -> torch.Tensor:  # [b, n, *tail dims] (means broadcast)
        return (t[:, P] if t.dim() > tail else t).float().expand(b, n, *t.shape[-tail:])

    if delta.full is not None:  # [b, s, U, d] or means [U, d] (U: the senders contracted)
        return rows(delta.full, 2).permute(2, 0, 1, 3).contiguous()
    D = torch.empty(1 + spec.n_layers * (H + 1), b, n, d, device=engine.device)
    D[0] = rows(delta.emb, 1)
    for l in range(spec.n_layers):
        base = 1 + l * (H + 1)
        z = rows(delta.z[l], 2).permute(2, 0, 1, 3).reshape(H, b * n, -1)
        torch.bmm(z, weights.W_O(l), out=D[base:base + H].view(H, b * n, d))
        D[base + H] = rows(delta.mlp[l], 1)
    return D


def _receiver_chunk(grads: ReceiverGrads, l: int, Wbar: torch.Tensor | None, P: slice, G: torch.Tensor) -> None:
    """Write into G [n_qkv + 1, b, n, d] block l's q, k, v receivers' gradients at positions P, then its MLP's."""
    b, n = grads.b, G.shape[2]
    if grads.full[l] is not None:  # outside the closed form: kept whole
        G[:-1] = grads.full[l][:, :, P]
        G[-1] = grads.mlp[l][:, P]
        return
    head = grads.head[l][:, P]  # [b, n, k, dh]
    k = head.shape[2]
    torch.bmm(head.permute(2, 0, 1, 3).reshape(k, b * n, -1), Wbar, out=G[:k].view(k, b * n, -1))
    if len(grads.weight[l]) == 1:  # − inv · c · x̂ in place: [k, b, n, 1] ⊙ [b, n, d]
        G[:k].addcmul_(grads.weight[l][0][:, P].permute(2, 0, 1).unsqueeze(-1), grads.xhat[l][0][:, P], value=-1.0)
    elif grads.weight[l]:  # the same summed over the steps: [b·n, k, m] @ [b·n, m, d]
        w = torch.stack([t[:, P] for t in grads.weight[l]], dim=-1).reshape(b * n, k, -1)
        x = torch.stack([t[:, P] for t in grads.xhat[l]], dim=-2).reshape(b * n, -1, Wbar.shape[-1])
        G[:k] -= torch.bmm(w, x).view(b, n, k, -1).permute(2, 0, 1, 3)
    G[k] = grads.mlp[l][:, P]


def receiver_groups(graph: EdgeGraph) -> list[list[int]]:
    """Consecutive blocks (n_layers: the logits) whose receivers one product takes: at least
    GROUP_RECEIVERS receivers each, a smaller remainder joining the group before it."""
    L = graph.spec.n_layers
    groups: list[list[int]] = []
    cur: list[int] = []
    for l in range(L + 1):
        cur.append(l)
        if sum(block_receivers(graph, i).stop - block_receivers(graph, i).start for i in cur) >= GROUP_RECEIVERS:
            groups.append(cur)
            cur = []
    if cur:
        if groups:
            groups[-1] += cur
        else:
            groups.append(cur)
    return groups


def block_receivers(graph: EdgeGraph, l: int) -> slice:
    """Block l's receivers (its q, k, v inputs and its MLP's); l = n_layers: the logits."""
    L = graph.spec.n_layers
    return graph.layer_receivers(l) if l < L else slice(graph.n_receivers - 1, graph.n_receivers)


def block_receiver_grads(grads: ReceiverGrads, weights: BlockWeights, l: int, P: slice, G: torch.Tensor) -> None:
    """Write into G [len(block_receivers(l)), b, n, d] those receivers' gradients at positions P
    (l = n_layers: the logits' read of the final residual stream)."""
    if l == len(grads.full):
        G[0] = grads.logits[:, P]
    else:
        _receiver_chunk(grads, l, None if grads.full[l] is not None else weights.folded(l), P, G)


def contract(engine: Engine, graph: EdgeGraph, delta: SenderActs, grads: ReceiverGrads, out: torch.Tensor,
             per_position: bool, weights: BlockWeights | None = None, senders: slice | None = None) -> None:
    """out[(t,) u, r] += Σ_b (Σ_t) D[u, b, t] · G[r, b, t] over every (sender, receiver) pair
    (and some pairs that are not edges: the caller masks them). senders: a range of consecutive
    senders, whose outputs alone `delta.full` holds (EAP-IG over activations contracts one
    sender group at a time); receivers upstream of all of them are skipped."""
    spec = engine.spec
    senders = senders or slice(0, graph.n_senders)
    u0, U, d = senders.start, senders.stop - senders.start, spec.d_model
    b, s = grads.b, grads.s
    weights = weights or block_weights(engine)
    groups = []
    for g in receiver_groups(graph):  # blocks whose receivers read none of the senders dropped
        g = [l for l in g if graph.n_upstream[block_receivers(graph, l).stop - 1] > u0]
        if g:
            groups.append((g, slice(block_receivers(graph, g[0]).start, block_receivers(graph, g[-1]).stop)))
    widest = max(sl.stop - sl.start for _, sl in groups)
    step = max(1, CHUNK_BYTES // (max(U, widest) * b * d * 4))
    # one buffer for every group's G: a fresh tensor of this size is fresh pages (mmap), whose
    # first touch costs as much as the product that fills it
    buf = weights.workspace(widest * b * min(step, s) * d)
    for t0 in range(0, s, step):
        P = slice(t0, min(s, t0 + step))
        n = P.stop - P.start
        D = _sender_chunk(engine, delta, weights, b, P, n)
        for blocks, sl in groups:
            G = buf[:(sl.stop - sl.start) * b * n * d].view(sl.stop - sl.start, b, n, d)
            for l in blocks:
                r = block_receivers(graph, l)
                block_receiver_grads(grads, weights, l, P, G[r.start - sl.start:r.stop - sl.start])
            up = min(max(graph.n_upstream[sl]) - u0, U)
            if per_position:  # [n, U, b·d] @ [n, b·d, R] -> [n, U, R]
                Dp = D[:up].permute(2, 0, 1, 3).reshape(n, up, -1)
                Gp = G.permute(2, 1, 3, 0).reshape(n, -1, G.shape[0])
                out[P, u0:u0 + up, sl] += torch.bmm(Dp, Gp)
            else:
                out[u0:u0 + up, sl] += D[:up].view(up, -1) @ G.view(G.shape[0], -1).T
