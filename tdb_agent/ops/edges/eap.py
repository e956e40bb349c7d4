"""Edge attribution patching (EAP) and EAP with integrated gradients over the inputs (EAP-IG).

score(u → r) = (a_u(reference) − a_u(clean)) · ∂m/∂(input of r), summed over positions (or
kept per position) and averaged over the prompt pairs: the first-order estimate of how the
metric moves when receiver r alone reads sender u's reference value (docs/DESIGN.md §4,
act × grad, per edge). The reference is the corrupted prompt's run or the mean over the
reference corpus.

EAP: one clean forward with one backward, plus one forward of the corrupted prompts.
EAP-IG: the gradient is averaged over m inputs whose token embeddings run from the reference
(corrupted prompt's embeddings, or the mean embedding) to the clean ones, α = k/m, k = 1..m
(the last is the clean run, whose sender outputs it also gives): m forwards and backwards plus
the corrupted forward, the steps stacked in the batch of one pass as far as `batch_size`
rows allow (`steps_per_pass`). EAP-IG over activations (ig_activations.py) moves each sender
group's output instead; it is the default against the mean.

Nothing of size [receivers or senders, batch, positions, d_model] is kept whole: gradients
stay in head space, summed over the steps (grads.py), sender outputs as z and MLP outputs,
and contract.py builds both a chunk of positions at a time as it reduces them into the scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from tdb_agent.engine import Engine
from tdb_agent.errors import TdbError
from tdb_agent.ops.edges import ig_activations
from tdb_agent.ops.edges.capture import Pair, PairGroup, SenderActs, group_pairs, mean_acts, mean_embedding, \
    reference_run, sender_sites, shared_positions
from tdb_agent.ops.edges.contract import contract
from tdb_agent.ops.edges.grads import block_weights, receiver_grads
from tdb_agent.ops.edges.graph import EdgeGraph, edge_graph
from tdb_agent.ops.edges.quadrature import Quadrature, nodes
from tdb_agent.ops.edges.reads import NormMode
from tdb_agent.ops.metrics import MetricName
from tdb_agent.ops.runs import RunCache, get_means

Method = Literal["eap", "eap-ig"]
Reference = Literal["corrupted", "mean"]
IG = Literal["inputs", "activations"]


@dataclass
class EdgeScores:
    graph: EdgeGraph
    scores: torch.Tensor  # [n_senders, n_receivers], 0 where no edge (per_position: [s, n_senders, n_receivers])
    method: Method
    reference: Reference
    metric_name: MetricName
    n_pairs: int
    forward_passes: int = 0
    backward_passes: int = 0
    metric_clean: float = 0.0
    per_position: bool = False
    cached: bool = False  # taken from the workbench's cache (ops/edges/cache.py): no pass was run
    ig: IG | None = None  # EAP-IG's path: over the input embeddings or each sender group's output

    def summed(self) -> torch.Tensor:
        """Scores summed over positions: [n_senders, n_receivers]."""
        return self.scores.sum(0) if self.per_position else self.scores

    def ranked(self, top_k: int | None = None) -> list[tuple[str, float]]:
        """Edges by |score|, largest first: ("SENDER->RECEIVER[@t]", score)."""
        g = self.graph
        flat = self.scores.abs().flatten()
        valid = (g.valid.to(self.scores.device).expand_as(self.scores)).flatten()
        flat = torch.where(valid, flat, torch.full_like(flat, -1.0))
        k = int(valid.sum()) if top_k is None else min(top_k, int(valid.sum()))
        idx = flat.topk(k).indices.tolist()
        out = []
        U, R = g.n_senders, g.n_receivers
        for i in idx:
            t, rest = divmod(i, U * R)
            s, r = divmod(rest, R)
            name = g.edge_name(s, r) + (f"@{t}" if self.per_position else "")
            out.append((name, float(self.scores.flatten()[i])))
        return out


def _embed(engine: Engine, ids: torch.Tensor) -> torch.Tensor:
    return engine.adapter.embed_modules()["hook_embed"](ids)


def edge_scores(engine: Engine, pairs: Sequence[Pair], method: Method = "eap", steps: int = 5,
                reference: Reference = "corrupted", norm: NormMode = "unfrozen", per_position: bool = False,
                metric: MetricName | None = None, batch_size: int = 16, cache: RunCache | None = None,
                steps_per_pass: int | None = None, ig: IG | None = None,
                quadrature: Quadrature = "riemann", reuse_prefix: bool = True) -> EdgeScores:
    """Score every edge of the model's edge graph (senders EMB, heads, MLPs -> each head's q, k
    and v input, each MLP, LOGITS) by EAP or EAP-IG: the estimated change of the metric when
    that edge alone carries its reference value, averaged over the prompt pairs.

    method "eap": one clean forward and backward plus one corrupted forward per batch;
    "eap-ig": the gradient averaged over `steps` inputs between the reference and clean token
    embeddings. reference: the corrupted prompts' sender outputs, or their corpus means.
    norm: "unfrozen" (the true gradient) or "frozen" (every norm's scale held).
    ig (EAP-IG's path): "inputs" (token embeddings, MIB's EAP-IG-inputs) or "activations" (each
    sender group's output, ig_activations.py: 1 + n_groups·⌈(steps − 1) / steps_per_pass⌉
    passes); default inputs
    against the corrupted prompts, activations against the mean (whose path the inputs miss).
    quadrature (EAP-IG's rule for the integral over α, quadrature.py): "riemann" (MIB's right
    Riemann sum, α = k/m) or "radau" (right Gauss–Radau: m nodes, the last the clean run; the
    same passes, exact for polynomials of degree 2m − 2).
    reuse_prefix (against the corrupted prompts; EAP and EAP-IG over inputs): the leading
    positions every pair of a batch shares are run by the corrupted run only, and the clean
    passes continue from its keys/values there (capture.Prefix): the same scores (0 at those
    positions), the same number of passes, fewer positions in the clean ones.
    per_position: keep a position axis (prompts of one length). Batched over pairs by length,
    `batch_size` pairs a batch; EAP-IG stacks `steps_per_pass` steps of a batch in one forward
    and backward (default: as many as keep a pass within `batch_size` rows; over activations,
    a sender group's steps)."""
    if method not in ("eap", "eap-ig"):
        raise TdbError(f"method must be 'eap' or 'eap-ig', not {method!r}")
    if reference not in ("corrupted", "mean"):
        raise TdbError(f"reference must be 'corrupted' or 'mean', not {reference!r}")
    if method == "eap-ig" and not 1 <= steps <= 256:
        raise TdbError(f"steps must be between 1 and 256, not {steps}")
    nodes(quadrature, steps if method == "eap-ig" else 1)  # the rule checked before any pass
    if ig not in (None, "inputs", "activations"):
        raise TdbError(f"ig must be 'inputs' or 'activations', not {ig!r}")
    if method == "eap-ig":
        ig = ig or ("activations" if reference == "mean" else "inputs")
    else:
        ig = None
    graph = edge_graph(engine.spec)
    with engine.lock:
        groups, name = group_pairs(engine, pairs, reference == "corrupted", metric)
        if per_position and len(groups) > 1:
            raise TdbError("per-position edge scores need prompts of one token length; these have "
                           f"{sorted(g.ids.shape[1] for g in groups)}")
        s0 = groups[0].ids.shape[1]
        shape = ((s0,) if per_position else ()) + (graph.n_senders, graph.n_receivers)
        total = torch.zeros(shape, device=engine.device, dtype=torch.float32)
        res = EdgeScores(graph=graph, scores=total, method=method, reference=reference, metric_name=name,
                         n_pairs=len(pairs), per_position=per_position, ig=ig)
        mean_ref = mean_acts(engine, cache) if reference == "mean" and ig != "activations" else None
        mean_emb = mean_embedding(engine, cache) if reference == "mean" and ig == "inputs" else None
        m_sum = 0.0
        means_act = get_means(engine, sender_sites(engine), cache) if ig == "activations" and reference == "mean" \
            else None
        for group in groups:
            for i in range(0, len(group.index), batch_size):
                chunk = _slice(group, i, i + batch_size)
                per_pass = steps_per_pass or max(1, batch_size // len(chunk.index))  # rows ≤ batch_size
                if ig == "activations":
                    m_sum += _activations_chunk(engine, graph, chunk, res, means_act, steps, quadrature, norm,
                                                per_pass)
                else:
                    m_sum += _score_chunk(engine, graph, chunk, res, mean_ref, mean_emb, steps, quadrature, norm,
                                          per_pass, reuse_prefix)
        total /= len(pairs)
        total *= graph.valid.to(total.device)
        res.metric_clean = m_sum / len(pairs)
    return res


def _slice(g: PairGroup, a: int, b: int) -> PairGroup:
    return PairGroup(index=g.index[a:b], ids=g.ids[a:b], corrupted=None if g.corrupted is None else g.corrupted[a:b],
                     target=g.target[a:b], distractor=None if g.distractor is None else g.distractor[a:b])


def _activations_chunk(engine: Engine, graph: EdgeGraph, chunk: PairGroup, res: EdgeScores, mean_acts, steps: int,
                       quadrature: Quadrature, norm: NormMode, steps_per_pass: int) -> float:
    if mean_acts is None:
        with torch.no_grad():
            _, mean_acts = engine.run_with_cache(chunk.corrupted, sender_sites(engine), logit_positions=[-1],
                                                 logit_ids=[0])
        res.forward_passes += 1
    m, passes = ig_activations.score_chunk(engine, graph, chunk, mean_acts, steps, norm, res.scores, res.per_position,
                                           quadrature=quadrature, steps_per_pass=steps_per_pass)
    res.forward_passes += passes
    res.backward_passes += passes
    return m


def _score_chunk(engine: Engine, graph: EdgeGraph, chunk: PairGroup, res: EdgeScores, mean_ref: SenderActs | None,
                 mean_emb, steps: int, quadrature: Quadrature, norm: NormMode, steps_per_pass: int,
                 reuse_prefix: bool) -> float:
    """Add one chunk's EAP or EAP-IG-over-inputs scores into res.scores (EAP-IG: `steps` nodes
    of `quadrature`, the last the clean input). Returns the sum of the rows' clean metrics.
    Against the corrupted prompts the positions before the first that differs (in any row) are
    run by the corrupted run only, whose keys/values there the clean passes continue
    (capture.Prefix): those cover the positions after them only."""
    p, prefix = 0, None
    if mean_ref is None:
        ref, prefix = reference_run(engine, chunk.corrupted, shared_positions(chunk.ids, chunk.corrupted)
                                    if reuse_prefix else 0)
        res.forward_passes += 1
        if prefix is not None:
            p = prefix.offset
            chunk = _positions_from(chunk, p)
    else:
        ref = mean_ref
    if res.method == "eap":
        embeds, step_w = [None], None
    else:
        alphas, step_w = nodes(quadrature, steps)
        with torch.no_grad():
            e_clean = _embed(engine, chunk.ids)
            e_ref = _embed(engine, chunk.corrupted) if mean_emb is None else mean_emb.expand_as(e_clean)
            embeds = [e_ref + a * (e_clean - e_ref) for a in alphas[:-1]] + [e_clean]
    weights = block_weights(engine)
    grads, passes = receiver_grads(engine, chunk.ids, chunk.target, chunk.distractor, embeds, norm, steps_per_pass,
                                   weights, step_w, prefix)
    res.forward_passes += passes
    res.backward_passes += passes
    out = res.scores[p:] if res.per_position else res.scores  # per position: the shared prefix's stay 0
    contract(engine, graph, ref - grads.clean, grads, out, res.per_position, weights)
    return float(grads.metric.sum())


def _positions_from(g: PairGroup, p: int) -> PairGroup:
    """The pairs' positions p.. (those after a shared prefix of p)."""
    if p == 0:
        return g
    return PairGroup(index=g.index, ids=g.ids[:, p:], corrupted=g.corrupted[:, p:], target=g.target,
                     distractor=g.distractor)
