"""EAP-IG over activations: integrated gradients along each sender group's own output.

EAP-IG over inputs moves the token embeddings from the reference to the clean ones and lets
the whole model follow. Under the corrupted reference the path's start is the corrupted run,
so it ends where edge patching ends; under the mean reference it is not: the model run on the
mean token embedding is not the model with every sender at its corpus mean, so the gradients
are taken along states that mean patching never visits. Over activations (MIB's
EAP-IG-activations), the senders are taken in groups (the embeddings; the heads of one
layer; one MLP) and a group's output is set to

    a(α) = ref + α · (clean − ref),  α = α_1 < .. < α_m = 1 (quadrature.py: k/m by default)

while the rest of the model runs on the clean prompt (everything downstream recomputed); the
gradient at each receiver is integrated over the m runs of the sender's own group with the
quadrature's weights w_k (1/m for the Riemann sum):

    score(u → r) = (ref_u − clean_u) · Σ_k w_k ∂m/∂(input of r) |_{group(u) at α_k}

α = 1 is the clean run, shared by every group: 1 + n_groups · (m − 1) forwards and backwards
of the rows, plus the corrupted forward; a group's m − 1 runs are stacked in the batch of
⌈(m − 1) / steps_per_pass⌉ passes. By completeness of the integral, a group's scores summed over its
edges tend (m → ∞) to m(group set to its reference) − m(clean): exactly mean (or resample)
patching of that group's output. A layer's heads are moved at z (their outputs are linear in
it, except through a post-norm, where the path runs in z rather than in the outputs).
"""

from __future__ import annotations

import copy

import torch

from tdb_agent.engine import Engine
from tdb_agent.ops.edges.capture import PairGroup, SenderActs, grad_pass, head_outputs, sender_sites, stack_rows
from tdb_agent.ops.edges.contract import contract
from tdb_agent.ops.edges.grads import accumulate, block_weights
from tdb_agent.ops.edges.graph import EdgeGraph
from tdb_agent.ops.edges.quadrature import Quadrature, nodes
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


def _group_delta(engine: Engine, group: int, ref: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """The group's sender outputs, reference − clean: [b, s, k, d] (ref [b, s, ..] or a mean)."""
    if group % 2 == 0:  # the embeddings (group 0), an MLP: the site's value is the output
        return (ref - clean).unsqueeze(-2)
    layer = (group - 1) // 2
    return head_outputs(engine, layer, ref) - head_outputs(engine, layer, clean)


def score_chunk(engine: Engine, graph: EdgeGraph, chunk: PairGroup, ref_acts: dict[str, torch.Tensor],
                steps: int, norm: NormMode, out: torch.Tensor, per_position: bool,
                quadrature: Quadrature = "riemann", steps_per_pass: int = 1) -> tuple[float, int]:
    """Add the chunk's EAP-IG-over-activations scores (summed over its rows) into `out`
    [(s,) U, R]. ref_acts: the sender sites' reference values ([b, s, ...] from the corrupted
    prompts, or corpus means without the batch and position axes); the integral over α on
    `steps` nodes of `quadrature` (quadrature.py), the last α = 1 the clean pass. Returns (sum of the rows'
    clean metrics, forward-and-backward passes).

    The receivers' gradients stay in head space, summed over each group's steps as the passes
    arrive (grads.accumulate); the clean pass's sum is shared by every group (copied, never
    recomputed) and each group's is contracted with its own senders only. A group's steps
    are stacked `steps_per_pass` at a time in the batch of one forward and backward (each
    copy of the rows at its own α), as EAP-IG over inputs stacks its steps."""
    weights = block_weights(engine)
    acts, g, m = grad_pass(engine, chunk.ids, chunk.target, chunk.distractor, None, norm, want_senders=True,
                           last_mlp_tail=True)
    alphas, step_w = nodes(quadrature, steps)
    clean_grads = accumulate(engine, None, acts, g, 1, norm, step_w[-1], weights)
    clean_acts = {site: acts[site] for site in sender_sites(engine)}
    del acts, g
    passes = 1
    for i, (site, us) in enumerate(sender_groups(engine)):
        # in float32: the path's points are rounded to the model's dtype once, and the sender
        # differences are taken before any rounding (in bf16 a difference of ~1 % of an output
        # would keep about one significant bit)
        c = clean_acts[site]
        c32, r = c.float(), ref_acts[site].float()
        G = copy.deepcopy(clean_grads)
        path = list(zip(alphas[:-1], step_w[:-1]))
        for j in range(0, len(path), steps_per_pass):
            part = path[j:j + steps_per_pass]
            k = len(part)
            # [k·b, s, ..]: the rows' copies step-major, each at its α; the value is the
            # interpolated one and the gradient passes straight through to x, so every
            # receiver's read stays in the graph (only those downstream of the group, which
            # that gradient does not touch, are used)
            value = torch.cat([(r + alpha * (c32 - r)).to(c.dtype).expand_as(c) for alpha, _ in part])
            acts, gk, _ = grad_pass(engine, stack_rows(chunk.ids, k), stack_rows(chunk.target, k),
                                    None if chunk.distractor is None else stack_rows(chunk.distractor, k), None, norm,
                                    want_senders=False, last_mlp_tail=True,
                                    hooks={site: lambda x, st, v=value: v + (x - x.detach())})
            G = accumulate(engine, G, acts, gk, k, norm, [w for _, w in part], weights)
            del acts, gk
            passes += 1
        D = _group_delta(engine, i, r.expand_as(c32) if r.dim() < c32.dim() else r, c32)
        contract(engine, graph, SenderActs(full=D), G, out, per_position, weights, slice(us[0], us[-1] + 1))
    return float(m.sum()), passes
