"""Graph nodes: active dictionary features, error nodes, token embeddings, targets.

Node order (as circuit-tracer's): features, errors, embeddings, targets. Features are
(layer, position, index) of the dictionary that reads `layer`; error nodes are (site, layer,
position) with site `mlp` (the MLP output minus what the feature nodes write there) or
`resid` (a residual SAE's reconstruction error); embeddings are one per position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tdb_agent.ops.graph.frozen import Replacement


@dataclass
class Sources:
    """The source nodes of a replacement model and the vectors they write."""

    feat: torch.Tensor  # [n_f, 3] long: layer, position, index
    feat_act: torch.Tensor  # [n_f]
    feat_pre: torch.Tensor  # [n_f] clean pre-activations
    err_keys: list[tuple[str, int]]  # (site, layer) per error block; each block has n_pos nodes
    err_vecs: dict[tuple[str, int], torch.Tensor]  # (site, layer) -> [s, d]
    emb: torch.Tensor  # [s, d]
    leaves: dict  # leaf name -> clean value [s, d]
    n_pos: int

    @property
    def n_feat(self) -> int:
        return self.feat.shape[0]

    @property
    def n_err(self) -> int:
        return len(self.err_keys) * self.n_pos

    @property
    def n_cols(self) -> int:
        return self.n_feat + self.n_err + self.n_pos

    def err_index(self, site: str, layer: int, pos: int) -> int:
        return self.n_feat + self.err_keys.index((site, layer)) * self.n_pos + pos

    def emb_index(self, pos: int) -> int:
        return self.n_feat + self.n_err + pos


@torch.no_grad()
def find_sources(rep: Replacement, skip_first: bool) -> Sources:
    """Active features (position 0 excluded when `skip_first`: the BOS token's features fold
    into its error nodes), error vectors and leaves at their clean values."""
    c = rep.clean
    s = c.ids.shape[1]
    feats, acts, pres = [], [], []
    writes: dict[tuple[str, int], torch.Tensor] = {}
    for l, d in rep.dicts.items():
        pre = d.pre_acts(c.reads[l])  # [s, n]
        f = d.encode(c.reads[l])
        if skip_first:
            f = f.clone()
            f[0] = 0
        pos, idx = torch.nonzero(f, as_tuple=True)
        feats.append(torch.stack([torch.full_like(pos, l), pos, idx], 1))
        acts.append(f[pos, idx])
        pres.append(pre[pos, idx])
        fs = torch.zeros_like(f)
        fs[pos, idx] = f[pos, idx]
        for j in range(d.W_dec.shape[1]):
            key = (d.write_site, l + j)
            w = fs @ d.W_dec[:, j]
            writes[key] = writes[key] + w if key in writes else w
    leaves = {"emb": c.emb}
    err_vecs = {}
    for o in rep.mlp_layers:
        x = c.mlp_out[o]
        b = rep.out_bias(o) if rep.mode == "transcoders" else None
        sk = rep.skip(o, c.reads[o]) if o in c.reads and rep.mode == "transcoders" else None
        leaf = x - (0 if b is None else b) - (0 if sk is None else sk)
        leaves[("mlp", o)] = leaf
        err_vecs[("mlp", o)] = leaf - writes.get(("mlp", o), 0)
    for l in rep.res_layers:
        leaf = c.resid_post[l] - rep.out_bias(l)
        leaves[("res", l)] = leaf
        err_vecs[("resid", l)] = leaf - writes.get(("resid", l), 0)
    dev = c.emb.device
    feat = torch.cat(feats) if feats else torch.zeros(0, 3, dtype=torch.long, device=dev)
    return Sources(feat=feat, feat_act=torch.cat(acts) if acts else torch.zeros(0, device=dev),
                   feat_pre=torch.cat(pres) if pres else torch.zeros(0, device=dev),
                   err_keys=list(err_vecs), err_vecs=err_vecs, emb=c.emb, leaves=leaves, n_pos=s)


def leaf_of(site: str, layer: int):
    return ("mlp", layer) if site == "mlp" else ("res", layer)


def edge_block(rep: Replacement, src: Sources, grads: dict, m: int, chunk_elems: int = 1 << 24) -> torch.Tensor:
    """Edges into the first `m` copies' targets from every source: [m, n_cols].

    grads: leaf name -> ∂target/∂leaf [B, s, d]. An edge is the source's write (activation
    times decoder row, error vector, embedding) dotted with the gradient at its write site."""
    dev = src.emb.device
    out = torch.zeros(m, src.n_cols, device=dev, dtype=torch.float32)
    feat = src.feat
    for l, d in rep.dicts.items():
        sel = (feat[:, 0] == l).nonzero(as_tuple=True)[0]
        if not len(sel):
            continue
        pos, idx, act = feat[sel, 1], feat[sel, 2], src.feat_act[sel]
        total = torch.zeros(m, len(sel), device=dev)
        for j in range(d.W_dec.shape[1]):
            g = grads.get(leaf_of(d.write_site, l + j))
            if g is not None:
                total += dot_by_position(g[:m], pos, idx, d.W_dec[:, j], chunk_elems)
        out[:, sel] = total * act.float()
    for k, (site, layer) in enumerate(src.err_keys):
        g = grads.get(leaf_of(site, layer))
        if g is not None:
            start = src.n_feat + k * src.n_pos
            out[:, start:start + src.n_pos] = (g[:m].float() * src.err_vecs[(site, layer)].float()).sum(-1)
    if grads.get("emb") is not None:
        start = src.n_feat + src.n_err
        out[:, start:start + src.n_pos] = (grads["emb"][:m].float() * src.emb.float()).sum(-1)
    return out


def dot_by_position(g: torch.Tensor, pos: torch.Tensor, idx: torch.Tensor, W: torch.Tensor,
                    chunk_elems: int = 1 << 24) -> torch.Tensor:
    """[m, n]: g[:, pos[f]] · W[idx[f]] for every feature f, as one batched product per
    chunk of positions (each position's decoder rows padded to the most any position has),
    so the gradients are read in place, never gathered per feature."""
    m, T, D = g.shape
    order = torch.argsort(pos, stable=True)
    p, ix = pos[order], idx[order]
    counts = torch.bincount(p, minlength=T)
    start = counts.cumsum(0) - counts
    slot = torch.arange(len(p), device=p.device) - start[p]
    cmax = int(counts.max())
    out = torch.empty(m, len(p), device=g.device)
    step = max(1, chunk_elems // max(1, cmax * D))
    gT = g.transpose(0, 1)  # [T, m, D]
    for a in range(0, T, step):
        b = min(T, a + step)
        lo, hi = int(start[a]), int(start[b - 1] + counts[b - 1])
        if hi == lo:
            continue
        pp, ss = p[lo:hi] - a, slot[lo:hi]
        Wpad = torch.zeros(b - a, cmax, D, device=g.device)
        Wpad[pp, ss] = W[ix[lo:hi]].float()
        r = torch.bmm(gT[a:b].float(), Wpad.transpose(1, 2))  # [positions, m, cmax]
        out[:, order[lo:hi]] = r[pp, :, ss].T
    return out
