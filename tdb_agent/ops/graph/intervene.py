"""Interventions as the check of a graph: zero a set of feature nodes in the real model and
compare the measured change of the target with what the graph predicts.

Predictions (the graph is linear in the frozen model):
* direct: minus the features' edges into the target (every other node held);
* total: the change propagated through the expanded features' rows, each responding
  linearly to its pre-activation (slope 1 while active, the first-order response of ReLU,
  JumpReLU and TopK), errors and embeddings fixed.
Measurements, the features set to zero:
* replacement: the graph's own model run forward (attention patterns, norm scales and error
  terms frozen at their clean values, every dictionary feature recomputed from its input).
  It differs from `predicted_total` only where a downstream feature switches on or off
  (ReLU/JumpReLU threshold, TopK membership) or was not expanded in the graph;
* frozen: the real model with its dictionaries spliced (error terms recomputed: downstream
  MLPs are the real ones), attention patterns and norm scales frozen;
* free: the same with attention and norms free.
Frozen, a feature whose only path to the target is the residual stream (the last layer, the
last position) moves the target by exactly its predicted direct effect; the gap between
`measured_replacement` and `measured_frozen` is how differently the real MLPs respond from
their transcoders (the replacement model's own error), not an error of the graph.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field

from tdb_agent.components import Component
from tdb_agent.errors import TdbError
from tdb_agent.ops import sae_ops, transcoder_ops
from tdb_agent.ops.graph.build import AttributionGraph
from tdb_agent.ops.graph.frozen import freeze_hooks, module_hooks
from tdb_agent.ops.graph.query import col_tid


class InterventionCheck(BaseModel):
    nodes: list[str]
    target: str
    predicted_direct: float = Field(description="minus the nodes' direct edges into the target")
    predicted_total: float = Field(description="the change propagated linearly through the graph")
    measured_replacement: float = Field(description="the graph's own model: attention, norms and error terms frozen, "
                                                    "features recomputed")
    measured_frozen: float = Field(description="real model, attention patterns and norm scales frozen")
    measured: float = Field(description="real model, attention free")


def predict(graph: AttributionGraph, cols: list[int], row: int) -> tuple[float, float]:
    src = graph.src
    nf = src.n_feat
    act = src.feat_act.float()
    chosen = torch.zeros(nf, dtype=torch.bool, device=act.device)
    chosen[cols] = True
    # only the chosen and the expanded features ever change: the columns needed
    need = torch.unique(torch.cat([torch.as_tensor(cols, dtype=torch.long, device=act.device),
                                   graph.rows.to(act.device)]))
    M = graph.edges.select(need) / act[need].clamp(min=1e-12)  # ∂pre_t / ∂act_s
    direct = -float(graph.edges.row(row)[cols].sum())
    pos = torch.full((nf,), -1, dtype=torch.long, device=act.device)
    pos[need] = torch.arange(len(need), device=act.device)
    rows, ch = pos[graph.rows.to(act.device)], chosen[need]
    delta = torch.where(ch, -act[need], torch.zeros_like(act[need]))
    for _ in range(graph.rep.engine.spec.n_layers + 1):
        pre = M[: len(rows)] @ delta
        new = delta.clone()
        new[rows] = pre
        new[ch] = -act[need][ch]
        if torch.equal(new, delta):
            break
        delta = new
    return direct, float(M[row] @ delta)


def _components(graph: AttributionGraph, cols: list[int]) -> list[Component]:
    out = []
    for c in cols:
        l, p, i = graph.src.feat[c].tolist()
        if graph.mode == "transcoders":
            out.append(Component(kind="transcoder", layer=l, index=i, position=p))
        else:
            out.append(Component(kind="sae", layer=l, index=i, sae_site="resid", position=p))
    return out


def _clean_target(graph: AttributionGraph, row: int) -> float:
    """The target's value in the clean run (stored by the graph: no forward pass)."""
    ln = graph.logits[row - len(graph.rows)]
    logits = graph.rep.clean.logits
    return float(sum(cf * logits[t] for t, cf in zip(ln.token_ids, ln.coef)))


def _target_change(graph: AttributionGraph, row: int, hooks: dict, freeze: bool) -> float:
    """The target's value with `hooks` (and the clean attention patterns and norm scales when
    `freeze`), minus its clean value."""
    rep = graph.rep
    e = rep.engine
    ids = sorted({t for ln in graph.logits for t in ln.token_ids})
    ln = graph.logits[row - len(graph.rows)]
    norms = freeze_hooks(e, rep.clean, hooks) if freeze else []
    with module_hooks(norms):
        logits = e.forward(rep.clean.ids, hooks=hooks, logit_positions=[-1], logit_ids=ids).logits[0, -1]
    return float(sum(cf * logits[ids.index(t)] for t, cf in zip(ln.token_ids, ln.coef))) - _clean_target(graph, row)


