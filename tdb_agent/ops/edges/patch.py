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
from tdb_agent.ops.edges.capture import PairGroup, Prefix, continue_prefix, head_outputs, metric_rows
from tdb_agent.ops.edges.graph import EdgeGraph
from tdb_agent.ops.edges.heads import head_read, layer_rotary, read_norm, rotary_block_tables


#: bytes of the buffer of sender differences [rows, n_senders, positions, d] one patched pass
#: holds; rows of edge sets and pairs are split into passes to stay under it
PATCH_BYTES = 1 << 31
#: on a CPU, bytes of a block's rebuilt receiver streams [rows, positions, q/k/v receivers, d]
#: per pass: they are read and written several times per block, and a pass whose streams stay
#: within the last-level cache runs each row faster than a bigger batch (GPT-2-small shape,
#: 128 tokens, 12 edge sets: 2 rows a pass 41 s, 16 rows 60 s, 24 rows 65 s)
CPU_STREAM_BYTES = 1 << 25


def rows_per_pass(engine: Engine, graph: EdgeGraph, s: int, batch_size: int) -> int:
    """Rows (edge set × prompt pair) of one patched pass: at most `batch_size`, the sender
    buffer within PATCH_BYTES and, on a CPU, the receiver streams within CPU_STREAM_BYTES."""
    spec = engine.spec
    item = engine.model.dtype.itemsize
    n = min(batch_size, PATCH_BYTES // (graph.n_senders * s * spec.d_model * item))
    if engine.device.type == "cpu":
        n = min(n, CPU_STREAM_BYTES // ((spec.n_heads + 2 * spec.n_kv_heads) * s * spec.d_model * item))
    return max(1, n)


def _row_plan(m: torch.Tensor) -> tuple[bool, torch.Tensor, torch.Tensor] | None:
    """How one row sums its removed edges into a block's receivers, m [R, n] (removed weight
    of sender u at receiver r): over the senders with a removed edge (False, their columns,
    m there), or, where fewer senders have a kept edge, as the sum of all n senders less
    those (True, their columns, 1 − m there). None when no edge is removed."""
    used = (m != 0).any(0)
    if not used.any():
        return None
    comp = 1 - m
    kept = (comp != 0).any(0)
    if int(kept.sum()) < int(used.sum()):
        cols = kept.nonzero()[:, 0]
        return True, cols, comp[:, cols]
    cols = used.nonzero()[:, 0]
    return False, cols, m[:, cols]


def patched_rows(engine: Engine, graph: EdgeGraph, ids: torch.Tensor, ref: torch.Tensor, removed: torch.Tensor,
                 target: torch.Tensor, distractor: torch.Tensor | None, prefix: Prefix | None = None) -> torch.Tensor:
    """Metric per row of `ids` [b, s] with `removed` [b, (s,) U, R] edges reading `ref`
    ([b, s, U, d] or [U, d]) instead of the run's sender values (a fractional mask moves the
    edge that fraction of the way). prefix: `ids` continue it (positions its offset..; every
    sender's reference there is its value in this run, so no removed edge changes it).

    One buffer holds ref_u − a_u for the senders run so far, sender-major [b, U, s, d]
    (position-aware masks: [b, s, U, d]), each written once as its sender runs; a block's
    receivers then take their removed edges' sum as one matrix product per row
    [R_block, c] @ [c, s·d] over the c senders with a removed edge there, or, where fewer have
    a kept one (small budgets), the sum of every upstream sender's difference less the kept
    ones (`_row_plan`)."""
    spec, a = engine.spec, engine.adapter
    H, KV, U = spec.n_heads, spec.n_kv_heads, graph.n_senders
    pos = removed.dim() == 4
    state: dict = {"filled": 0}

    def write(vals: torch.Tensor) -> None:
        """Append the next senders' differences ref − vals ([b, s, k, d] this run's values)."""
        u0, k = state["filled"], vals.shape[2]
        r = ref[:, :, u0:u0 + k] if ref.dim() == 4 else ref[u0:u0 + k].view(1, 1, k, -1)
        if pos:
            torch.sub(r.to(vals.dtype), vals, out=state["D"][:, :, u0:u0 + k])
        else:
            torch.sub(r.to(vals.dtype).transpose(1, 2), vals.transpose(1, 2), out=state["D"][:, u0:u0 + k])
        state["filled"] = u0 + k

    def rebuilt(x: torch.Tensor, rs: slice, n_up: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(x + Σ_u removed[u, r] · (ref_u − a_u): receiver r's own stream for each r in rs,
        [b, s, R, d] (a view of a receiver-major tensor), which receivers have a removed edge
        [b, (s,) R]), each receiver reading the first n_up senders; None if none has."""
        m = state["mask"][..., rs, :n_up]  # [b, (s,) R, n_up]
        hit = (m != 0).any(-1)
        if not hit.any():
            return None
        D = state["D"]
        if pos:
            return x.unsqueeze(2) + torch.matmul(m, D[:, :, :n_up]), hit
        b, _, s, d = D.shape
        Df, xf = D.view(b, U, s * d), x.reshape(b, s * d)
        out = D.new_empty(b, m.shape[-2], s * d)
        for i in range(b):
            plan = _row_plan(state["mask_cpu"][i, rs, :n_up])
            if plan is None:
                out[i] = xf[i]
                continue
            complement, cols, w = plan
            rows = Df[i].index_select(0, cols.to(D.device))
            w = w.to(D.device, D.dtype)
            if complement:  # x + every upstream sender's difference, less the kept ones
                torch.addmm((xf[i] + Df[i, :n_up].sum(0)).expand_as(out[i]), w, rows, alpha=-1, out=out[i])
            else:
                torch.addmm(xf[i].expand_as(out[i]), w, rows, out=out[i])
        return out.view(b, -1, s, d).transpose(1, 2), hit

    def rs(l: int, kind: str) -> slice:
        st = graph.layer_receivers(l).start
        off = {"q": (0, H), "k": (H, H + KV), "v": (H + KV, H + 2 * KV), "mlp": (H + 2 * KV, H + 2 * KV + 1)}[kind]
        return slice(st + off[0], st + off[1])

    def resid_pre(l):
        def fn(x, site):
            state["x"] = x
            if l == 0:
                b, s, d = x.shape
                shape = (b, s, U, d) if pos else (b, U, s, d)
                state["D"] = x.new_empty(shape)
                state["mask"] = removed.to(x.device, x.dtype).transpose(-1, -2).contiguous()  # [b, (s,) R, U]
                state["mask_cpu"] = state["mask"].cpu() if not pos else None  # rows' plans are made on the host
                write(x.unsqueeze(2))
                state["kw"] = rotary_block_tables(engine, x, 0 if prefix is None else prefix.offset)
            state["rot"] = layer_rotary(engine, l, state["kw"], x.dtype)
        return fn

    def head_inputs(l):
        """(each q, k and v receiver's own stream [b, s, H + 2KV, d], which of them have a
        removed edge [b, (s,) H + 2KV]), None when none has; computed once per block."""
        key = f"xs{l}"
        if key not in state:
            sl = graph.layer_receivers(l)
            state[key] = rebuilt(state["x"], slice(sl.start, sl.stop - 1), graph.n_upstream[sl.start])
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
            write(head_outputs(engine, l, z))
        return fn

    def mid(x, site):
        state["mid"] = x

    def mlp_in(l):
        def fn(h, site):
            sl = rs(l, "mlp")
            got = rebuilt(state["x"] if spec.parallel_residual else state["mid"], sl, graph.n_upstream[sl.start])
            return None if got is None else read_norm(engine, a.ln2(l), got[0][:, :, 0]).to(h.dtype)
        return fn

    def mlp_out(x, site):
        write(x.unsqueeze(2))

    def final(x, site):
        got = rebuilt(x, slice(graph.n_receivers - 1, graph.n_receivers), U)
        return None if got is None else got[0][:, :, 0]

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
        logits = engine.forward(ids, hooks=hooks, logit_positions=[-1], **continue_prefix(prefix)).logits[:, -1]
    return metric_rows(logits, target, distractor)


def patched_metrics(engine: Engine, graph: EdgeGraph, group: PairGroup, ref: torch.Tensor, keeps: torch.Tensor,
                    batch_size: int = 64, prefix: Prefix | None = None) -> tuple[torch.Tensor, int]:
    """Metric [n_sets, n_pairs] of the group's pairs with only `keeps` [n_sets, (s,) U, R] kept.

    ref: the group's corrupted sender values [n, s, U, d] or means [U, d]. prefix: the pairs'
    shared leading positions (capture.Prefix, from the corrupted run; `ref` then covers the
    positions after it): every patched run continues it. Returns the metrics and the number of
    forward passes."""
    ids = group.ids
    if prefix is not None:
        ids = ids[:, prefix.offset:]
        if keeps.dim() == 4:  # edges pinned to the prefix's positions change nothing there
            keeps = keeps[:, prefix.offset:]
    n, s = ids.shape
    rows = [(k, j) for k in range(keeps.shape[0]) for j in range(n)]
    batch_size = rows_per_pass(engine, graph, s, batch_size)
    out = torch.empty(keeps.shape[0], n, device=engine.device)
    passes = 0
    valid = graph.valid.to(keeps.device)
    for r0 in range(0, len(rows), max(1, batch_size)):
        chunk = rows[r0:r0 + batch_size]
        ks = torch.tensor([k for k, _ in chunk], device=keeps.device)
        js = torch.tensor([j for _, j in chunk], device=group.ids.device)
        removed = ~keeps[ks] & valid
        r = ref[js] if ref.dim() == 4 else ref
        m = patched_rows(engine, graph, ids[js], r, removed.to(engine.device), group.target[js],
                         None if group.distractor is None else group.distractor[js],
                         None if prefix is None else prefix.rows(js))
        out[ks.to(out.device), js.to(out.device)] = m.float()
        passes += 1
    return out, passes
