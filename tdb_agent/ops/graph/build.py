"""Building an attribution graph: the adjacency of the local replacement model.

The weight of an edge s -> t is s's write (activation times decoder row, error vector,
embedding) dotted with the gradient of t's pre-activation at the site s writes to, in the
frozen model (ops/graph/frozen.py). Because that model is affine in its leaves, each
target's pre-activation equals the sum of its incoming edges plus its bias (its value with
every leaf at zero, computed by one more frozen forward), exactly.

Gradients come from batched backward passes: one frozen forward on B copies of the prompt,
then one backward per B targets (copy b carries target b), never one pass per edge.

Scale: the targets' rows come first, then features in order of their influence on the
targets estimated from the rows computed so far, up to `max_feature_nodes`; the other
features stay source-only nodes and their rows are never computed. Rows are stored sparsely
(ops/graph/sparse.py) and the memory is estimated before anything is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, Field

from tdb_agent.engine import Engine
from tdb_agent.errors import Cancelled, TdbError
from tdb_agent.ops.graph.frozen import Replacement
from tdb_agent.ops.graph.influence import row_influence
from tdb_agent.ops.graph.nodes import Sources, edge_block, find_sources
from tdb_agent.ops.graph.sparse import SparseRows


ESTIMATES = 16  # influence re-estimated about this many times while features are chosen


class GraphTarget(BaseModel):
    """What the graph explains: one token's logit, a logit difference, or the top logits."""

    kind: Literal["logit", "logit_diff", "top"] = "top"
    token: str | None = None
    distractor: str | None = None
    mass: float = Field(0.95, gt=0, le=1, description="top: probability mass the top logits cover")
    max_logits: int = Field(10, ge=1, description="top: at most this many logits")


@dataclass
class LogitNode:
    label: str
    token_ids: list[int]
    coef: list[float]  # the target is sum coef[i] * logit[token_ids[i]]
    weight: float  # its weight in influence (probability; 1 for a single logit or a difference)
    value: float


@dataclass
class AttributionGraph:
    """Nodes (features, errors, embeddings, targets) and the adjacency rows of the expanded
    nodes. Rows: `rows` (column indices of the expanded features) then the targets; columns:
    every source node (features, errors, embeddings). `edges` holds them sparsely;
    `adjacency` is the dense view, for small graphs."""

    prompt: str
    tokens: list[str]
    mode: str
    src: Sources
    logits: list[LogitNode]
    rows: torch.Tensor  # [n_rows_feat] column index of each expanded feature
    edges: SparseRows  # [n_rows_feat + n_logits, n_cols]
    bias: torch.Tensor  # [n_rows_feat + n_logits] each row node's value with every leaf at zero
    value: torch.Tensor  # [n_rows_feat + n_logits] clean pre-activation (features) or target value
    stats: dict = field(default_factory=dict)
    rep: Replacement | None = field(default=None, repr=False)  # the frozen model (attention splits)

    @property
    def n_pos(self) -> int:
        return self.src.n_pos

    @property
    def adjacency(self) -> torch.Tensor:
        """Dense [n_rows, n_cols] (refused for graphs too large to hold dense)."""
        return self.edges.to_dense()

    def row_of_feature(self, col: int) -> int | None:
        hit = (self.rows == col).nonzero()
        return int(hit[0, 0]) if len(hit) else None

    def completeness_residual(self) -> float:
        """max |sum of incoming edges + bias - value| over the rows (0 up to rounding)."""
        return float((self.edges.row_sums() + self.bias - self.value).abs().max()) if len(self.value) else 0.0


def resolve_targets(engine: Engine, logits: torch.Tensor, target: GraphTarget) -> list[LogitNode]:
    probs = torch.softmax(logits.float(), -1)
    if target.kind == "logit":
        if not target.token:
            raise TdbError("target kind 'logit' needs a token")
        t = engine.token_id(target.token)
        return [LogitNode(target.token, [t], [1.0], 1.0, float(logits[t]))]
    if target.kind == "logit_diff":
        if not (target.token and target.distractor):
            raise TdbError("target kind 'logit_diff' needs a token and a distractor")
        t, d = engine.token_id(target.token), engine.token_id(target.distractor)
        if t == d:
            raise TdbError(f"target and distractor are the same token ({target.token!r})")
        return [LogitNode(f"{target.token} - {target.distractor}", [t, d], [1.0, -1.0], 1.0,
                          float(logits[t] - logits[d]))]
    top = probs.topk(min(target.max_logits, probs.shape[0]))
    out, mass = [], 0.0
    for p, i in zip(top.values.tolist(), top.indices.tolist()):
        out.append(LogitNode(engine.tokenizer.decode([i]), [i], [1.0], p, float(logits[i])))
        mass += p
        if mass >= target.mass:
            break
    return out


