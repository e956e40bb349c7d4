"""The EAP contraction score[(t,) u, r] += Σ_b (Σ_t) D[u, b, t] · G[r, b, t], a chunk of
positions at a time.

D (sender u's reference − clean output) and G (the gradient at receiver r's input) are both
[b, s, d] per node: held whole for a GPT-2-small batch they are hundreds of MB. They are
built here from their small parts (SenderActs differences: z in head space; ReceiverGrads:
head-space gradient sums) for `rows` positions × batch at a time, D for every sender and G a
block's receivers at a time, and reduced into the scores at once (one matrix product per
block: the senders upstream of the block's MLP × its q, k, v and MLP receivers; entries of
q/k/v receivers with a same-block sender are not edges and are masked by the caller).
"""

from __future__ import annotations

import torch

from tdb_agent.engine import Engine
from tdb_agent.ops.edges.capture import SenderActs
from tdb_agent.ops.edges.grads import ReceiverGrads, folded_weights
from tdb_agent.ops.edges.graph import EdgeGraph

#: bytes of the sender chunk D [n_senders, b, positions, d] (float32); the folded q/k/v weights
#: of every block are kept across chunks when they fit in as much (else made again per chunk)
CHUNK_BYTES = 1 << 27


def _sender_chunk(engine: Engine, delta: SenderActs, W_O: list[torch.Tensor], b: int, P: slice, n: int) -> torch.Tensor:
    """D [n_senders, b, n, d] at positions P (delta broadcasts over b and positions for means)."""
    spec = engine.spec
    H, d = spec.n_heads, spec.d_model

    def rows(t: torch.Tensor, tail: int) -> torch.Tensor:  # [b, n, *tail dims] (means broadcast)
        return (t[:, P] if t.dim() > tail else t).float().expand(b, n, *t.shape[-tail:])

    D = torch.empty(1 + spec.n_layers * (H + 1), b, n, d, device=engine.device)
    if delta.full is not None:  # [b, s, U, d] or means [U, d]
        D.copy_(rows(delta.full, 2).permute(2, 0, 1, 3))
        return D
    D[0] = rows(delta.emb, 1)
    for l in range(spec.n_layers):
        base = 1 + l * (H + 1)
        z = rows(delta.z[l], 2).permute(2, 0, 1, 3).reshape(H, b * n, -1)
        torch.bmm(z, W_O[l], out=D[base:base + H].view(H, b * n, d))
        D[base + H] = rows(delta.mlp[l], 1)
    return D


def _receiver_chunk(grads: ReceiverGrads, l: int, Wbar: torch.Tensor | None, P: slice, n: int) -> torch.Tensor:
    """G [n_qkv + 1, b, n, d] at positions P: block l's q, k, v receivers, then its MLP."""
    b = grads.b
    if grads.full[l] is not None:  # outside the closed form: kept whole
        G = torch.empty(grads.full[l].shape[0] + 1, b, n, grads.full[l].shape[-1], device=grads.full[l].device)
        G[:-1] = grads.full[l][:, :, P]
        G[-1] = grads.mlp[l][:, P]
        return G
    head = grads.head[l][:, P]  # [b, n, k, dh]
    k = head.shape[2]
    G = torch.empty(k + 1, b, n, Wbar.shape[-1], device=head.device)
    torch.bmm(head.permute(2, 0, 1, 3).reshape(k, b * n, -1), Wbar, out=G[:k].view(k, b * n, -1))
    if len(grads.weight[l]) == 1:  # − inv · c · x̂ in place: [k, b, n, 1] ⊙ [b, n, d]
        G[:k].addcmul_(grads.weight[l][0][:, P].permute(2, 0, 1).unsqueeze(-1), grads.xhat[l][0][:, P], value=-1.0)
    elif grads.weight[l]:  # the same summed over the steps: [b·n, k, m] @ [b·n, m, d]
        w = torch.stack([t[:, P] for t in grads.weight[l]], dim=-1).reshape(b * n, k, -1)
        x = torch.stack([t[:, P] for t in grads.xhat[l]], dim=-2).reshape(b * n, -1, Wbar.shape[-1])
        G[:k] -= torch.bmm(w, x).view(b, n, k, -1).permute(2, 0, 1, 3)
    G[k] = grads.mlp[l][:, P]
    return G


def contract(engine: Engine, graph: EdgeGraph, delta: SenderActs, grads: ReceiverGrads, out: torch.Tensor,
             per_position: bool) -> None:
    """out[(t,) u, r] += Σ_b (Σ_t) D[u, b, t] · G[r, b, t] over every (sender, receiver) pair."""
    spec = engine.spec
    L, U = spec.n_layers, graph.n_senders
    b, s = grads.b, grads.s
    W_O = [engine.adapter.W_O(l).to(engine.device, torch.float32) for l in range(L)] if delta.full is None else []
    step = max(1, CHUNK_BYTES // (U * b * spec.d_model * 4))
    closed = [l for l in range(L) if grads.full[l] is None]
    keep = step < s and len(closed) * grads.head[closed[0]].shape[2] * grads.head[closed[0]].shape[3] * \
        spec.d_model * 4 <= CHUNK_BYTES if closed else False
    kept = {l: folded_weights(engine, l) for l in closed} if keep else {}
    for t0 in range(0, s, step):
        P = slice(t0, min(s, t0 + step))
        n = P.stop - P.start
        D = _sender_chunk(engine, delta, W_O, b, P, n)
        for l in range(L + 1):
            if l < L:
                sl = graph.layer_receivers(l)
                Wbar = None if grads.full[l] is not None else kept[l] if keep else folded_weights(engine, l)
                G = _receiver_chunk(grads, l, Wbar, P, n)
            else:
                sl = slice(graph.n_receivers - 1, graph.n_receivers)
                G = grads.logits[:, P].unsqueeze(0).contiguous()
            up = graph.n_upstream[sl.stop - 1]
            if per_position:  # [n, U, b·d] @ [n, b·d, R] -> [n, U, R]
                Dp = D[:up].permute(2, 0, 1, 3).reshape(n, up, -1)
                Gp = G.permute(2, 1, 3, 0).reshape(n, -1, G.shape[0])
                out[P, :up, sl] += torch.bmm(Dp, Gp)
            else:
                out[:up, sl] += D[:up].view(up, -1) @ G.view(G.shape[0], -1).T
