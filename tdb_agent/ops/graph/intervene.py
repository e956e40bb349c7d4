"""Interventions as the check of a graph: zero a set of feature nodes in the real model and
compare the measured change of the target with what the graph predicts.

Predictions (the graph is linear in the frozen model):
* direct: minus the features' edges into the target (every other node held);
* total: the change propagated through the expanded features' rows, each responding
  linearly to its pre-activation (slope 1 while active, the first-order response of ReLU,
  JumpReLU and TopK), errors and embeddings fixed.
Measurements: the model with its dictionaries spliced (error terms kept: downstream MLPs are
the real ones) and the features set to zero, either frozen (attention patterns and norm
scales at their clean values, as in the graph) or free. Frozen, a feature whose only path to
the target is the residual stream (the last layer, the last position) moves the target by
exactly its predicted direct effect; the rest of the gap is the response of the real MLPs.
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


@torch.no_grad()
def measure(graph: AttributionGraph, cols: list[int], row: int, freeze: bool) -> float:
    """Target after - target before, the features zeroed in the spliced real model."""
    rep = graph.rep
    e = rep.engine
    comps = _components(graph, cols)
    ids = sorted({t for ln in graph.logits for t in ln.token_ids})
    ln = graph.logits[row - len(graph.rows)]

    def value(hooks):
        norms = freeze_hooks(e, rep.clean, hooks) if freeze else []
        with module_hooks(norms):
            logits = e.forward(rep.clean.ids, hooks=hooks, logit_positions=[-1], logit_ids=ids).logits[0, -1]
        return float(sum(cf * logits[ids.index(t)] for t, cf in zip(ln.token_ids, ln.coef)))

    if graph.mode == "transcoders":
        hooks = transcoder_ops.component_hooks(e, comps, "zero", None)
    else:
        hooks = sae_ops.sae_component_hooks(e, comps, "zero", None)
    return value(hooks) - value({})


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
        frozen = measure(graph, cols, row, True)
        free = measure(graph, cols, row, False)
    return InterventionCheck(nodes=[col_tid(graph, c) for c in cols], target=graph.logits[row - len(graph.rows)].label,
                             predicted_direct=direct, predicted_total=total, measured_frozen=frozen,
                             measured=free)
