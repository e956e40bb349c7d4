"""Edge patching and EAP by hand-written hooks on a plain `transformers` model (eager
attention), for every family: the independent computation tests/test_edges_families.py
compares the engine's edge methods with. Nothing here imports tdb_agent.

Every receiver computes its read from its own copy of the residual stream, with the
plain model's own modules:

* a head's q, k or v: the block's attention module is called again on ln1(x_r) (its own
  projections, q/k norms and rotary run, with the arguments the block passed), and the
  head's slice of what it hands its attention function replaces the run's;
* an MLP: its input is replaced by ln2(x_r) (OLMo-2: x_r);
* the logits: the final norm's input is replaced by x_r;

x_r = the stream the receiver would read (block input; for a sequential MLP, block input +
attention's write; the final stream) + Σ over its removed edges (reference − this run's
sender value) + an optional probe (autograd gives the receiver's own gradient there).
Senders: EMB = block 0's input; a head = its slice of z through the output projection
(bias removed), through the post-norm with this run's scale where there is one; an MLP =
what the block adds to the residual stream for it.
"""

from __future__ import annotations

import sys
from contextlib import ExitStack

import torch

from tests.edge_reference import GraphOrder
from tests.test_families import GEMMA, POST_NORMS, attn_module, blocks, final_norm, model_type, out_proj, \
    token_embedding

LN1 = ("ln_1", "input_layernorm", "self_attn_layer_norm", "ln_attn")


def _first(obj, names):
    for n in names:
        if getattr(obj, n, None) is not None:
            return getattr(obj, n)
    return None


def parallel(model) -> bool:
    c, fam = model.config, model.config.model_type
    if fam in ("gptj", "cohere"):
        return True
    if fam == "falcon":
        return bool(c.parallel_attn or c.new_decoder_architecture)
    return bool(getattr(c, "use_parallel_residual", False))


def ln1(model, block):
    if model.config.model_type == "olmo2":
        return None
    return _first(block, LN1)


def ln2(model, block):
    """The norm the MLP reads through (None: the raw stream)."""
    fam = model.config.model_type
    if fam == "olmo2":
        return None
    if fam == "gemma2" or fam == "gemma3_text":
        return block.pre_feedforward_layernorm
    if fam == "falcon" and model.config.new_decoder_architecture:
        return block.ln_mlp
    if parallel(model) and fam != "gpt_neox":  # one norm feeds attention and MLP
        return _first(block, LN1)
    return _first(block, ("ln_2", "post_attention_layernorm", "final_layer_norm"))


def mlp_in(model, block):
    """The module whose input is the MLP's (normalised) input."""
    return block.fc1 if model.config.model_type == "opt" else block.mlp


def mlp_writer(model, block):
    fam = model.config.model_type
    if fam in POST_NORMS:
        return getattr(block, POST_NORMS[fam][1])
    return block.fc2 if fam == "opt" else block.mlp


def attn_writer(model, block):
    fam = model.config.model_type
    return getattr(block, POST_NORMS[fam][0]) if fam in POST_NORMS else attn_module(block)


def self_attention(block):
    a = attn_module(block)
    return getattr(a, "attention", a)  # GPT-Neo wraps its self-attention


