"""Upstream tracing (Transformer Debugger's "upstream node to trace").

The backward pass starts at a node instead of the metric:

* an MLP neuron `L{l}.N{n}@t` or a transcoder feature `L{l}.tc.F{i}@t`: its pre-activation
  (the feature's: MLP input · W_enc[:, i] + b_enc[i]), traced to the writes into the
  residual stream feeding the MLP (via `direct`);
* a head `L{l}.H{h}@q` with `via=q` / `via=k`: its attention score from query q to one key
  position, traced through the query side (keys held fixed) or the key side (queries fixed);
  `via=qk` traces both sides (`all` is its old name, still accepted; it never included v);
* a head with `via=v`: its direct effect on the metric, traced through its values with the
  attention pattern held fixed (to every key position).

The norm feeding the node runs with its scale frozen, so the node is affine in the
residual stream: edge weights (gradient · upstream write) plus the bias terms sum exactly
to gradient · residual, and the node value is that plus `unattributed` (reported).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, Field

from tdb_agent.components import Component, hook_site, parse_component
from tdb_agent.engine import Engine, StopForward
from tdb_agent.errors import TdbError
from tdb_agent.ops.attribute import final_gradient
from tdb_agent.ops.decompose import Decomposition, decompose, frozen_norms, write_factor
from tdb_agent.ops.metrics import make_metric
from tdb_agent.ops.runs import CleanRun, RunCache, get_run
from tdb_agent.ops import sae_ops

Via = Literal["q", "k", "v", "qk", "all"]  # "all": old name of "qk" (query and key sides; v is separate)


class Edge(BaseModel):
    source: str
    target: str
    weight: float
    via: Literal["q", "k", "v", "direct"]


class TraceResult(BaseModel):
    prompt: str
    node: str
    via: str
    value: float = Field(description="the traced quantity: a neuron's pre-activation, a head's attention "
                                     "score (via q/k), or its direct effect on the metric (via v)")
    query_position: int | None = None
    key_position: int | None = None
    edges: list[Edge] = Field(description="upstream component (with @position) -> node, ranked by |weight|")
    n_edges: int
    sum_of_edges: dict[str, float] = Field(description="sum of all edge weights, per via")
    unattributed: dict[str, float] = Field(description="bias terms and what the frozen norm adds; edges + "
                                                        "these = value")


def _leaf_grad(engine: Engine, run: CleanRun, layer: int, leaf_site: str, read_site: str, value_fn,
               detach: list[str], norms: list[torch.nn.Module]) -> tuple[torch.Tensor, float]:
    """Gradient of value_fn(activation at read_site) w.r.t. the residual stream at leaf_site
    (a fresh leaf replacing the clean value), running from block `layer` only."""
    leaf_box: dict[str, torch.Tensor] = {}
    value_box: dict[str, torch.Tensor] = {}

    def make_leaf(x, site):
        leaf = x.detach().clone().requires_grad_(True)
        leaf_box["x"] = leaf
        return leaf

    def read(x, site):
        value_box["v"] = value_fn(x)
        raise StopForward

    hooks = {leaf_site: [make_leaf], read_site: [read]}
    for s in detach:
        hooks.setdefault(s, []).insert(0, lambda x, site: x.detach())
    with torch.enable_grad(), frozen_norms(engine, norms):
        engine.forward(run.ids, hooks=hooks, start_layer=layer,
                       resid=run.acts[f"blocks.{layer}.hook_resid_pre"].detach())
        value = value_box["v"]
        (g,) = torch.autograd.grad(value, leaf_box["x"])
    return g[0].to(engine.device), value.item()  # [s, d], on the home device (device maps)


def _edges(engine: Engine, d: Decomposition, positions: list[int], target: str, via: str,
           attn_layers: int, mlp_layers: int) -> list[Edge]:
    spec = engine.spec
    edges = []
    for i, p in enumerate(positions):
        for layer in range(attn_layers):
            for h in range(spec.n_heads):
                edges.append((d.heads[i, layer, h], f"L{layer}.H{h}@{p}"))
        for layer in range(mlp_layers):
            vals = d.neurons[i, layer]
            # neurons: keep the strongest few per layer and position (the rest are ranked out anyway)
            k = min(64, vals.numel())
            for idx in vals.abs().topk(k).indices.tolist():
                edges.append((vals[idx], f"L{layer}.N{idx}@{p}"))
        edges.append((d.emb[i], f"EMB@{p}"))
    return [Edge(source=src, target=target, weight=w.item(), via=via) for w, src in edges]


def trace_upstream(engine: Engine, prompt: str, component: str, via: Via = "qk",
                   key_position: int | None = None, target: str | None = None, distractor: str | None = None,
                   top_k: int | None = 20, cache: RunCache | None = None) -> TraceResult:
    """Attribute a head's attention score or effect, or a neuron's pre-activation, to upstream components.

    Edge weights are gradient x upstream write with the feeding norm's scale frozen, so
    edges + unattributed terms add up to the traced value.

    Args:
        prompt: the text to run.
        component: a head with its query position (L2.H5@14), a neuron (L1.N7@9), an SAE
            latent or a transcoder feature (L1.tc.F3@9); without @t the last position.
        via: for heads: "q" / "k" trace the attention score from the query to key_position
            through the query side (keys fixed) / the key side (queries fixed); "qk" traces
            both ("all" is its old name, an alias: query and key sides only); "v" traces the
            head's direct effect on the metric through its values (pattern fixed, every key
            position). Ignored for neurons (edges have via "direct").
        key_position: for via q/k/qk: the key position of the score (default: the most
            attended one; at most the query position).
        target: for via "v": the single token of the metric (required there).
        distractor: for via "v": optional single token; with it the metric is logit_diff
            (logit[target] - logit[distractor] at the last position), without it logprob.
        top_k: how many edges to return, ranked by |weight| (None: all).

    Returns:
        TraceResult: the node id, the traced value, query and key positions, edges (source with
        @position, target, weight, via q/k/v/direct), n_edges before top_k, sum_of_edges per
        via and the unattributed terms (biases, frozen-norm and other-side terms).
    """
    if via == "all":
        via = "qk"
    with engine.lock:
        run = get_run(engine, prompt, cache)
        s = run.n_tokens
        node = parse_component(component, engine.spec, n_positions=s, sae_sizes=sae_ops.sae_sizes(engine))
        if node.kind == "sae":
            return _trace_latent(engine, run, node, top_k)
        if node.kind in ("neuron", "transcoder"):
            return _trace_neuron(engine, run, node, top_k)
        if node.kind == "head":
            return _trace_head(engine, run, node, via, key_position, target, distractor, top_k)
    raise TdbError(f"trace_upstream starts at a neuron (L{{l}}.N{{n}}@t), a head (L{{l}}.H{{h}}@q), an SAE latent "
                   f"or a transcoder feature (L{{l}}.tc.F{{i}}@t), not {node.id}")


def _finish(prompt, node_id, via, value, edges, sums, unattributed, top_k, q=None, k=None) -> TraceResult:
    n = len(edges)
    edges.sort(key=lambda e: -abs(e.weight))
    return TraceResult(prompt=prompt, node=node_id, via=via, value=value, query_position=q, key_position=k,
                       edges=edges if top_k is None else edges[:top_k], n_edges=n, sum_of_edges=sums,
                       unattributed=unattributed)


def _trace_neuron(engine: Engine, run: CleanRun, node: Component, top_k) -> TraceResult:
    """A neuron's pre-activation, or a transcoder feature's (read from its transcoder's input
    site, the MLP input: the same residual stream and frozen norm feed it)."""
    layer, n = node.layer, node.index
    t = run.n_tokens - 1 if node.position is None else node.position
    parallel = engine.spec.parallel_residual
    leaf_site = f"blocks.{layer}.hook_resid_pre" if parallel else f"blocks.{layer}.hook_resid_mid"
    if node.kind == "transcoder":
        tcs = engine.transcoders
        tc = tcs.get(layer)
        read_site = tcs.read_hook(layer)
        value_fn = lambda x: x[0, t].to(tc.W_enc.dtype) @ tc.W_enc[:, n] + tc.b_enc[n]  # noqa: E731
        target = f"L{layer}.tc.F{n}@{t}"
    else:
        read_site, value_fn, target = f"blocks.{layer}.mlp.hook_pre", lambda x: x[0, t, n], f"L{layer}.N{n}@{t}"
    g, value = _leaf_grad(engine, run, layer, leaf_site, read_site, value_fn, [], [engine.adapter.ln2(layer)])
    attn_layers = layer if parallel else layer + 1
    d = decompose(engine, run, [t], g[t][None], attn_layers, layer, per_position=True)
    edges = _edges(engine, d, [t], target, "direct", attn_layers, layer)
    total = (d.heads.sum() + d.neurons.sum() + d.emb.sum()).item()
    read = (run.acts[leaf_site][0, t].float() * g[t].float()).sum().item()
    unattributed = {"attn_output_biases": d.attn_bias.sum().item(), "mlp_output_biases": d.mlp_bias.sum().item(),
                    "norm_bias_and_input_bias": value - read}
    return _finish(run.prompt, target, "direct", value, edges, {"direct": total}, unattributed, top_k, q=t)


def _trace_head(engine: Engine, run: CleanRun, node: Component, via: Via, key_position, target, distractor,
                top_k) -> TraceResult:
    layer, h = node.layer, node.index
    s = run.n_tokens
    q = s - 1 if node.position is None else node.position
    p = f"blocks.{layer}.attn."
    leaf_site = f"blocks.{layer}.hook_resid_pre"
    ln1 = engine.adapter.ln1(layer)
    node_id = f"L{layer}.H{h}@{q}"
    edges: list[Edge] = []
    sums: dict[str, float] = {}
    unattributed: dict[str, float] = {}
    value = 0.0
    k_pos = None
    if via in ("q", "k", "qk"):
        if key_position is None:
            _, acts = engine.run_with_cache(run.ids, [p + "hook_pattern"], start_layer=layer,
                                            resid=run.acts[leaf_site], stop_layer=layer + 1)
            k_pos = int(acts[p + "hook_pattern"][0, h, q].argmax().item())
        else:
            k_pos = int(key_position)
            if not 0 <= k_pos <= q:
                raise TdbError(f"key_position {k_pos} must be between 0 and the query position {q} (causal)")
        for side in (["q", "k"] if via == "qk" else [via]):
            frozen = p + ("hook_k" if side == "q" else "hook_q")
            g, value = _leaf_grad(engine, run, layer, leaf_site, p + "hook_attn_scores",
                                  lambda x: x[0, h, q, k_pos], [frozen], [ln1])
            pos = q if side == "q" else k_pos
            d = decompose(engine, run, [pos], g[pos][None], layer, layer, per_position=True)
            edges += _edges(engine, d, [pos], node_id, side, layer, layer)
            sums[side] = (d.heads.sum() + d.neurons.sum() + d.emb.sum()).item()
            read = (run.acts[leaf_site][0, pos].float() * g[pos].float()).sum().item()
            unattributed[f"{side}_output_biases"] = (d.attn_bias.sum() + d.mlp_bias.sum()).item()
            unattributed[f"{side}_norm_bias_qk_bias_and_other_side"] = value - read
    if via == "v":
        if not target:
            raise TdbError("via='v' traces the head's direct effect on the metric: give target (and distractor)")
        metric = make_metric(engine, target, distractor)
        g_final, _ = final_gradient(engine, run, metric)
        W_O = engine.adapter.W_O(layer)[h].float()  # [d_head, d_model]
        f = write_factor(engine, run, "attn", layer, [q])  # the frozen post-norm, if any
        direction = W_O @ (g_final if f is None else g_final * f[0])  # [d_head]
        g, value = _leaf_grad(engine, run, layer, leaf_site, p + "hook_z",
                              lambda x: x[0, q, h].float() @ direction.to(x.device), [p + "hook_q", p + "hook_k"],
                              [ln1])
        positions = list(range(q + 1))
        d = decompose(engine, run, positions, g[: q + 1], layer, layer, per_position=True)
        edges += _edges(engine, d, positions, node_id, "v", layer, layer)
        sums["v"] = (d.heads.sum() + d.neurons.sum() + d.emb.sum()).item()
        read = (run.acts[leaf_site][0, : q + 1].float() * g[: q + 1].float()).sum().item()
        unattributed["v_output_biases"] = (d.attn_bias.sum() + d.mlp_bias.sum()).item()
        unattributed["v_norm_bias_and_v_bias"] = value - read
    elif via not in ("q", "k", "qk"):
        raise TdbError(f"unknown via {via!r}; via is q, k, qk (both; old name all) or v")
    return _finish(run.prompt, node_id, via, value, edges, sums, unattributed, top_k, q=q, k=k_pos)


def _trace_latent(engine: Engine, run: CleanRun, c: Component, top_k: int | None) -> TraceResult:
    """Trace a latent's pre-activation at position t, (x_t − b_dec) · W_enc[:, i] + b_enc[i],
    to the upstream writes that make up x_t (resid: every head, neuron and the embedding
    below; mlp/attn: the neurons/heads of that block). Edges + biases + constant = value."""
    sae = sae_ops.sae_for(engine, c)
    L = c.layer
    t = run.n_tokens - 1 if c.position is None else c.position
    x = run.acts[hook_site(c)[0]][0, t]
    w = sae.W_enc[:, c.index]
    with torch.no_grad():
        value = sae.pre_acts(x)[c.index].item()
        b_dec_term = (sae.b_dec @ w).item() if sae.cfg.apply_b_dec_to_input else 0.0
        d = decompose(engine, run, [t], w.to(engine.dtype)[None], L + 1, L + 1, per_position=True)
    first = 0 if c.sae_site == "resid" else L
    node = f"L{L}.{c.sae_site}.F{c.index}@{t}"
    pairs: list[tuple[torch.Tensor, str]] = []
    total = torch.zeros((), device=w.device)
    bias = torch.zeros((), device=w.device)
    if c.sae_site in ("resid", "attn"):
        for layer in range(first, L + 1):
            pairs += [(d.heads[0, layer, h], f"L{layer}.H{h}@{t}") for h in range(engine.spec.n_heads)]
            total = total + d.heads[0, layer].sum()
            bias = bias + d.attn_bias[0, layer]
    if c.sae_site in ("resid", "mlp"):
        for layer in range(first, L + 1):
            vals = d.neurons[0, layer]
            pairs += [(vals[i], f"L{layer}.N{i}@{t}") for i in vals.abs().topk(min(64, vals.numel())).indices.tolist()]
            total = total + vals.sum()
            bias = bias + d.mlp_bias[0, layer]
    if c.sae_site == "resid":
        pairs.append((d.emb[0], f"EMB@{t}"))
        total = total + d.emb[0]
    edges = [Edge(source=src, target=node, weight=v.item(), via="direct") for v, src in pairs]
    read = total.item() + bias.item()
    unattributed = {"output_biases": bias.item(), "sae_b_enc_minus_b_dec_term": sae.b_enc[c.index].item() - b_dec_term,
                    "rounding": value - read - (sae.b_enc[c.index].item() - b_dec_term)}
    return _finish(run.prompt, node, "direct", value, edges, {"direct": total.item()}, unattributed, top_k, q=t)
