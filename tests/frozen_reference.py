"""A hand-written forward of GPT-2 and Llama models in plain PyTorch (float64), with MLPs
replaced by transcoders (or the residual stream by SAEs) plus error terms, and the norm
scales and attention patterns frozen at their clean values: the independent computation
attribution graphs are tested against. Nothing here imports tdb_agent's engine or ops.

Usage: `ref = HandModel(hf_model)`, `ref.clean(ids, dicts)` records the clean scales,
patterns, MLP outputs and read-site values; `ref.frozen(src)` runs the frozen model on
explicit sources (embeddings, feature activations per layer, error vectors) and returns the
features' pre-activations, the logits and the per-layer queries/keys.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch


@dataclass
class Dict_:
    """A dictionary at layer l: W_enc [d, n], b_enc, W_dec [n, n_out, d], b_dec [d] (of the
    write site of layer l), W_skip [d, d] or None, in_offset (SAE b_dec) or None, threshold."""

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    W_skip: torch.Tensor | None = None
    in_offset: torch.Tensor | None = None
    threshold: torch.Tensor | None = None

    def encode(self, x):
        pre = (x if self.in_offset is None else x - self.in_offset) @ self.W_enc + self.b_enc
        act = torch.relu(pre)
        return act if self.threshold is None else act * (pre > self.threshold)


@dataclass
class Sources:
    emb: torch.Tensor  # [s, d]
    feats: dict[int, torch.Tensor]  # layer -> [s, n] activations of the feature nodes
    mlp_err: dict[int, torch.Tensor]  # layer -> [s, d]
    res_err: dict[int, torch.Tensor] = field(default_factory=dict)

    def copy(self) -> "Sources":
        return Sources(self.emb.clone(), {k: v.clone() for k, v in self.feats.items()},
                       {k: v.clone() for k, v in self.mlp_err.items()}, {k: v.clone() for k, v in self.res_err.items()})


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class HandModel:
    def __init__(self, model):
        self.m = copy.deepcopy(model).double().eval()
        self.cfg = self.m.config
        self.gpt2 = self.cfg.model_type == "gpt2"
        base = self.m.base_model
        self.blocks = base.h if self.gpt2 else base.layers
        self.H = self.cfg.num_attention_heads
        self.D = self.cfg.hidden_size
        self.dh = self.D // self.H
        self.KV = getattr(self.cfg, "num_key_value_heads", None) or self.H

    # ------------------------------------------------------------------ pieces
    def _norm(self, mod, x, key, frozen):
        if frozen:
            s = self.scales[key]
        elif self.gpt2:
            s = torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + mod.eps)
        else:
            s = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + mod.variance_epsilon)
        if not frozen:
            self.scales[key] = s
        if self.gpt2:
            return (x - x.mean(-1, keepdim=True)) * s * mod.weight + mod.bias
        return x * s * mod.weight

    def _qkv(self, l, h):
        blk = self.blocks[l]
        s = h.shape[0]
        if self.gpt2:
            qkv = h @ blk.attn.c_attn.weight + blk.attn.c_attn.bias
            q, k, v = qkv.split(self.D, -1)
            return [t.reshape(s, self.H, self.dh) for t in (q, k, v)]
        a = blk.self_attn
        q = (h @ a.q_proj.weight.T).reshape(s, self.H, self.dh)
        k = (h @ a.k_proj.weight.T).reshape(s, self.KV, self.dh)
        v = (h @ a.v_proj.weight.T).reshape(s, self.KV, self.dh)
        pos = torch.arange(s)[None]
        cos, sin = self.m.base_model.rotary_emb(h[None], pos)
        cos, sin = cos[0][:, None], sin[0][:, None]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return q, k, v

    def _attn_out(self, l, z):
        blk = self.blocks[l]
        zf = z.reshape(z.shape[0], self.D)
        if self.gpt2:
            return zf @ blk.attn.c_proj.weight + blk.attn.c_proj.bias
        return zf @ blk.self_attn.o_proj.weight.T

    def _ln(self, l, which):
        blk = self.blocks[l]
        if self.gpt2:
            return blk.ln_1 if which == 1 else blk.ln_2
        return blk.input_layernorm if which == 1 else blk.post_attention_layernorm

    # ------------------------------------------------------------------ forward
    def run(self, ids, dicts: dict[int, Dict_], site: str, frozen: bool, src: Sources | None = None,
            head_v: tuple | None = None, capture_resid_pre: int | None = None):
        """site: 'mlp_in' / 'resid_mid' (transcoders) or 'resid' (SAEs at resid_post).
        head_v = (layer, heads, resid_pre_alt): the heads of `layer` listed read their values
        from resid_pre_alt instead of the stream."""
        s = ids.shape[1]
        if not frozen:
            self.scales, self.patterns, self.reads, self.mlp_out, self.resid_post = {}, {}, {}, {}, {}
            base = self.m.base_model
            x = base.wte.weight[ids[0]] + base.wpe.weight[torch.arange(s)] if self.gpt2 else base.embed_tokens.weight[ids[0]]
            self.emb = x.clone()
        else:
            x = src.emb.clone()
        out = {"pre": {}, "q": {}, "k": {}, "resid_pre": {}}
        groups = self.H // self.KV
        for l in range(len(self.blocks)):
            out["resid_pre"][l] = x
            h = self._norm(self._ln(l, 1), x, f"L{l}.ln1", frozen)
            q, k, v = self._qkv(l, h)
            out["q"][l], out["k"][l] = q, k
            if not frozen:
                kk = k.repeat_interleave(groups, 1)
                sc = torch.einsum("qhd,khd->hqk", q, kk) * self.dh ** -0.5
                sc = sc.masked_fill(~torch.tril(torch.ones(s, s, dtype=torch.bool)), float("-inf"))
                self.patterns[l] = torch.softmax(sc, -1)
            vv = v.repeat_interleave(groups, 1)
            z = torch.einsum("hqk,khd->qhd", self.patterns[l], vv)
            if head_v is not None and head_v[0] == l:
                _, heads, alt = head_v
                h_alt = self._norm(self._ln(l, 1), alt, f"L{l}.ln1", True)
                v_alt = self._qkv(l, h_alt)[2].repeat_interleave(groups, 1)
                for hh in heads:
                    z[:, hh] = torch.einsum("qk,kd->qd", self.patterns[l][hh], v_alt[:, hh])
            mid = x + self._attn_out(l, z)
            m_in = self._norm(self._ln(l, 2), mid, f"L{l}.ln2", frozen)
            read = m_in if site == "mlp_in" else mid
            if l in dicts and site != "resid":
                out["pre"][l] = read @ dicts[l].W_enc + dicts[l].b_enc
            if not frozen:
                self.reads[l] = read
                self.mlp_out[l] = self.blocks[l].mlp(m_in[None])[0]
                mo = self.mlp_out[l]
            else:
                mo = src.mlp_err[l].clone()
                if site != "resid":
                    for ls, d in dicts.items():
                        if ls <= l < ls + d.W_dec.shape[1]:
                            mo = mo + src.feats[ls] @ d.W_dec[:, l - ls]
                    if l in dicts:
                        mo = mo + dicts[l].b_dec
                        if dicts[l].W_skip is not None:
                            mo = mo + read @ dicts[l].W_skip
            x = mid + mo
            if site == "resid" and l in dicts:
                d = dicts[l]
                out["pre"][l] = (x - d.in_offset) @ d.W_enc + d.b_enc
                if not frozen:
                    self.resid_post[l] = x
                else:
                    x = src.feats[l] @ d.W_dec[:, 0] + d.b_dec + src.res_err[l]
        fin = self.m.base_model.ln_f if self.gpt2 else self.m.base_model.norm
        normed = self._norm(fin, x[-1:], "final", frozen)
        out["logits"] = (normed @ self.m.lm_head.weight.T)[0]
        return out

    def clean(self, ids, dicts, site, skip_first=True) -> Sources:
        """Run clean; return the graph's sources: feature nodes (position 0 folded into the
        error when skip_first), error vectors, embeddings."""
        self.clean_out = self.run(ids, dicts, site, frozen=False)
        feats, mlp_err, res_err = {}, {}, {}
        for l, d in dicts.items():
            x = self.resid_post[l] if site == "resid" else self.reads[l]
            f = d.encode(x)
            if skip_first:
                f[0] = 0
            feats[l] = f
        for o in range(len(self.blocks)):
            e = self.mlp_out[o].clone()
            if site != "resid":
                for ls, d in dicts.items():
                    if ls <= o < ls + d.W_dec.shape[1]:
                        e = e - feats[ls] @ d.W_dec[:, o - ls]
                if o in dicts:
                    e = e - dicts[o].b_dec
                    if dicts[o].W_skip is not None:
                        e = e - self.reads[o] @ dicts[o].W_skip
            mlp_err[o] = e
        if site == "resid":
            for l, d in dicts.items():
                res_err[l] = self.resid_post[l] - feats[l] @ d.W_dec[:, 0] - d.b_dec
        return Sources(self.emb.clone(), feats, mlp_err, res_err)
