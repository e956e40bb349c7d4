"""Resources: `tdb://model`, `tdb://component/{id}` (a component's page), `tdb://circuits`
and `tdb://circuit/{name}`.

A component page reports only what is computed: the id's parts, the hook site it reads,
statistics of its weights, and whatever sections the workbench's page hooks add
(`Workbench.add_page_section`: explanations and top examples once those exist)."""

from __future__ import annotations

import json
import logging
from typing import Any

import networkx as nx
import torch
from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError
from pydantic import BaseModel, Field

from tdb_agent import ops
from tdb_agent.circuits.io import to_json
from tdb_agent.components import Component, hook_site, parse_component
from tdb_agent.errors import TdbError
from tdb_agent.workbench import Workbench

log = logging.getLogger(__name__)

RELATED_TOOLS = {
    "head": ["attention_pattern", "trace_upstream", "ablate", "patch", "steer"],
    "neuron": ["trace_upstream", "ablate", "patch", "steer"],
    "attn": ["ablate", "patch"],
    "mlp": ["ablate", "patch"],
    "emb": ["ablate", "patch"],
    "sae": ["ablate", "patch"],
    "logits": ["predict", "attribute"],
}


class TokenScore(BaseModel):
    token: str
    score: float


class WeightStats(BaseModel):
    """Statistics of the weights behind one component (no forward pass needed)."""

    matrix: str = Field(description="which weights, e.g. W_O[L1.H2] [d_head, d_model]")
    norm: float = Field(description="Frobenius norm")
    layer_mean_norm: float | None = Field(None, description="mean norm of the same matrix over the layer's units")
    rank_in_layer: int | None = Field(None, description="0 = the largest norm in its layer")
    units_in_layer: int | None = None
    bias_norm: float | None = None
    promotes: list[TokenScore] | None = Field(None, description="tokens whose logits the output direction "
                                              "raises most, through the final norm's gain and the unembedding "
                                              "(scores are up to the final norm's positive per-token scale)")
    suppresses: list[TokenScore] | None = None


class ComponentPage(BaseModel):
    id: str
    kind: str
    layer: int | None = None
    index: int | None = None
    position: int | None = Field(None, description="the @t suffix, if given (weights do not depend on it)")
    hook_site: str | None = None
    weights: list[WeightStats] = []
    related_tools: list[str] = []
    sections: dict[str, Any] = Field({}, description="explanation, top examples, ... as registered on the workbench")


def _norm(t: torch.Tensor | None) -> float | None:
    return None if t is None else float(t.detach().float().norm())


def _unit_stats(name: str, mats: torch.Tensor, index: int, bias: torch.Tensor | None = None) -> WeightStats:
    """Norm of unit `index` of `mats` [units, ...] and its rank among the layer's units."""
    norms = mats.detach().float().flatten(1).norm(dim=1)
    return WeightStats(matrix=f"{name} {list(mats.shape[1:])}", norm=float(norms[index]),
                       layer_mean_norm=float(norms.mean()), rank_in_layer=int((norms > norms[index]).sum()),
                       units_in_layer=norms.numel(), bias_norm=_norm(bias))


def _token_effects(bench: Workbench, direction: torch.Tensor, k: int = 8) -> tuple[list[TokenScore], list[TokenScore]]:
    """Logit effect of adding `direction` [d_model] to the final residual stream, through the
    final norm with its per-token scale frozen (so only its centring and gain apply)."""
    engine = bench.engine
    v = direction.detach().float()
    if engine.spec.norm == "layernorm":
        v = v - v.mean()
    gain = engine.param(engine.adapter.final_norm(), "weight")
    if gain is not None:
        v = v * gain.detach().float()
    logits = v @ engine.adapter.W_U().detach().float()
    k = min(k, logits.numel())
    top, bottom = logits.topk(k), (-logits).topk(k)
    tok = lambda i: engine.str_tokens([i])[0]  # noqa: E731
    return ([TokenScore(token=tok(i), score=round(float(s), 5)) for s, i in zip(top.values, top.indices.tolist())],
            [TokenScore(token=tok(i), score=round(-float(s), 5)) for s, i in zip(bottom.values,
                                                                                   bottom.indices.tolist())])