@torch.no_grad()
def measure(graph: AttributionGraph, cols: list[int], row: int, freeze: bool) -> float:
    """Target after - target before, the features zeroed in the spliced real model."""
    e = graph.rep.engine
    comps = _components(graph, cols)
    if graph.mode == "transcoders":
        hooks = transcoder_ops.component_hooks(e, comps, "zero", None)
    else:
        hooks = sae_ops.sae_component_hooks(e, comps, "zero", None)
    return _target_change(graph, row, hooks, freeze)


def _zeroed(graph: AttributionGraph, cols: list[int]) -> dict[int, torch.Tensor]:
    """Per dictionary layer, a [s, n] mask of the features to zero."""
    src = graph.src
    masks: dict[int, torch.Tensor] = {}
    for c in cols:
        l, p, i = src.feat[c].tolist()
        d = graph.rep.dicts[l]
        m = masks.setdefault(l, torch.zeros(graph.n_pos, d.W_enc.shape[1], dtype=torch.bool, device=d.W_enc.device))
        m[p, i] = True
    return masks


@torch.no_grad()
def measure_replacement(graph: AttributionGraph, cols: list[int], row: int,
                        real_mlps: frozenset[int] = frozenset()) -> float:
    """Target after - target before in the graph's local replacement model run forward: each
    dictionary's features recomputed from its (changed) input, the chosen ones zeroed, and
    each written site = its clean value + the change of the feature writes (+ the skip term's
    change), so the clean error terms stay as they were.

    `real_mlps` (transcoder graphs): the MLPs of these layers are the real ones on their
    current input, plus the zeroed features' removal; with every layer real this is
    `measure(freeze=True)`. One layer at a time, it shows whose transcoder responds unlike
    its MLP where the real model and the graph disagree."""
    rep = graph.rep
    clean = rep.clean
    if real_mlps and graph.mode != "transcoders":
        raise TdbError("real_mlps needs a transcoder graph")
    masks = _zeroed(graph, cols)
    f_clean = {l: d.encode(clean.reads[l][None]) for l, d in rep.dicts.items()}
    feats, unmasked, inputs, hooks = {}, {}, {}, {}
    for l, d in rep.dicts.items():
        def read(x, _s, l=l, d=d):
            f = d.encode(x)
            feats[l] = f.masked_fill(masks[l], 0) if l in masks else f
            unmasked[l] = f
            inputs[l] = x
        hooks.setdefault(d.read, []).append(read)
    writes: dict[str, list[tuple[int, int]]] = {}  # written site -> (dictionary layer, its output index)
    for l, d in rep.dicts.items():
        for j in range(d.W_dec.shape[1]):
            site = f"blocks.{l + j}.hook_mlp_out" if d.write_site == "mlp" else f"blocks.{l}.hook_resid_post"
            writes.setdefault(site, []).append((l, j))
    for site, by in writes.items():
        o = int(site.split(".")[1])
        base = clean.mlp_out[o] if site.endswith("mlp_out") else clean.resid_post[o]

        def write(x, _s, by=by, o=o, base=base):
            if o in real_mlps:  # the real MLP's output, less the zeroed features' writes
                return (x.float() + sum((feats[l] - unmasked[l]).float() @ rep.dicts[l].W_dec[:, j].float()
                                        for l, j in by)).to(x.dtype)
            out = base[None].float()
            for l, j in by:
                out = out + (feats[l] - f_clean[l]).float() @ rep.dicts[l].W_dec[:, j].float()
            skip_now = rep.skip(o, inputs[o]) if o in inputs else None
            if skip_now is not None:
                out = out + (skip_now - rep.skip(o, clean.reads[o][None])).float()
            return out.to(x.dtype)
        hooks.setdefault(site, []).append(write)
    return _target_change(graph, row, hooks, freeze=True)


def check(graph: AttributionGraph, cols: list[int], row: int | None = None) -> InterventionCheck:
    """Zero the feature nodes `cols` (graph columns) and compare prediction and measurement
    on target row `row` (default: the first target)."""
    row = len(graph.rows) if row is None else row
    if row < len(graph.rows):
        raise TdbError("interventions are checked on a target (a logit row)")
    bad = [c for c in cols if not 0 <= c < graph.src.n_feat]
    if bad:
        raise TdbError(f"columns {bad} are not feature nodes")
    with graph.rep.engine.lock:
        direct, total = predict(graph, cols, row)
        replacement = measure_replacement(graph, cols, row)
        frozen = measure(graph, cols, row, True)
        free = measure(graph, cols, row, False)
    return InterventionCheck(nodes=[col_tid(graph, c) for c in cols], target=graph.logits[row - len(graph.rows)].label,
                             predicted_direct=direct, predicted_total=total,
                             measured_replacement=replacement, measured_frozen=frozen,
                             measured=free)
