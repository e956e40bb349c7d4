"""The local replacement model: the real model with attention patterns and norm scales frozen
at their clean values and the MLPs (or residual-stream sites) replaced by dictionary nodes.

What is frozen and how (engine hooks plus forward hooks on the norm modules, all removed on
exit):
* every norm (ln1, ln2, final) computes (x - mean x) * s_clean * w + b (LayerNorm) or
  x * s_clean * w (RMSNorm) with s_clean its clean scale, so it is affine in x;
* every attention pattern is its clean pattern, so attention is affine in its input (values).
  The graph's own forward (`Replacement.forward`) does not hook the pattern: it takes the
  values and replaces the head outputs with clean pattern @ values, one [heads, T, T] matmul
  for all copies of the batch, so nothing of size T x T is made per copy; the engine's own
  attention then gets no queries and the replaced MLPs no positions (nothing wasted);
* `blocks.0.hook_resid_pre` (the embeddings) is a leaf;
* `blocks.{o}.hook_mlp_out` is b_dec[o] + skip_o(x_o) + a leaf: the leaf's clean value is the
  sum of the transcoder feature writes and the error (the whole MLP output where no
  transcoder writes);
* with residual SAEs instead, `blocks.{l}.hook_resid_post` is b_dec + a leaf (latent writes
  plus error), which cuts everything upstream: edges reach the next SAE layer only.

The frozen model is therefore affine in the leaves; with the leaves at their clean values it
reproduces the clean forward (tested), with the leaves at zero it gives each target's bias.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from tdb_agent.engine import Engine
from tdb_agent.engine.norms import apply_norm, norm_eps, norm_scale
from tdb_agent.errors import TdbError


def norm_modules(engine: Engine) -> dict[str, torch.nn.Module]:
    """The blocks' norms on the paths the graph follows (ln1, ln2, post-attention norms);
    the final norm is frozen through the engine's sites (it may not run as a module)."""
    a = engine.adapter
    mods = {}
    for l in range(engine.spec.n_layers):
        for name, mod in (("ln1", a.ln1(l)), ("ln2", a.ln2(l)), ("post_attn", a.post_attn_norm(l))):
            if mod is not None:
                mods[f"L{l}.{name}"] = mod
    return mods


def freeze_hooks(engine: Engine, clean: "CleanState", engine_hooks: dict, patterns: bool = True) -> list:
    """Add to `engine_hooks` the clean attention patterns (unless `patterns` is False: the
    caller freezes attention through the values) and the frozen final norm (last position);
    return the (module, hook) pairs that freeze the blocks' norms."""
    final = engine.adapter.final_norm()
    resid: dict[int, torch.Tensor] = {}
    engine_hooks.setdefault("hook_resid_final", []).append(lambda x, s: resid.__setitem__(0, x))
    engine_hooks.setdefault("ln_final.hook_normalized", []).append(
        lambda x, s: frozen_norm(engine, final, resid[0][:, -1:], clean.scales["final"]).to(x.dtype))
    for l, pat in (clean.patterns.items() if patterns else ()):
        engine_hooks.setdefault(f"blocks.{l}.attn.hook_pattern", []).append(
            lambda x, s, pat=pat: pat.expand(x.shape[0], -1, -1, -1))

    def freeze(key):
        return lambda mod, args, out: frozen_norm(engine, mod, args[0], clean.scales[key])
    return [(m, freeze(k)) for k, m in norm_modules(engine).items()]


