"""Attribution graphs as JSON: the circuit-tracer / Neuronpedia graph format, and our ids.

{metadata, qParams, nodes[...], links[{source, target, weight}]}. Node ids follow
circuit-tracer's `{layer}_{feature}_{ctx_idx}` (layer "E" for embeddings, n_layers + 1 for
targets); error nodes use feature -1 (MLP error) or -2 (residual SAE error). Every node
also carries `tdb_id`, our component-style id: `L{l}.tc.F{i}@p` (transcoder feature),
`L{l}.resid.F{i}@p` (SAE latent), `ERR.L{l}.mlp@p` / `ERR.L{l}.resid@p`, `EMB@p`,
`LOGIT[{label}]`.
"""

from __future__ import annotations

from typing import Any

import torch

from tdb_agent.ops.graph.build import AttributionGraph
from tdb_agent.ops.graph.influence import Pruned, SquareGraph
from tdb_agent.ops.graph.query import col_tid

FORMAT = "tdb-attribution-graph/1"
NODE_FIELDS = {"node_id": str, "feature": int, "layer": str, "ctx_idx": int, "feature_type": str, "jsNodeId": str,
               "clerp": str, "is_target_logit": bool, "token_prob": float, "influence": (float, type(None)),
               "activation": (float, type(None))}
FEATURE_TYPES = {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit", "sae latent",
                 "sae reconstruction error"}


def node_info(graph: AttributionGraph, sq: SquareGraph, k: int) -> dict[str, Any]:
    """The JSON node for square-graph node k."""
    src = graph.src
    n_layers = graph.rep.engine.spec.n_layers if graph.rep is not None else None
    n_src = len(sq.cols)
    if k >= n_src:
        j = k - n_src
        ln = graph.logits[j]
        layer = str((n_layers or 0) + 1)
        nid = f"{layer}_{ln.token_ids[0]}_{src.n_pos - 1}"
        return {"node_id": nid, "feature": ln.token_ids[0], "layer": layer, "ctx_idx": src.n_pos - 1,
                "feature_type": "logit", "is_target_logit": j == 0, "token_prob": float(ln.weight),
                "clerp": f"logit {ln.label!r}", "tdb_id": f"LOGIT[{ln.label}]", "activation": float(ln.value)}
    col = int(sq.cols[k])
    base = {"is_target_logit": False, "token_prob": 0.0}
    if col < src.n_feat:
        l, p, i = src.feat[col].tolist()
        kind = "tc" if graph.mode == "transcoders" else "resid"
        tid = col_tid(graph, col)
        return base | {"node_id": f"{l}_{i}_{p}", "feature": i, "layer": str(l), "ctx_idx": p,
                       "feature_type": "cross layer transcoder" if kind == "tc" else "sae latent", "clerp": tid,
                       "tdb_id": tid, "activation": float(src.feat_act[col])}
    if col < src.n_feat + src.n_err:
        site, l = src.err_keys[(col - src.n_feat) // src.n_pos]
        p = (col - src.n_feat) % src.n_pos
        tid = col_tid(graph, col)
        return base | {"node_id": f"{l}_{-1 if site == 'mlp' else -2}_{p}", "feature": -1 if site == "mlp" else -2,
                       "layer": str(l), "ctx_idx": p, "clerp": tid, "tdb_id": tid, "activation": None,
                       "feature_type": "mlp reconstruction error" if site == "mlp" else "sae reconstruction error"}
    p = col - src.n_feat - src.n_err
    return base | {"node_id": f"E_{int(graph.rep.clean.ids[0, p]) if graph.rep else p}_{p}", "feature": p,
                   "layer": "E", "ctx_idx": p, "feature_type": "embedding", "clerp": f"token {graph.tokens[p]!r}",
                   "tdb_id": col_tid(graph, col), "activation": None}


def to_json(graph: AttributionGraph, sq: SquareGraph, pruned: Pruned | None = None, slug: str = "graph",
            scan: str = "tdb-agent", scores: tuple[float, float] | None = None,
            explanations: dict[str, str] | None = None) -> dict[str, Any]:
    """The graph (pruned when `pruned` is given) in circuit-tracer / Neuronpedia JSON."""
    N = sq.A.shape[0]
    keep = pruned.node_mask if pruned is not None else torch.ones(N, dtype=torch.bool, device=sq.A.device)
    emask = pruned.edge_mask if pruned is not None else sq.A != 0
    infl = pruned.cumulative if pruned is not None else None
    nodes, ids = [], {}
    for k in keep.nonzero(as_tuple=True)[0].tolist():
        n = node_info(graph, sq, k)
        n["jsNodeId"] = n["node_id"]
        n["influence"] = None if infl is None else float(infl[k])
        if explanations and n["tdb_id"].split("@")[0] in explanations:
            n["clerp"] += ": " + explanations[n["tdb_id"].split("@")[0]]
        n |= {"run_idx": 0, "reverse_ctx_idx": 0}
        ids[k] = n["node_id"]
        nodes.append(n)
    dst, srcs = (emask & keep[:, None] & keep[None, :]).nonzero(as_tuple=True)
    w = sq.A[dst, srcs].tolist()
    links = [{"source": ids[s], "target": ids[t], "weight": x} for s, t, x in zip(srcs.tolist(), dst.tolist(), w)]
    meta = {"slug": slug, "scan": scan, "transcoder_list": [], "prompt_tokens": graph.tokens, "prompt": graph.prompt,
            "node_threshold": None, "schema_version": 1, "format": FORMAT, "mode": graph.mode}
    if scores is not None:
        meta["replacement_score"], meta["completeness_score"] = scores
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": meta, "qParams": qparams, "nodes": nodes, "links": links}


def validate(d: dict) -> list[str]:
    """Problems with a graph JSON against the fields Neuronpedia's graph viewer reads (empty
    list: valid): top-level keys, node fields and types, unique node ids, links between
    existing nodes with finite float weights, prompt tokens covering every ctx_idx."""
    problems = []
    for key in ("metadata", "qParams", "nodes", "links"):
        if key not in d:
            problems.append(f"missing top-level key {key!r}")
    if problems:
        return problems
    meta = d["metadata"]
    for key in ("slug", "scan", "prompt_tokens", "prompt"):
        if key not in meta:
            problems.append(f"metadata lacks {key!r}")
    n_tok = len(meta.get("prompt_tokens") or [])
    seen = set()
    for i, n in enumerate(d["nodes"]):
        for f, t in NODE_FIELDS.items():
            if f not in n:
                problems.append(f"node {i} lacks {f!r}")
            elif not isinstance(n[f], t) or (t is int and isinstance(n[f], bool)):
                problems.append(f"node {i} field {f!r} has type {type(n[f]).__name__}")
        if n.get("feature_type") not in FEATURE_TYPES:
            problems.append(f"node {i} has feature_type {n.get('feature_type')!r}")
        if isinstance(n.get("ctx_idx"), int) and not 0 <= n["ctx_idx"] < max(n_tok, 1):
            problems.append(f"node {i} ctx_idx {n['ctx_idx']} is outside the {n_tok} prompt tokens")
        if n.get("node_id") in seen:
            problems.append(f"duplicate node_id {n.get('node_id')!r}")
        seen.add(n.get("node_id"))
    for i, ln in enumerate(d["links"]):
        for f in ("source", "target"):
            if ln.get(f) not in seen:
                problems.append(f"link {i} {f} {ln.get(f)!r} is not a node")
        w = ln.get("weight")
        if not isinstance(w, float) or w != w or w in (float("inf"), float("-inf")):
            problems.append(f"link {i} weight {w!r} is not a finite float")
    return problems