def estimate_bytes(engine: Engine, n_pos: int, n_cols: int, n_rows: int, batch: int,
                   n_feat: int | None = None) -> dict[str, int]:
    """Peak memory of a build, by part (bytes): the frozen attention patterns (layers x heads
    x T^2), the stored rows (at most rows x columns entries of 8 bytes) with one dense block
    of `batch` rows, the frozen forward on `batch` copies with its gradients, and pruning
    (influence.square: the rows over the expanded features, errors, embeddings and targets,
    dense, with two working copies), which runs after the forward passes are freed."""
    sp = engine.spec
    size = torch.finfo(engine.dtype).bits // 8
    # kept patterns, and one layer's scores and softmax while they are captured
    patterns = sp.n_layers * sp.n_heads * n_pos * n_pos * size + 2 * sp.n_heads * n_pos * n_pos * 4
    rows = n_rows * n_cols * 8 + 3 * batch * n_cols * 4 + n_cols * 40  # + the sources' index
    # measured on GPT-2 small (CPU): about 9 d_model floats per copy, layer and position
    # (activations kept for the backward pass and the gradients); 12 leaves room
    forward = batch * sp.n_layers * n_pos * sp.d_model * 12 * 4
    other = n_cols - (n_feat if n_feat is not None else n_cols)  # error and embedding nodes
    pruning = 3 * n_rows * (n_rows + other) * 4
    return {"patterns": patterns, "rows": rows, "forward": forward, "pruning": pruning}


def peak_bytes(parts: dict[str, int]) -> int:
    """The forward passes and pruning do not overlap: the larger of the two counts."""
    return parts["patterns"] + parts["rows"] + max(parts["forward"], parts["pruning"])


def check_memory(engine: Engine, n_pos: int, n_feat: int, n_cols: int, n_rows: int, batch: int,
                 max_bytes: int) -> int:
    """The estimated peak; a TdbError saying what to lower when it is over `max_bytes`."""
    parts = estimate_bytes(engine, n_pos, n_cols, n_rows, batch, n_feat)
    need = peak_bytes(parts)
    if need > max_bytes:
        gib = {k: f"{v / 2**30:.1f} GiB" for k, v in parts.items()}
        raise TdbError(f"this graph needs about {need / 2**30:.1f} GiB (prompt of {n_pos} tokens, {n_feat} active "
                       f"features; frozen attention patterns {gib['patterns']}, adjacency rows {gib['rows']}, "
                       f"batched frozen forward {gib['forward']}, then pruning {gib['pruning']}); the limit is {max_bytes / 2**30:.1f} GiB: use "
                       f"a shorter prompt (patterns grow with its square), a smaller max_feature_nodes (rows; now "
                       f"{n_rows}) or a smaller batch (forward; now {batch})")
    return need