@torch.no_grad()
def weight_stats(bench: Workbench, c: Component) -> list[WeightStats]:
    a = bench.engine.adapter
    if c.kind == "head":
        return [_unit_stats(f"W_O[L{c.layer}.H{c.index}]", a.W_O(c.layer), c.index)]
    if c.kind == "neuron":
        stats = _unit_stats(f"W_out[L{c.layer}.N{c.index}]", a.W_out(c.layer), c.index)
        stats.promotes, stats.suppresses = _token_effects(bench, a.W_out(c.layer)[c.index])
        return [stats]
    if c.kind == "attn":
        w = a.W_O(c.layer)
        return [WeightStats(matrix=f"W_O[L{c.layer}] {list(w.shape)}", norm=_norm(w), bias_norm=_norm(a.b_O(c.layer)))]
    if c.kind == "mlp":
        w = a.W_out(c.layer)
        return [WeightStats(matrix=f"W_out[L{c.layer}] {list(w.shape)}", norm=_norm(w),
                            bias_norm=_norm(a.b_out(c.layer)))]
    if c.kind == "emb":
        out = []
        for site, mod in a.embed_modules().items():
            w = getattr(mod, "weight", None)
            if w is not None:
                rows = w.detach().float().norm(dim=1)
                out.append(WeightStats(matrix=f"{site} {list(w.shape)}", norm=_norm(w),
                                       layer_mean_norm=float(rows.mean())))
        return out
    if c.kind == "logits":
        w = a.W_U()
        return [WeightStats(matrix=f"W_U {list(w.shape)}", norm=_norm(w), bias_norm=_norm(a.b_U()))]
    if c.kind == "sae":
        sae = bench.engine.saes.get(c.layer, c.sae_site)
        name = f"L{c.layer}.{c.sae_site}.F{c.index}"
        dec = _unit_stats(f"W_dec[{name}]", sae.W_dec, c.index)
        dec.promotes, dec.suppresses = _token_effects(bench, sae.W_dec[c.index])
        return [dec, _unit_stats(f"W_enc[:, {name}]", sae.W_enc.T, c.index, bias=sae.b_enc[c.index:c.index + 1])]
    return []


def sae_sizes(bench: Workbench) -> dict[tuple[int, str], int]:
    saes = getattr(bench.engine, "saes", None)
    return saes.sizes() if saes is not None else {}


def component_page(bench: Workbench, text: str) -> ComponentPage:
    engine = bench.engine
    c = parse_component(text, engine.spec, sae_sizes=sae_sizes(bench))
    site = None
    if c.kind != "logits":
        s, unit = hook_site(c)
        site = s if unit is None else f"{s}[{unit}]"
    sections: dict[str, Any] = {}
    for name, fn in bench.page_sections.items():
        value = fn(c)
        if value is not None:
            sections[name] = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    return ComponentPage(id=c.id, kind=c.kind, layer=c.layer, index=c.index, position=c.position, hook_site=site,
                         weights=weight_stats(bench, c), related_tools=RELATED_TOOLS.get(c.kind, []),
                         sections=sections)


def circuit_json(bench: Workbench, name: str) -> str:
    circuits: dict[str, nx.DiGraph] = getattr(bench, "circuits", None) or {}
    graph = circuits.get(name)
    if graph is None:
        have = ", ".join(sorted(circuits)) or "none exist yet"
        raise ResourceNotFoundError(f"no circuit named {name!r}; circuits: {have}")
    return json.dumps(to_json(graph), default=str)


def register_resources(mcp: MCPServer, bench: Workbench) -> None:
    engine = bench.engine

    @mcp.resource("tdb://model", name="model", mime_type="application/json",
                  description="The loaded model (what the model_info tool returns): architecture, sizes, device, "
                              "component id grammar, SAEs and datasets.")
    def model() -> str:
        with engine.lock:
            return ops.model_info(engine, bench.dataset_names()).model_dump_json()

    @mcp.resource("tdb://component/{id}", name="component", mime_type="application/json",
                  description="A component's page: kind, layer, hook site, weight statistics (norms, rank in its "
                              "layer; for neurons the tokens its output weights promote and suppress), and "
                              "explanations and top examples where they exist. Example: tdb://component/L1.H2")
    def component(id: str) -> str:  # noqa: A002 (the URI variable's name)
        try:
            with engine.lock:
                return component_page(bench, id).model_dump_json()
        except TdbError as e:
            raise ResourceNotFoundError(str(e)) from e

    @mcp.resource("tdb://circuits", name="circuits", mime_type="application/json",
                  description="Names of the circuit hypotheses built in this session, with node and edge counts.")
    def circuits() -> str:
        graphs: dict[str, nx.DiGraph] = getattr(bench, "circuits", None) or {}
        return json.dumps({"circuits": [{"name": n, "nodes": g.number_of_nodes(), "edges": g.number_of_edges()}
                                        for n, g in sorted(graphs.items())]})

    @mcp.resource("tdb://circuit/{name}", name="circuit", mime_type="application/json",
                  description="A circuit hypothesis graph as networkx node-link JSON (nodes, links and the evidence "
                              "on each). Example: tdb://circuit/ioi")
    def circuit(name: str) -> str:
        try:
            return circuit_json(bench, name)
        except ResourceError:
            raise
        except Exception as e:  # a graph attribute that does not serialise
            log.exception("circuit %s could not be serialised", name)
            raise ResourceError(f"circuit {name!r} could not be serialised: {e}") from e