def frozen_values_hooks(clean: "CleanState", engine_hooks: dict, layers) -> None:
    """Add to `engine_hooks`: head outputs z = clean pattern @ values, batched over copies
    as one [heads, T, T] @ [heads, T, copies * d_head] product (GQA: values repeated)."""
    for l in layers:
        pat = clean.patterns[l][0]  # [H, T, T]
        vals: dict[int, torch.Tensor] = {}
        engine_hooks.setdefault(f"blocks.{l}.attn.hook_v", []).append(
            lambda x, s, vals=vals: vals.__setitem__(0, x) or x)

        def z_hook(x, s, vals=vals, pat=pat):
            v = vals.pop(0)  # [b, T, kv, dh]
            b, t, kv, dh = v.shape
            H = pat.shape[0]
            if kv != H:
                v = v.repeat_interleave(H // kv, dim=2)
            vv = v.permute(2, 1, 0, 3).reshape(H, t, b * dh)
            z = torch.bmm(pat.to(vv.dtype), vv).reshape(H, t, b, dh).permute(2, 1, 0, 3)
            return z.to(x.dtype)
        engine_hooks.setdefault(f"blocks.{l}.attn.hook_z", []).append(z_hook)


def scale_of(engine: Engine, mod, x: torch.Tensor) -> torch.Tensor:
    return norm_scale(x, engine.spec.norm, norm_eps(mod))


def frozen_norm(engine: Engine, mod, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The norm with its scale frozen at `scale`: affine in x."""
    return apply_norm(engine.adapter, mod, x, engine.spec.norm, frozen=True, scale=scale).to(x.dtype)


@contextmanager
def module_hooks(pairs):
    """(module, forward hook) pairs installed for the block, removed on exit."""
    handles = []
    try:
        for mod, fn in pairs:
            handles.append(mod.register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class Dictionary:
    """The dictionary nodes of one layer: which site they read, how they write."""

    layer: int
    read: str  # engine site read
    write_site: str  # "mlp" (transcoders: blocks.{o}.hook_mlp_out) or "resid" (SAE: hook_resid_post)
    pre_acts: object  # x [.., d] -> pre-activations [.., n]
    encode: object
    W_enc: torch.Tensor  # [d, n]
    b_enc: torch.Tensor  # [n]
    in_offset: torch.Tensor | None  # subtracted from x before W_enc (SAE b_dec), else None
    W_dec: torch.Tensor  # [n, n_out, d]


@dataclass
class CleanState:
    """Everything the frozen model takes from the clean run."""

    ids: torch.Tensor
    scales: dict[str, torch.Tensor]
    patterns: dict[int, torch.Tensor]
    reads: dict[int, torch.Tensor]  # dictionary read site of layer l -> [s, d]
    emb: torch.Tensor  # [s, d]
    mlp_out: dict[int, torch.Tensor]
    resid_post: dict[int, torch.Tensor]
    logits: torch.Tensor  # last position, full vocabulary


class Replacement:
    """The local replacement model of one prompt (see the module docstring)."""

    def __init__(self, engine: Engine, ids: torch.Tensor):
        self.engine = engine
        self.mode = "transcoders" if engine.transcoders is not None else "saes"
        self.dicts: dict[int, Dictionary] = {}
        if self.mode == "transcoders":
            tcs = engine.transcoders
            for l, tc in tcs.layers.items():
                self.dicts[l] = Dictionary(l, tcs.read_hook(l), "mlp", tc.pre_acts, tc.encode, tc.W_enc, tc.b_enc,
                                           None, tc.W_dec)
        else:
            for (l, site), sae in engine.saes.items():
                if site != "resid":
                    continue
                off = sae.b_dec if sae.cfg.apply_b_dec_to_input else None
                self.dicts[l] = Dictionary(l, f"blocks.{l}.hook_resid_post", "resid", sae.pre_acts, sae.encode,
                                           sae.W_enc, sae.b_enc, off, sae.W_dec[:, None])
            if not self.dicts:
                raise TdbError("an attribution graph needs transcoders (--transcoders) or residual-stream SAEs "
                               "(--sae on hook_resid_post); this model has neither")
        self.res_layers = sorted(l for l, d in self.dicts.items() if d.write_site == "resid")
        self.mlp_layers = list(range(engine.spec.n_layers))
        self.clean = self._capture(ids)

    # ------------------------------------------------------------------ output terms
    def out_bias(self, o: int) -> torch.Tensor | None:
        """b_dec of the MLP output of layer o (transcoders) or of resid_post (SAE)."""
        if self.mode == "transcoders":
            tc = self.engine.transcoders.layers.get(o)
            return None if tc is None else tc.b_dec
        sae = self.engine.saes.get(o, "resid")
        return sae.b_dec

    def skip(self, o: int, x: torch.Tensor) -> torch.Tensor | None:
        if self.mode != "transcoders" or o not in self.engine.transcoders.layers:
            return None
        return self.engine.transcoders.layers[o].skip(x)

    # ------------------------------------------------------------------ clean run
    @torch.no_grad()
    def _capture(self, ids: torch.Tensor) -> CleanState:
        e = self.engine
        scales, patterns, reads, mlp_out, resid_post = {}, {}, {}, {}, {}
        emb = {}
        hooks: dict[str, list] = {"blocks.0.hook_resid_pre": [lambda x, s: emb.__setitem__(0, x[0])],
                                  "hook_resid_final": [lambda x, s: scales.__setitem__(
                                      "final", scale_of(e, e.adapter.final_norm(), x[:, -1:]))]}
        for l in range(e.spec.n_layers):
            hooks.setdefault(f"blocks.{l}.attn.hook_pattern", []).append(
                lambda x, s, l=l: patterns.__setitem__(l, x))
            hooks.setdefault(f"blocks.{l}.hook_mlp_out", []).append(lambda x, s, l=l: mlp_out.__setitem__(l, x[0]))
        for l, d in self.dicts.items():
            hooks.setdefault(d.read, []).append(lambda x, s, l=l: reads.__setitem__(l, x[0]))
        for l in self.res_layers:
            hooks.setdefault(f"blocks.{l}.hook_resid_post", []).append(
                lambda x, s, l=l: resid_post.__setitem__(l, x[0]))

        def grab(key):
            def fn(mod, args, out):
                scales[key] = scale_of(e, mod, args[0])
            return fn
        with module_hooks([(m, grab(k)) for k, m in norm_modules(e).items()]):
            out = e.forward(ids, hooks=hooks, logit_positions=[-1])
        return CleanState(ids=ids, scales=scales, patterns=patterns, reads=reads, emb=emb[0], mlp_out=mlp_out,
                          resid_post=resid_post, logits=out.logits[0, -1])

    @torch.no_grad()
    def clean_score(self, layer: int, head: int, query: int, key: int) -> float:
        """One attention score of the clean run (a forward; the T x T scores are not kept)."""
        got: dict[int, float] = {}
        hook = {f"blocks.{layer}.attn.hook_attn_scores": [
            lambda x, s: got.__setitem__(0, float(x[0, head, query, key])) or x]}
        self.engine.forward(self.clean.ids, hooks=hook, logit_positions=[-1])
        return got[0]

    # ------------------------------------------------------------------ frozen forward
    def forward(self, leaves: dict, batch: int, logit_ids: list[int] | None, extra_hooks=None):
        """Run the frozen model on `batch` copies. leaves: 'emb' [b, s, d], ('mlp', o) and
        ('res', l) tensors. Returns (logits [b, len(logit_ids)], reads {l: [b, s, d]},
        captured extra sites)."""
        e, c = self.engine, self.clean
        reads: dict[int, torch.Tensor] = {}
        hooks: dict[str, list] = {"blocks.0.hook_resid_pre": [lambda x, s: leaves["emb"]]}
        norms = freeze_hooks(e, c, hooks, patterns=False)
        frozen_values_hooks(c, hooks, c.patterns)
        for l, d in self.dicts.items():
            hooks.setdefault(d.read, []).append(lambda x, s, l=l: reads.__setitem__(l, x))
        for o in self.mlp_layers:
            def mlp(x, s, o=o):
                y = leaves[("mlp", o)]
                b = self.out_bias(o) if self.mode == "transcoders" else None
                sk = self.skip(o, reads[o]) if o in reads else None
                y = y if b is None else y + b
                return y if sk is None else y + sk
            hooks.setdefault(f"blocks.{o}.hook_mlp_out", []).append(mlp)
        for l in self.res_layers:
            hooks.setdefault(f"blocks.{l}.hook_resid_post", []).append(
                lambda x, s, l=l: leaves[("res", l)] + self.out_bias(l))
        for site, fns in (extra_hooks or {}).items():
            hooks.setdefault(site, []).extend(fns if isinstance(fns, list) else [fns])
        for l in range(e.spec.n_layers):  # last in line, after every hook that reads them:
            # each MLP's output is replaced by its leaf, so the MLP runs on no positions, and
            # attention outputs are clean pattern @ values, so the kernel gets no queries
            hooks.setdefault(f"blocks.{l}.ln2.hook_normalized", []).append(lambda x, s: x[:, :0])
            hooks.setdefault(f"blocks.{l}.attn.hook_q", []).append(lambda x, s: x[:, :0])
        ids = c.ids.expand(batch, -1)
        with module_hooks(norms):
            out = e.forward(ids, hooks=hooks, logit_positions=[-1], logit_ids=logit_ids)
        return out.logits[:, -1], reads

    def leaf_names(self) -> list:
        return ["emb"] + [("mlp", o) for o in self.mlp_layers] + [("res", l) for l in self.res_layers]
