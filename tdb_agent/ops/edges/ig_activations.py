"""EAP-IG over activations: integrated gradients along each sender group's own output.

EAP-IG over inputs moves the token embeddings from the reference to the clean ones and lets
the whole model follow. Under the corrupted reference the path's start is the corrupted run,
so it ends where edge patching ends; under the mean reference it is not: the model run on the
mean token embedding is not the model with every sender at its corpus mean, so the gradients
are taken along states that mean patching never visits. Over activations (MIB's
EAP-IG-activations), the senders are taken in groups (the embeddings; the heads of one
layer; one MLP) and a group's output is set to

    a(α) = ref + α · (clean − ref),  α = k/m, k = 1..m

while the rest of the model runs on the clean prompt (everything downstream recomputed); the
gradient at each receiver is averaged over the m runs of the sender's own group:

    score(u → r) = (ref_u − clean_u) · (1/m) Σ_k ∂m/∂(input of r) |_{group(u) at α_k}

α = 1 is the clean run, shared by every group: 1 + n_groups · (m − 1) forwards and backwards,
plus the corrupted forward. By completeness of the integral, a group's scores summed over its
edges tend (m → ∞) to m(group set to its reference) − m(clean): exactly mean (or resample)
patching of that group's output. A layer's heads are moved at z (their outputs are linear in
it, except through a post-norm, where the path runs in z rather than in the outputs).
"""

from __future__ import annotations

import torch

from tdb_agent.engine import Engine
from tdb_agent.ops.edges.capture import PairGroup, receiver_grads, sender_sites, senders_from
from tdb_agent.ops.edges.graph import EdgeGraph
from tdb_agent.ops.edges.reads import NormMode


def sender_groups(engine: Engine) -> list[tuple[str, list[int]]]:
    """(hook site, sender indices) of each group whose output is interpolated as one."""
    H = engine.spec.n_heads
    sites = sender_sites(engine)  # EMB, then each layer's heads and MLP
    out = [(sites[0], [0])]
    for l in range(engine.spec.n_layers):
        first = 1 + l * (H + 1)
        out += [(sites[1 + 2 * l], list(range(first, first + H))), (sites[2 + 2 * l], [first + H])]
    return out


def score_chunk(engine: Engine, graph: EdgeGraph, chunk: PairGroup, ref_acts: dict[str, torch.Tensor],
                steps: int, norm: NormMode, out: torch.Tensor, per_position: bool) -> tuple[float, int]:
    """Add the chunk's EAP-IG-over-activations scores (summed over its rows) into `out`
    [(s,) U, R]. ref_acts: the sender sites' reference values ([b, s, ...] from the corrupted
    prompts, or corpus means without the batch and position axes). Returns (sum of the rows'
    clean metrics, forward-and-backward passes)."""
    clean_acts: dict[str, torch.Tensor] = {}
    sites = sender_sites(engine)

    def keep(x, site):
        clean_acts[site] = x.detach()

    G_clean, m, _ = receiver_grads(engine, graph, chunk, norm=norm, hooks={s: keep for s in sites})
    passes = 1
    D = senders_from(engine, ref_acts)
    clean = senders_from(engine, clean_acts)
    D = (D if D.dim() == 4 else D.expand_as(clean)) - clean  # [b, s, U, d]
    for site, us in sender_groups(engine):
        c, r = clean_acts[site], ref_acts[site].to(clean_acts[site].dtype)
        G = G_clean.clone()
        for k in range(1, steps):
            alpha = k / steps
            value = (r + alpha * (c - r)).expand_as(c)
            # the value is the interpolated one; the gradient passes straight through to x, so
            # every receiver's read stays in the graph (only those downstream of the group,
            # which that gradient does not touch, are used)
            Gk, _, _ = receiver_grads(engine, graph, chunk, norm=norm,
                                      hooks={site: lambda x, s, v=value: v + (x - x.detach())})
            G += Gk
            passes += 1
        G /= steps
        eq = "bsnd,rbsd->snr" if per_position else "bsnd,rbsd->nr"
        out[..., us, :] += torch.einsum(eq, D[:, :, us], G).to(out.dtype)
    return float(m.sum()), passes