def _feature_pre(rep: Replacement, src: Sources, reads: dict, copies: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Pre-activation of feature `cols[k]` read in frozen-run copy `copies[k]`, vectorised per layer."""
    f = src.feat[cols]
    out = torch.zeros(len(cols), device=src.feat.device)
    for l in f[:, 0].unique().tolist():
        d = rep.dicts[l]
        m = f[:, 0] == l
        x = reads[l][copies[m], f[m, 1]]
        if d.in_offset is not None:
            x = x - d.in_offset
        out = out.index_put((m.nonzero(as_tuple=True)[0],), ((x * d.W_enc[:, f[m, 2]].T).sum(-1) + d.b_enc[f[m, 2]]).float())
    return out


def _logit_value(logits: torch.Tensor, copy: int, ln: LogitNode, logit_ids: list[int]) -> torch.Tensor:
    return sum(cf * logits[copy, logit_ids.index(t)] for t, cf in zip(ln.token_ids, ln.coef))


def _objective(rep: Replacement, src: Sources, reads: dict, logits: torch.Tensor, tgt: list, lnodes: list[LogitNode],
               logit_ids: list[int]) -> torch.Tensor:
    """Sum over copies b of copy b's target: a feature's pre-activation or a logit target."""
    total = logits.new_zeros(())
    for b, t in enumerate(tgt):
        if t[0] == "logit":
            total = total + _logit_value(logits, b, lnodes[t[1]], logit_ids)
    feats = [(b, t[1]) for b, t in enumerate(tgt) if t[0] == "feat"]
    if feats:
        dev = src.feat.device
        copies = torch.tensor([b for b, _ in feats], device=dev)
        total = total + _feature_pre(rep, src, reads, copies, torch.tensor([c for _, c in feats], device=dev)).sum()
    return total


def target_values(rep: Replacement, src: Sources, reads: dict, logits: torch.Tensor, feat_cols: torch.Tensor,
                  lnodes: list[LogitNode], logit_ids: list[int]) -> torch.Tensor:
    """Per target, its value in copy 0 of a frozen run (features' pre-activations, then logits)."""
    feats = _feature_pre(rep, src, reads, torch.zeros_like(feat_cols), feat_cols)
    tail = [_logit_value(logits, 0, ln, logit_ids).float().reshape(1) for ln in lnodes]
    return torch.cat([feats] + tail)


def build_graph(engine: Engine, prompt: str, target: GraphTarget | None = None, *, max_feature_nodes: int = 4096,
                batch_size: int = 32, skip_first: bool = True, max_bytes: int = 8 << 30,
                progress: Callable[[int, int], None] | None = None,
                should_stop: Callable[[], bool] | None = None) -> AttributionGraph:
    """The attribution graph of `prompt` for `target` (default: the top logits covering 95 %).

    max_feature_nodes caps the features whose incoming edges are computed (chosen in order of
    their influence on the target, estimated from the rows computed so far); the others stay
    source-only nodes. The memory needed is estimated first and a graph that would exceed
    `max_bytes` is refused with the estimate."""
    target = target or GraphTarget()
    with engine.lock:
        ids = engine.to_tokens(prompt)
        rep = Replacement(engine, ids)
        src = find_sources(rep, skip_first and ids.shape[1] > 1)
        lnodes = resolve_targets(engine, rep.clean.logits, target)
        logit_ids = sorted({t for ln in lnodes for t in ln.token_ids})
        n_exp = min(src.n_feat, max_feature_nodes)
        B = max(1, min(batch_size, n_exp + len(lnodes)))
        need = check_memory(engine, src.n_pos, src.n_feat, src.n_cols, n_exp + len(lnodes), B, max_bytes)
        names = rep.leaf_names()
        acc = SparseRows(src.n_cols, src.feat.device)
        with torch.enable_grad():
            leaves = {n: src.leaves[n].detach().unsqueeze(0).expand(B, -1, -1).clone().requires_grad_(True)
                      for n in names}
            logits, reads = rep.forward(leaves, B, logit_ids)
            tgts: list = []
            queue = [("logit", j) for j in range(len(lnodes))]
            expanded: list[int] = []
            done, passes, total = 0, 0, n_exp + len(lnodes)
            chosen = torch.zeros(src.n_feat, dtype=torch.bool, device=src.feat.device)
            while True:
                if not queue:
                    if len(expanded) >= n_exp:
                        break
                    # several batches per estimate: it costs a pass over every stored edge
                    k = min(n_exp - len(expanded), max(B, n_exp // ESTIMATES))
                    queue = _next_features(src, acc, tgts, lnodes, chosen, k)
                    if not queue:
                        break
                chunk, queue = queue[:B], queue[B:]
                if should_stop is not None and should_stop():
                    raise Cancelled(f"graph build cancelled after {done} of {total} rows")
                obj = _objective(rep, src, reads, logits, chunk, lnodes, logit_ids)
                grads = torch.autograd.grad(obj, [leaves[n] for n in names], retain_graph=True, allow_unused=True)
                acc.append(edge_block(rep, src, dict(zip(names, grads)), len(chunk)))
                del grads
                tgts += chunk
                expanded += [t[1] for t in chunk if t[0] == "feat"]
                done += len(chunk)
                passes += 1
                if progress is not None:
                    progress(done, total)
            del logits, reads, leaves
        # reorder rows: expanded features (in the order chosen), then the targets
        order = [k for k, t in enumerate(tgts) if t[0] == "feat"] + [k for k, t in enumerate(tgts) if t[0] == "logit"]
        edges = acc.take_rows(torch.tensor(order, dtype=torch.long))
        dev = src.feat.device
        feat_cols = torch.tensor(expanded, dtype=torch.long, device=dev)
        with torch.no_grad():
            zero = {n: torch.zeros_like(src.leaves[n]).unsqueeze(0) for n in names}
            zl, zr = rep.forward(zero, 1, logit_ids)
            bias = target_values(rep, src, zr, zl, feat_cols, lnodes, logit_ids)
        value = torch.cat([src.feat_pre[feat_cols].float(), torch.tensor([ln.value for ln in lnodes], device=dev)])
        g = AttributionGraph(prompt=prompt, tokens=engine.str_tokens(ids), mode=rep.mode, src=src, logits=lnodes,
                             rows=feat_cols, edges=edges, bias=bias.to(dev), value=value, rep=rep)
        g.stats = {"active_features": src.n_feat, "expanded_features": len(expanded), "batch": B,
                   "backward_passes": passes, "estimated_bytes": need, "stored_edges": edges.nnz,
                   "edge_bytes": edges.nbytes, "completeness_residual": g.completeness_residual()}
        return g


def _next_features(src: Sources, acc: SparseRows, tgts: list, lnodes: list[LogitNode], chosen: torch.Tensor,
                   k: int) -> list:
    """The k not-yet-expanded features of highest influence on the targets, estimated on the
    rows computed so far (influence flows back through expanded features only)."""
    dev = src.feat.device
    weights = torch.tensor([lnodes[t[1]].weight if t[0] == "logit" else 0.0 for t in tgts], device=dev)
    row_cols = torch.tensor([t[1] if t[0] == "feat" else -1 for t in tgts], dtype=torch.long, device=dev)
    score = row_influence(acc, row_cols, weights)[: src.n_feat].clone()
    score[chosen] = -1
    top = score.topk(min(k, int((~chosen).sum()))).indices
    chosen[top] = True
    return [("feat", int(i)) for i in top.tolist()]
