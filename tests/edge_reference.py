"""An independent re-implementation of GPT-2 and Llama for edge tests, in plain PyTorch.

Every receiver (each head's q, k and v input, each MLP input, the logits) computes its own
input as an explicit sum over the senders feeding it, so a test can (a) hang a zero probe on
each receiver input and take its gradient with autograd, and (b) choose, per edge, whether
the receiver reads the sender's value in this run or a reference value (brute-force edge
patching). Weights come from the Hugging Face model; nothing here uses the engine.
"""

from __future__ import annotations

import math

import torch


FROZEN = {"on": False}  # hold every norm's scale constant (detached) in the backward


def _scale(t):
    return t.detach() if FROZEN["on"] else t


def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / _scale(torch.sqrt(var + eps)) * w + b


def _rms(x, w, eps):
    return x / _scale(torch.sqrt((x * x).mean(-1, keepdim=True) + eps)) * w


def _gelu_new(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


class GraphOrder:
    """Receivers and how many senders feed each, in the order of ops.edges.graph, written
    out for the test's own models (L, H, KV set by the subclass; par: parallel blocks)."""

    L: int
    H: int
    KV: int
    par = False

    def receivers(self):
        out = []
        for l in range(self.L):
            out += [("q", l, h) for h in range(self.H)] + [("k", l, g) for g in range(self.KV)]
            out += [("v", l, g) for g in range(self.KV)] + [("mlp", l, 0)]
        return out + [("logits", self.L, 0)]

    def n_up(self, kind, l):
        if kind == "logits":
            return 1 + self.L * (self.H + 1)
        return 1 + l * (self.H + 1) + (self.H if kind == "mlp" and not self.par else 0)


class RefModel(GraphOrder):
    """Weights of a GPT-2 or Llama-family HF model in per-head form."""

    def __init__(self, hf):
        self.cfg = c = hf.config
        self.family = c.model_type
        self.L, self.H = c.num_hidden_layers, c.num_attention_heads
        self.KV = getattr(c, "num_key_value_heads", None) or self.H
        self.d = c.hidden_size
        self.dh = self.d // self.H if self.family == "gpt2" else c.head_dim if getattr(c, "head_dim", None) else \
            self.d // self.H
        self.hf = hf

    # ---- the run ---------------------------------------------------------------------
    def run(self, ids, target, distractor, probes=None, ref=None, removed=None, embed=None, override=None):
        """metric per row [b], sender outputs [b, s, U, d].

        probes: {receiver index: [b, s, d]} added to that receiver's input.
        ref: sender reference values [b, s, U, d]; removed: set of (sender, receiver index)
        edges whose receiver reads ref instead of this run's sender value (or (sender,
        receiver, position): at that position only); embed [b, s, d]
        replaces the token embeddings; override {sender index: [b, s, d]}: that sender's output
        is this value instead of its own (every receiver reads it)."""
        probes, removed, override = probes or {}, removed or set(), override or {}
        recv = self.receivers()
        ridx = {r: i for i, r in enumerate(recv)}
        b, s = ids.shape
        m = self.hf.base_model
        senders = []

        class Senders(list):
            def append(self, v):
                super().append(override.get(len(self), v))

        senders = Senders()
        tok = (m.wte if self.family == "gpt2" else m.embed_tokens).weight[ids] if embed is None else embed
        senders.append(tok + m.wpe.weight[torch.arange(s)][None] if self.family == "gpt2" else tok)
        bias = torch.zeros(self.d)

        at = {}  # (sender, receiver) -> positions where that edge alone reads ref: (u, r, t) in removed
        for e in removed:
            if len(e) == 3:
                at.setdefault(e[:2], torch.zeros(s, dtype=torch.bool))[e[2]] = True

        def read(kind, l, i):
            r = ridx[(kind, l, i)]
            x = bias.expand(b, s, self.d).clone()
            for u in range(self.n_up(kind, l)):
                if (u, r) in at:
                    x = x + torch.where(at[(u, r)][None, :, None], ref[:, :, u], senders[u])
                else:
                    x = x + (ref[:, :, u] if (u, r) in removed else senders[u])
            return x + probes[r] if r in probes else x

        for l in range(self.L):
            blk = m.h[l] if self.family == "gpt2" else m.layers[l]
            qs = [self._proj(blk, "q", l, h, read("q", l, h)) for h in range(self.H)]
            ks = [self._proj(blk, "k", l, g, read("k", l, g)) for g in range(self.KV)]
            vs = [self._proj(blk, "v", l, g, read("v", l, g)) for g in range(self.KV)]
            mask = torch.ones(s, s, dtype=torch.bool).tril()
            WO, bO = self._wo(blk)
            for h in range(self.H):
                g = h // (self.H // self.KV)
                sc = qs[h] @ ks[g].transpose(-1, -2) / math.sqrt(self.dh)
                pat = torch.softmax(sc.masked_fill(~mask, float("-inf")), -1)
                senders.append((pat @ vs[g]) @ WO[h])
            if bO is not None:
                bias = bias + bO
            senders.append(self._mlp(blk, read("mlp", l, 0)))
        x = read("logits", self.L, 0)[:, -1]
        if self.family == "gpt2":
            x = _ln(x, m.ln_f.weight, m.ln_f.bias, m.ln_f.eps)
        else:
            x = _rms(x, m.norm.weight, m.norm.variance_epsilon)
        logits = x @ self.hf.lm_head.weight.T
        metric = logits[torch.arange(b), target] - logits[torch.arange(b), distractor]
        return metric, torch.stack(senders, dim=2)

    def _proj(self, blk, kind, l, h, x):
        dh = self.dh
        if self.family == "gpt2":
            xn = _ln(x, blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps)
            off = {"q": 0, "k": self.d, "v": 2 * self.d}[kind] + h * dh
            return xn @ blk.attn.c_attn.weight[:, off:off + dh] + blk.attn.c_attn.bias[off:off + dh]
        xn = _rms(x, blk.input_layernorm.weight, blk.input_layernorm.variance_epsilon)
        lin = {"q": blk.self_attn.q_proj, "k": blk.self_attn.k_proj, "v": blk.self_attn.v_proj}[kind]
        out = xn @ lin.weight[h * dh:(h + 1) * dh].T
        if lin.bias is not None:
            out = out + lin.bias[h * dh:(h + 1) * dh]
        if kind == "v":
            return out
        theta = getattr(self.cfg, "rope_theta", None) or self.cfg.rope_parameters["rope_theta"]
        inv = 1.0 / theta ** (torch.arange(0, dh, 2).float() / dh)
        ang = torch.arange(x.shape[1]).float()[:, None] * inv[None]
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
        rot = torch.cat([-out[..., dh // 2:], out[..., :dh // 2]], -1)
        return out * cos + rot * sin

    def _wo(self, blk):
        if self.family == "gpt2":
            return blk.attn.c_proj.weight.reshape(self.H, self.dh, self.d), blk.attn.c_proj.bias
        o = blk.self_attn.o_proj
        return o.weight.T.reshape(self.H, self.dh, self.d), o.bias

    def _mlp(self, blk, x):
        if self.family == "gpt2":
            xn = _ln(x, blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps)
            hdn = _gelu_new(xn @ blk.mlp.c_fc.weight + blk.mlp.c_fc.bias)
            return hdn @ blk.mlp.c_proj.weight + blk.mlp.c_proj.bias
        xn = _rms(x, blk.post_attention_layernorm.weight, blk.post_attention_layernorm.variance_epsilon)
        mlp = blk.mlp
        hdn = torch.nn.functional.silu(xn @ mlp.gate_proj.weight.T) * (xn @ mlp.up_proj.weight.T)
        return hdn @ mlp.down_proj.weight.T

    # ---- EAP by autograd -------------------------------------------------------------
    def grads(self, ids, target, distractor, embed=None):
        R = len(self.receivers())
        b, s = ids.shape
        probes = {r: torch.zeros(b, s, self.d, requires_grad=True) for r in range(R)}
        with torch.enable_grad():
            m, clean = self.run(ids, target, distractor, probes=probes, embed=embed)
            grads = torch.autograd.grad(m.sum(), [probes[r] for r in range(R)])
        return grads, clean.detach()

    def ig_activations(self, ids, cids, target, distractor, steps, ref=None, nodes=None):
        """[U, R] EAP-IG over activations: for each sender group (EMB; the heads of a layer; an
        MLP) its outputs are set to ref + k/steps · (clean − ref), k = 1..steps, the gradient at
        each receiver averaged over those runs and dotted with (ref − clean) of the group's
        senders; ref [U, d]: fixed references (corpus means) instead of the corrupted run.
        nodes: (α's, weights) of another quadrature instead of α = k/steps, weights 1/steps."""
        alphas, weights = nodes or ([k / steps for k in range(1, steps + 1)], [1 / steps] * steps)
        R = len(self.receivers())
        b = ids.shape[0]
        with torch.no_grad():
            clean = self.run(ids, target, distractor)[1]
            corr = self.run(cids, target, distractor)[1] if ref is None else ref.expand_as(clean)
        groups = [[0]]
        for l in range(self.L):
            first = 1 + l * (self.H + 1)
            groups += [list(range(first, first + self.H)), [first + self.H]]
        out = torch.zeros(clean.shape[2], R)
        for us in groups:
            acc = None
            for a, w in zip(alphas, weights):
                over = {u: corr[:, :, u] + a * (clean[:, :, u] - corr[:, :, u]) for u in us}
                probes = {r: torch.zeros(b, ids.shape[1], self.d, requires_grad=True) for r in range(R)}
                with torch.enable_grad():
                    m, _ = self.run(ids, target, distractor, probes=probes, override=over)
                    g = torch.autograd.grad(m.sum(), [probes[r] for r in range(R)], allow_unused=True)
                g = [torch.zeros(b, ids.shape[1], self.d) if x is None else w * x for x in g]
                acc = g if acc is None else [a + x for a, x in zip(acc, g)]
            for r, (kind, l, _) in enumerate(self.receivers()):
                for u in us:
                    if u < self.n_up(kind, l):
                        out[u, r] = ((corr[:, :, u] - clean[:, :, u]) * acc[r]).sum() / b
        return out

    def eap(self, ids, cids, target, distractor, ig_steps=0, ref=None, ref_embed=None, nodes=None):
        """[U, R] scores: (corrupted − clean sender) · ∂m/∂(receiver input), averaged over rows;
        with ig_steps the gradient is averaged over inputs interpolated between the corrupted and
        clean token embeddings (k / ig_steps, k = 1..ig_steps). ref [U, d] / ref_embed [d]: a
        fixed reference (corpus means) instead of the corrupted prompt's values. nodes: (α's,
        weights) of another quadrature instead of α = k / ig_steps, weights 1 / ig_steps."""
        R = len(self.receivers())
        b = ids.shape[0]
        grads, clean = self.grads(ids, target, distractor)
        if ig_steps:
            emb = (self.hf.base_model.wte if self.family == "gpt2" else self.hf.base_model.embed_tokens).weight
            e1 = emb[ids]
            e0 = emb[cids] if ref_embed is None else ref_embed.expand_as(e1)
            alphas, weights = nodes or ([k / ig_steps for k in range(1, ig_steps + 1)], [1 / ig_steps] * ig_steps)
            steps = [self.grads(ids, target, distractor, embed=e0 + a * (e1 - e0))[0] for a in alphas]
            grads = [sum(w * g[r] for w, g in zip(weights, steps)) for r in range(R)]
        with torch.no_grad():
            corr = self.run(cids, target, distractor)[1] if ref is None else ref.expand_as(clean)
        out = torch.zeros(clean.shape[2], R)
        for r, (kind, l, _) in enumerate(self.receivers()):
            for u in range(self.n_up(kind, l)):
                out[u, r] = ((corr[:, :, u] - clean[:, :, u].detach()) * grads[r]).sum() / b
        return out
