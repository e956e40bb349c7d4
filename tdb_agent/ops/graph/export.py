"""Attribution graphs as JSON: the circuit-tracer / Neuronpedia graph format, and our ids.

{metadata, qParams, nodes[...], links[{source, target, weight}]}. Node ids follow
circuit-tracer's `{layer}_{feature}_{ctx_idx}` (layer "E" for embeddings, n_layers + 1 for
targets); error nodes use feature -1 (MLP error) or -2 (residual SAE error). Every node
also carries `tdb_id`, our component-style id: `L{l}.tc.F{i}@p` (transcoder feature),
`L{l}.resid.F{i}@p` (SAE latent), `ERR.L{l}.mlp@p` / `ERR.L{l}.resid@p`, `EMB@p`,
`LOGIT[{label}]`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tdb_agent.ops.graph.build import AttributionGraph
from tdb_agent.ops.graph.influence import Pruned, SquareGraph
from tdb_agent.ops.graph.query import col_tid

FORMAT = "tdb-attribution-graph/1"

# Neuronpedia's published graph schema (hijohnnylin/neuronpedia, apps/webapp/app/api/graph/
# graph-schema.json, JSON Schema draft-07), its required fields and their JSON types. Extra
# fields are allowed there (we add tdb_id, is_target_logit, token_prob, ...).
NUMBER, INTEGER, STRING, NULL = "number", "integer", "string", "null"
META_REQUIRED = {"slug": (STRING,), "scan": (STRING,), "prompt_tokens": ("array",), "prompt": (STRING,)}
META_OPTIONAL = {"node_threshold": (NUMBER,), "feature_details": ("object",), "info": ("object",),
                 "generation_settings": ("object",), "pruning_settings": ("object",)}
QPARAMS_OPTIONAL = {"pinnedIds": ("array",), "supernodes": ("array",), "linkType": (STRING,), "clickedId": (STRING,),
                    "sg_pos": (STRING,)}
NODE_REQUIRED = {"node_id": (STRING,), "feature": (INTEGER, NULL), "layer": (STRING, INTEGER), "ctx_idx": (INTEGER,),
                 "feature_type": (STRING,), "jsNodeId": (STRING,), "clerp": (STRING,)}
NODE_OPTIONAL = {"influence": (NUMBER, NULL), "activation": (NUMBER, NULL)}
LINK_REQUIRED = {"source": (STRING,), "target": (STRING,), "weight": (NUMBER,)}


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
    N = sq.N
    keep = pruned.node_mask if pruned is not None else torch.ones(N, dtype=torch.bool, device=sq.R.device)
    erows = pruned.edge_rows if pruned is not None else sq.R != 0
    rn = sq.row_nodes.to(sq.R.device)
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
    r, srcs = (erows & keep[rn][:, None] & keep[None, :]).nonzero(as_tuple=True)
    w, dst = sq.R[r, srcs].tolist(), rn[r]
    links = [{"source": ids[s], "target": ids[t], "weight": x} for s, t, x in zip(srcs.tolist(), dst.tolist(), w)]
    meta = {"slug": slug, "scan": scan, "transcoder_list": [], "prompt_tokens": graph.tokens, "prompt": graph.prompt,
            "schema_version": 1, "format": FORMAT, "mode": graph.mode}  # node_threshold: a number or absent
    if scores is not None:
        meta["replacement_score"], meta["completeness_score"] = scores
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": meta, "qParams": qparams, "nodes": nodes, "links": links}


def json_type(x: Any) -> str:
    """The JSON Schema type of a parsed JSON value ("integer" for whole numbers, as draft-07 has it)."""
    if x is None:
        return NULL
    if isinstance(x, bool):
        return "boolean"
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer()):
        return INTEGER
    return {float: NUMBER, str: STRING, list: "array", dict: "object"}.get(type(x), type(x).__name__)


def _check(obj: Any, where: str, required: dict, optional: dict | None = None) -> list[str]:
    """Problems of one object against its required and optional fields' JSON types."""
    if not isinstance(obj, dict):
        return [f"{where} is {json_type(obj)}, not an object"]
    problems = []
    for fields, needed in ((required, True), (optional or {}, False)):
        for f, types in fields.items():
            if f not in obj:
                if needed:
                    problems.append(f"{where} lacks {f!r}")
                continue
            got = json_type(obj[f])
            if got not in types and not (got == INTEGER and NUMBER in types):  # an integer is a number
                problems.append(f"{where} field {f!r} is {got}, not {' or '.join(types)}")
    return problems


def validate(d: Any) -> list[str]:
    """Problems with a graph JSON (empty list: valid): Neuronpedia's published graph schema
    (required fields and JSON types of metadata, qParams, nodes, links), then what its viewer
    needs beyond the schema: unique node ids, links between existing nodes with finite
    weights, string prompt tokens covering every ctx_idx."""
    problems = _check(d, "graph", {k: ("object",) for k in ("metadata", "qParams")}
                      | {k: ("array",) for k in ("nodes", "links")})
    if problems:
        return problems
    meta = d["metadata"]
    problems += _check(meta, "metadata", META_REQUIRED, META_OPTIONAL)
    problems += _check(d["qParams"], "qParams", {}, QPARAMS_OPTIONAL)
    tokens = meta.get("prompt_tokens") if isinstance(meta.get("prompt_tokens"), list) else []
    if not all(isinstance(x, str) for x in tokens):
        problems.append("metadata prompt_tokens are not all strings")
    pinned = d["qParams"].get("pinnedIds")
    if isinstance(pinned, list) and not all(isinstance(x, str) for x in pinned):
        problems.append("qParams pinnedIds are not all strings")
    seen = set()
    for i, n in enumerate(d["nodes"]):
        problems += _check(n, f"node {i}", NODE_REQUIRED, NODE_OPTIONAL)
        if not isinstance(n, dict):
            continue
        ctx = n.get("ctx_idx")
        if json_type(ctx) == INTEGER and not 0 <= ctx < max(len(tokens), 1):
            problems.append(f"node {i} ctx_idx {ctx} is outside the {len(tokens)} prompt tokens")
        if n.get("node_id") in seen:
            problems.append(f"duplicate node_id {n.get('node_id')!r}")
        seen.add(n.get("node_id"))
    for i, ln in enumerate(d["links"]):
        problems += _check(ln, f"link {i}", LINK_REQUIRED)
        if not isinstance(ln, dict):
            continue
        for f in ("source", "target"):
            if f in ln and ln[f] not in seen:
                problems.append(f"link {i} {f} {ln[f]!r} is not a node")
        w = ln.get("weight")
        if isinstance(w, float) and not math.isfinite(w):
            problems.append(f"link {i} weight {w!r} is not finite")
    return problems