class HookedEdges(GraphOrder):
    def __init__(self, model):
        self.model, c = model, model.config
        self.family = c.model_type
        self.L, self.H = c.num_hidden_layers, c.num_attention_heads
        self.blocks = list(blocks(model))
        self.layer_of = {id(self_attention(b)): l for l, b in enumerate(self.blocks)}
        self.par = parallel(model)
        self.KV = None  # learned from the first run

    # ---- the run -----------------------------------------------------------------------
    def run(self, ids, target, distractor, ref=None, removed=None, probes=None, embed=None):
        """(metric per row [b], this run's sender values [b, s, U, d]). removed: set of
        (sender, receiver index); probes: {receiver index: [b, s, d]} added to its input;
        embed [b, s, d]: the token embedding module's output instead of its own."""
        if self.KV is None:
            self.KV = self._kv_heads(ids)
        removed, probes = removed or set(), probes or {}
        ridx = {r: i for i, r in enumerate(self.receivers())}
        senders: list[torch.Tensor] = []
        st: dict = {"capture": None}
        b, s = ids.shape

        def stream(kind, l, i, x):
            r = ridx[(kind, l, i)]
            for u in range(self.n_up(kind, l)):
                if (u, r) in removed:
                    x = x + ref[:, :, u] - senders[u]
            return x + probes[r] if r in probes else x

        def block_pre(l):
            def hook(mod, args, kwargs):
                x = args[0] if args else kwargs["hidden_states"]
                st["x"] = x
                if l == 0:
                    senders.append(x)
            return hook

        def attn_pre(mod, args, kwargs):
            st["call"] = (mod, args, kwargs)

        def reads(l, x_r):
            """The q, k, v [b, heads, s, dh] the attention module hands its attention
            function when its block's input is x_r."""
            mod, args, kwargs = st["call"]
            norm = ln1(self.model, self.blocks[l])
            h = norm(x_r) if norm is not None else x_r
            st["capture"] = []
            try:
                if args:
                    mod(h, *args[1:], **kwargs)
                else:
                    mod(*args, **(kwargs | {"hidden_states": h}))
                return st["capture"][0]
            finally:
                st["capture"] = None

        def swap(module, q, k, v):
            if st["capture"] is not None:
                st["capture"].append((q, k, v))
                return q, k, v
            l = self.layer_of[id(module)]
            x = st["x"]
            new = [t.clone() for t in (q, k, v)]
            for j, (kind, n) in enumerate((("q", self.H), ("k", self.KV), ("v", self.KV))):
                for i in range(n):
                    r = ridx[(kind, l, i)]
                    if r in probes or any((u, r) in removed for u in range(self.n_up(kind, l))):
                        new[j][:, i] = reads(l, stream(kind, l, i, x))[j][:, i]
            return new

        def out_pre(l):
            def hook(mod, args):
                st["z"] = args[0]
            return hook

        def out_post(l):
            def hook(mod, args, out):
                if st["capture"] is not None:  # reads() calling the attention module again
                    return
                z = st["z"]
                dh = z.shape[-1] // self.H
                W = mod.weight if hasattr(mod, "nf") else mod.weight.T  # GPT-2's Conv1D is [in, out]
                factor = self._post_factor(l, out.reshape(b, s, -1))
                for h in range(self.H):
                    write = z[..., h * dh:(h + 1) * dh] @ W[h * dh:(h + 1) * dh]  # the head's write, no bias
                    senders.append(write.reshape(b, s, -1) * factor)
            return hook

        def attn_write(l):
            def hook(mod, args, out):
                if st["capture"] is not None:
                    return
                st["attn_write"] = (out[0] if isinstance(out, tuple) else out).reshape(b, s, -1)
            return hook

        def mlp_pre(l):
            def hook(mod, args):
                x = st["x"] if self.par else st["x"] + st["attn_write"]
                x_r = stream("mlp", l, 0, x)
                norm = ln2(self.model, self.blocks[l])
                h = norm(x_r) if norm is not None else x_r
                return (h.reshape(args[0].shape),) + args[1:]
            return hook

        def mlp_write(mod, args, out):
            senders.append(out.reshape(b, s, -1).clone())  # Falcon adds attention into it in place

        def final_pre(mod, args):
            return (stream("logits", self.L, 0, args[0]),) + args[1:]

        with ExitStack() as stack:
            self._swap_attention(stack, swap)
            hooks = []
            for l, blk in enumerate(self.blocks):
                hooks.append(blk.register_forward_pre_hook(block_pre(l), with_kwargs=True))
                hooks.append(self_attention(blk).register_forward_pre_hook(attn_pre, with_kwargs=True))
                hooks.append(out_proj(blk).register_forward_pre_hook(out_pre(l)))
                hooks.append(out_proj(blk).register_forward_hook(out_post(l)))
                hooks.append(attn_writer(self.model, blk).register_forward_hook(attn_write(l)))
                hooks.append(mlp_in(self.model, blk).register_forward_pre_hook(mlp_pre(l)))
                hooks.append(mlp_writer(self.model, blk).register_forward_hook(mlp_write))
            hooks.append(final_norm(self.model).register_forward_pre_hook(final_pre))
            if embed is not None:
                hooks.append(token_embedding(self.model).register_forward_hook(lambda mod, args, out: embed))
            stack.callback(lambda: [h.remove() for h in hooks])
            logits = self.model(ids, use_cache=False).logits[:, -1]
        rows = torch.arange(b)
        return logits[rows, target] - logits[rows, distractor], torch.stack(senders, dim=2)

    def _post_factor(self, l, raw):
        """gain / rms(raw) of the post-norm after attention (1 without one), this run's."""
        if self.family not in POST_NORMS:
            return 1.0
        norm = getattr(self.blocks[l], POST_NORMS[self.family][0])
        eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon")
        gain = norm.weight + (1.0 if self.family in GEMMA else 0.0)
        return torch.rsqrt(raw.pow(2).mean(-1, keepdim=True) + eps) * gain

    def _swap_attention(self, stack, swap):
        """Route every layer's q, k, v through `swap` before the model's own eager attention."""
        if self.family == "gpt_neo":
            cls = type(self_attention(self.blocks[0]))
            orig = cls._attn

            def neo(mod, q, k, v, mask=None):
                q, k, v = swap(mod, q, k, v)
                return orig(mod, q, k, v, mask)
            cls._attn = neo
            stack.callback(setattr, cls, "_attn", orig)
            return
        ns = sys.modules[type(self.model).__module__]
        eager = ns.eager_attention_forward

        def fn(module, q, k, v, mask, **kw):
            q, k, v = swap(module, q, k, v)
            return eager(module, q, k, v, mask, **kw)
        ns.eager_attention_forward = fn
        stack.callback(setattr, ns, "eager_attention_forward", eager)

    def _kv_heads(self, ids):
        seen = []
        with ExitStack() as stack:
            self._swap_attention(stack, lambda m, q, k, v: seen.append(k.shape[1]) or (q, k, v))
            with torch.no_grad():
                self.model(ids[:1, :2], use_cache=False)
        return seen[0]

    # ---- EAP by autograd -----------------------------------------------------------------
    def receiver_grads(self, ids, target, distractor, embed=None):
        """(∂(Σ rows' metric)/∂(each receiver's own input) [b, s, d] in receiver order, this
        run's sender values [b, s, U, d]): autograd at a zero probe on every receiver."""
        if self.KV is None:
            self.KV = self._kv_heads(ids)
        b, s = ids.shape
        d = self.model.config.hidden_size
        R = len(self.receivers())
        probes = {r: torch.zeros(b, s, d, requires_grad=True) for r in range(R)}
        with torch.enable_grad():
            m, senders = self.run(ids, target, distractor, probes=probes, embed=embed)
            return torch.autograd.grad(m.sum(), [probes[r] for r in range(R)]), senders.detach()

    def eap(self, ids, cids, target, distractor, ig_steps=0, nodes=None):
        """[U, R]: (corrupted − clean sender) · ∂m/∂(receiver's own input), averaged over rows;
        with ig_steps, the gradient averaged over token embeddings k / ig_steps of the way from
        the corrupted prompt's to the clean one's (k = 1..ig_steps), or integrated with another
        quadrature's nodes = (α's, weights)."""
        with torch.no_grad():
            _, corr = self.run(cids, target, distractor)
        R = len(self.receivers())
        grads, clean = self.receiver_grads(ids, target, distractor)
        if ig_steps:
            emb = token_embedding(self.model)
            with torch.no_grad():
                e1, e0 = emb(ids), emb(cids)
            alphas, weights = nodes or ([k / ig_steps for k in range(1, ig_steps + 1)], [1 / ig_steps] * ig_steps)
            steps = [self.receiver_grads(ids, target, distractor, e0 + a * (e1 - e0))[0] for a in alphas]
            grads = [sum(w * g[r] for w, g in zip(weights, steps)) for r in range(R)]
        b = ids.shape[0]
        out = torch.zeros(corr.shape[2], R)
        for r, (kind, l, _) in enumerate(self.receivers()):
            for u in range(self.n_up(kind, l)):
                out[u, r] = ((corr[:, :, u] - clean[:, :, u].detach()) * grads[r]).sum() / b
        return out


__all__ = ["HookedEdges", "model_type"]
