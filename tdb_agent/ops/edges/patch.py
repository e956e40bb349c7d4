"""Exact edge patching: the model run with a set of edges kept and every other edge removed.

Removing edge u → r means receiver r alone reads sender u's reference value (the corrupted
prompt's, or the corpus mean) instead of u's value in this run; every other receiver still
reads u as it is. Receiver r's input is rebuilt as

    x_r = x + Σ_{u removed for r} (ref_u − a_u)

where x is the residual stream this run gives (the sum of every sender's value in this run,
plus biases) and a_u is u's value in this run (as in ACDC and MIB: kept edges carry the
sender's value in the patched run, so upstream removals propagate). Keeping every edge is the
clean run; keeping none is the reference run, exactly.

The engine's own modules run; hooks rebuild each head's q, k and v with a removed edge (at
the hook sites, from its own copy of the stream: heads.head_read), each MLP's input and the
final residual stream. Rows of one pass are (edge set, prompt pair) combinations. Through a
post-norm (Gemma-2/3, OLMo-2) a head's value in a run is its share of the block's write in
that run (capture.head_outputs), so every run's senders still sum to its residual stream.
"""

from __future__ import annotations

import torch

from tdb_agent.engine import Engine
from tdb_agent.engine.component_sites import kind_site, receiver_site, resid_site
from tdb_agent.ops.edges.capture import PairGroup, head_outputs, metric_rows
from tdb_agent.ops.edges.graph import EdgeGraph
from tdb_agent.ops.edges.heads import head_read, layer_rotary, read_norm, rotary_block_tables


def _delta(D: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """Σ_u removed[.., u, r] · D[b, s, u, d] -> [b, s, r, d] (removed [b, U, R] or [b, s, U, R])."""
    eq = "bsud,bsur->bsrd" if removed.dim() == 4 else "bsud,bur->bsrd"
    return torch.einsum(eq, D, removed.to(D.dtype))


def patched_rows(engine: Engine, graph: EdgeGraph, ids: torch.Tensor, ref: torch.Tensor, removed: torch.Tensor,
                 target: torch.Tensor, distractor: torch.Tensor | None) -> torch.Tensor:
    """Metric per row of `ids` [b, s] with `removed` [b, (s,) U, R] edges reading `ref`
    ([b, s, U, d] or [U, d]) instead of the run's sender values."""
    spec, a = engine.spec, engine.adapter
    H, KV = spec.n_heads, spec.n_kv_heads
    run: list[torch.Tensor] = []  # this run's sender values so far, each [b, s, k, d]
    state: dict[str, torch.Tensor] = {}

    def D(n_up: int) -> torch.Tensor:
        have = torch.cat(run, dim=2)[:, :, :n_up]
        r = ref[..., :n_up, :]
        return r - have

    def rs(l: int, kind: str) -> slice:
        st = graph.layer_receivers(l).start
        off = {"q": (0, H), "k": (H, H + KV), "v": (H + KV, H + 2 * KV), "mlp": (H + 2 * KV, H + 2 * KV + 1)}[kind]
        return slice(st + off[0], st + off[1])

    def mask(sl: slice, n_up: int) -> torch.Tensor:
        return removed[..., :n_up, sl]

    def resid_pre(l):
        def fn(x, site):
            state["x"] = x
            if l == 0:
                run.append(x.unsqueeze(2))
                state["kw"] = rotary_block_tables(engine, x)
            state["rot"] = layer_rotary(engine, l, state["kw"], x.dtype)
        return fn

    def head_inputs(l):
        """(each q, k and v receiver's own stream [b, s, H + 2KV, d], which of them have a
        removed edge [b, (s,) H + 2KV]), None when none has; computed once per block."""
        key = f"xs{l}"
        if key not in state:
            sl = graph.layer_receivers(l)
            heads = slice(sl.start, sl.stop - 1)
            n_up = graph.n_upstream[sl.start]
            m = mask(heads, n_up)
            hit = m.any(-2)
            state[key] = (state["x"].unsqueeze(2) + _delta(D(n_up), m), hit) if hit.any() else None
        return state[key]

    def qkv(l, kind, i):
        def fn(t, site):
            got = head_inputs(l)
            if got is None:
                return None
            xs, hit = got
            st = graph.layer_receivers(l).start
            part = slice(rs(l, kind).start - st, rs(l, kind).stop - st)
            new = head_read(engine, l, i, state["x"], xs[:, :, part], t, state["rot"])
            hit = hit[..., part]
            hit = hit[:, None, :, None] if hit.dim() == 2 else hit[..., None]
            return torch.where(hit, new, t)  # receivers without a removed edge keep the run's value
        return fn

    def z_out(l):
        def fn(z, site):
            run.append(head_outputs(engine, l, z))
        return fn

    def mid(x, site):
        state["mid"] = x

    def mlp_in(l):
        def fn(h, site):
            n_up = graph.n_upstream[rs(l, "mlp").start]
            m = mask(rs(l, "mlp"), n_up)
            if not m.any():
                return None
            x = state["x"] if spec.parallel_residual else state["mid"]
            return read_norm(engine, a.ln2(l), x + _delta(D(n_up), m)[:, :, 0]).to(h.dtype)
        return fn

    def mlp_out(x, site):
        run.append(x.unsqueeze(2))

    def final(x, site):
        m = removed[..., :, -1:]
        if not m.any():
            return None
        return x + _delta(D(graph.n_senders), m)[:, :, 0]

    hooks: dict[str, list] = {"hook_resid_final": [final]}
    for l in range(spec.n_layers):
        hooks[resid_site("pre", l)] = [resid_pre(l)]
        for i, kind in enumerate("qkv"):
            hooks[receiver_site(kind, l)] = [qkv(l, kind, i)]
        hooks[kind_site("head", l)] = [z_out(l)]
        if not spec.parallel_residual:
            hooks[resid_site("mid", l)] = [mid]
        hooks[receiver_site("mlp", l)] = [mlp_in(l)]
        hooks[kind_site("mlp", l)] = [mlp_out]
    with torch.no_grad():
        logits = engine.forward(ids, hooks=hooks, logit_positions=[-1]).logits[:, -1]
    return metric_rows(logits, target, distractor)


def patched_metrics(engine: Engine, graph: EdgeGraph, group: PairGroup, ref: torch.Tensor, keeps: torch.Tensor,
                    batch_size: int = 64) -> tuple[torch.Tensor, int]:
    """Metric [n_sets, n_pairs] of the group's pairs with only `keeps` [n_sets, (s,) U, R] kept.

    ref: the group's corrupted sender values [n, s, U, d] or means [U, d]. Returns the metrics
    and the number of forward passes."""
    n = group.ids.shape[0]
    rows = [(k, j) for k in range(keeps.shape[0]) for j in range(n)]
    out = torch.empty(keeps.shape[0], n, device=engine.device)
    passes = 0
    valid = graph.valid.to(keeps.device)
    for r0 in range(0, len(rows), max(1, batch_size)):
        chunk = rows[r0:r0 + batch_size]
        ks = torch.tensor([k for k, _ in chunk], device=keeps.device)
        js = torch.tensor([j for _, j in chunk], device=group.ids.device)
        removed = ~keeps[ks] & valid
        r = ref[js] if ref.dim() == 4 else ref
        m = patched_rows(engine, graph, group.ids[js], r, removed.to(engine.device), group.target[js],
                         None if group.distractor is None else group.distractor[js])
        out[ks.to(out.device), js.to(out.device)] = m.float()
        passes += 1
    return out, passes
