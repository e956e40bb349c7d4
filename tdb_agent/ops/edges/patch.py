"""Exact edge patching: the model run with a set of edges kept and every other edge removed.

Removing edge u → r means receiver r alone reads sender u's reference value (the corrupted
prompt's, or the corpus mean) instead of u's value in this run; every other receiver still
reads u as it is. Receiver r's input is rebuilt as

    x_r = x + Σ_{u removed for r} (ref_u − a_u)

where x is the residual stream this run gives (the sum of every sender's value in this run,
plus biases) and a_u is u's value in this run (as in ACDC and MIB: kept edges carry the
sender's value in the patched run, so upstream removals propagate). Keeping every edge is the
clean run; keeping none is the reference run, exactly.

The engine's own modules run; hooks rebuild each head's q, k and v (at its rotated q/k/v:
norm, the head's W slice and the rotary are applied to the difference), each MLP's input and
the final residual stream. Rows of one pass are (edge set, prompt pair) combinations.
"""

from __future__ import annotations

import torch

from tdb_agent.engine import Engine
from tdb_agent.ops.edges.capture import PairGroup, head_outputs, metric_rows
from tdb_agent.ops.edges.graph import EdgeGraph
from tdb_agent.ops.edges.reads import rotary_tables, rotate


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
            if "tables" not in state:
                state["tables"] = rotary_tables(engine, x)
        return fn

    def head_inputs(l):
        """The change of ln1's output seen by each q, k and v receiver of block l
        [b, s, H + 2KV, d] (None when none of them has a removed edge), computed once per block."""
        key = f"dx{l}"
        if key not in state:
            sl = graph.layer_receivers(l)
            heads = slice(sl.start, sl.stop - 1)
            n_up = graph.n_upstream[sl.start]
            m = mask(heads, n_up)
            dx = None
            if m.any():
                x, norm = state["x"], a.ln1(l)
                dx = norm(x.unsqueeze(2) + _delta(D(n_up), m)) - norm(x).unsqueeze(2)
            state[key] = dx
        return state[key]

    def qkv(l, kind, i):
        def fn(t, site):
            dx = head_inputs(l)
            if dx is None:
                return None
            st = graph.layer_receivers(l).start
            part = rs(l, kind)
            W = a.W_QKV(l)[i].to(t.dtype)
            dt = torch.einsum("bshd,hdk->bshk", dx[:, :, part.start - st:part.stop - st], W)
            return t + (rotate(dt, state["tables"]) if kind != "v" else dt)
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
            return a.ln2(l)(x + _delta(D(n_up), m)[:, :, 0])
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
        p = f"blocks.{l}."
        hooks[p + "hook_resid_pre"] = [resid_pre(l)]
        hooks[p + "attn.hook_q"] = [qkv(l, "q", 0)]
        hooks[p + "attn.hook_k"] = [qkv(l, "k", 1)]
        hooks[p + "attn.hook_v"] = [qkv(l, "v", 2)]
        hooks[p + "attn.hook_z"] = [z_out(l)]
        if not spec.parallel_residual:
            hooks[p + "hook_resid_mid"] = [mid]
        hooks[p + "ln2.hook_normalized"] = [mlp_in(l)]
        hooks[p + "hook_mlp_out"] = [mlp_out]
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
