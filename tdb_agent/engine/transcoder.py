"""Transcoders: sparse replacements of the MLPs, and their splice into the forward pass.

A transcoder feature of layer l reads the MLP input of layer l and writes to the MLP output
of layer l (per-layer transcoder, PLT) or of every layer o >= l (cross-layer transcoder,
CLT). In our own layout, for each layer l that has one:

    f_l      = act(x_l @ W_enc[l] + b_enc[l])            x_l: the read site of layer l
    mlp_out_o ~ sum_{l <= o} f_l @ W_dec[l][:, o - l] + b_dec[o] + x_o @ W_skip[o]

W_enc [d_in, d_tc], W_dec [d_tc, n_out, d_model] (n_out = 1 for a PLT), W_skip [d_in,
d_model] (optional). The read site is `mlp_in` (the MLP's input, after its norm:
TransformerLens `blocks.{l}.ln2.hook_normalized`) or `resid_mid` (before the norm).

Files read: the SAELens transcoder folder (`cfg.json` with architecture `transcoder`,
`skip_transcoder` or `jumprelu_transcoder`, `hook_name`, `hook_name_out`; weights W_enc
[d_in, d_sae], W_dec [d_sae, d_out], b_enc, b_dec, W_skip [d_out, d_in], threshold), and
circuit-tracer's layouts: a PLT set (`config.yaml` listing one safetensors file per layer,
W_enc/W_dec [d_tc, d_model], W_skip [d_model, d_model] applied as x @ W_skip.T) and a CLT
folder (`W_enc_{l}.safetensors` with W_enc_{l} [d_tc, d_model], b_enc_{l}, b_dec_{l},
threshold_{l}?, W_skip_{l}? applied as x @ W_skip; `W_dec_{l}.safetensors` with W_dec_{l}
[d_tc, n_layers - l, d_model]).

Spliced with the error term kept (as SAEs, engine/sae.py): the MLP output of layer o
becomes mlp_out_o + sum_{l <= o} (f'_l - f_l) @ W_dec[l][:, o - l], which is the unchanged
tensor until a feature is rewritten. Features are components `L{l}.tc.F{i}` (docs/DESIGN.md §3).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tdb_agent.errors import TdbError

FeatureFn = Callable[[torch.Tensor], "torch.Tensor | None"]
READ_SITES = {"mlp_in": "ln2.hook_normalized", "resid_mid": "hook_resid_mid"}
_HOOK_RE = re.compile(r"blocks\.(\d+)\.(ln2\.hook_normalized|hook_resid_mid|hook_mlp_in|mlp\.hook_in)")


class TranscoderError(TdbError):
    pass


@dataclass
class LayerTranscoder:
    """The features that read layer `layer` (see the module docstring for the maths)."""

    layer: int
    W_enc: torch.Tensor  # [d_in, d_tc]
    b_enc: torch.Tensor  # [d_tc]
    W_dec: torch.Tensor  # [d_tc, n_out, d_model]
    b_dec: torch.Tensor  # [d_model]: the output bias of this layer's MLP output
    W_skip: torch.Tensor | None = None  # [d_in, d_model]
    threshold: torch.Tensor | None = None  # [d_tc] (JumpReLU)
    k: int | None = None  # TopK

    @property
    def d_tc(self) -> int:
        return self.W_enc.shape[1]

    @property
    def n_out(self) -> int:
        return self.W_dec.shape[1]

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.W_enc.dtype) @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.k is not None:
            top = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        if self.threshold is not None:
            return torch.relu(pre) * (pre > self.threshold)
        return torch.relu(pre)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_acts(x))

    def skip(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.W_skip is None else x.to(self.W_skip.dtype) @ self.W_skip

    def fingerprint(self) -> str:
        """Hash of the weights (as float32), k and layer: activation datasets record it."""
        h = hashlib.sha256(json.dumps({"layer": self.layer, "k": self.k, "d_tc": self.d_tc}).encode())
        for t in (self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.W_skip, self.threshold):
            if t is not None:
                h.update(t.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def to(self, device=None, dtype=None) -> "LayerTranscoder":
        mv = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return LayerTranscoder(self.layer, mv(self.W_enc), mv(self.b_enc), mv(self.W_dec), mv(self.b_dec),
                               mv(self.W_skip), mv(self.threshold), self.k)


class TranscoderSet:
    """The transcoders attached to an engine: one LayerTranscoder per covered layer."""

    def __init__(self, layers: dict[int, LayerTranscoder], read_site: str = "mlp_in", n_layers: int | None = None,
                 source: str = ""):
        if read_site not in READ_SITES:
            raise TranscoderError(f"transcoder read site {read_site!r} is not supported; supported: "
                                  f"{', '.join(READ_SITES)}")
        if not layers:
            raise TranscoderError("a transcoder set needs at least one layer")
        self.layers = dict(sorted(layers.items()))
        self.read_site = read_site
        self.source = source
        self.n_layers = n_layers
        for l, tc in self.layers.items():
            if n_layers is not None and l + tc.n_out > n_layers:
                raise TranscoderError(f"the transcoder of layer {l} writes to {tc.n_out} layers, past the model's "
                                      f"{n_layers} layers")

    @property
    def cross_layer(self) -> bool:
        return any(tc.n_out > 1 for tc in self.layers.values())

    def sizes(self) -> dict[int, int]:
        return {l: tc.d_tc for l, tc in self.layers.items()}

    def get(self, layer: int) -> LayerTranscoder:
        if layer not in self.layers:
            raise TranscoderError(f"no transcoder reads layer {layer}; transcoders: "
                                  f"{', '.join(f'L{l}' for l in self.layers)}")
        return self.layers[layer]

    def read_hook(self, layer: int) -> str:
        return f"blocks.{layer}.{READ_SITES[self.read_site]}"

    def writers(self, out_layer: int) -> list[LayerTranscoder]:
        """The transcoders whose features write to the MLP output of `out_layer`."""
        return [tc for l, tc in self.layers.items() if l <= out_layer < l + tc.n_out]

    def to(self, device) -> "TranscoderSet":
        return TranscoderSet({l: tc.to(device) for l, tc in self.layers.items()}, self.read_site, self.n_layers,
                             self.source)

    def check(self, d_model: int, n_layers: int, parallel_residual: bool) -> None:
        if self.read_site == "resid_mid" and parallel_residual:
            raise TranscoderError("read site resid_mid does not exist in a parallel-residual model; use mlp_in")
        for l, tc in self.layers.items():
            if not 0 <= l < n_layers or l + tc.n_out > n_layers:
                raise TranscoderError(f"the transcoder of layer {l} (writing {tc.n_out} layers) does not fit the "
                                      f"model's {n_layers} layers")
            if tc.W_enc.shape[0] != d_model or tc.W_dec.shape[-1] != d_model:
                raise TranscoderError(f"the transcoder of layer {l} has d_in={tc.W_enc.shape[0]}, d_out="
                                      f"{tc.W_dec.shape[-1]}; the model's d_model is {d_model}")
        self.n_layers = n_layers

    # ------------------------------------------------------------------ splice
    def splice_hooks(self, feature_fns: dict[int, list[FeatureFn]] | None = None,
                     capture: dict | None = None) -> dict[str, list]:
        """Engine hooks: encode at each read site, let `feature_fns[l]` rewrite the features
        [b, s, d_tc] of layer l, capture them (capture[l]), and add the change of the
        reconstruction to every MLP output the features write to (error term kept)."""
        fns = feature_fns or {}
        state: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        hooks: dict[str, list] = {}
        for l, tc in self.layers.items():
            def read(x, _site, l=l, tc=tc):
                f = tc.encode(x)
                new = f
                for fn in fns.get(l, ()):
                    out = fn(new)
                    if out is not None:
                        new = out
                state[l] = (f, new)
                if capture is not None:
                    capture[l] = new
                return None
            hooks.setdefault(self.read_hook(l), []).append(read)
        outs = sorted({o for l, tc in self.layers.items() for o in range(l, l + tc.n_out)})
        for o in outs:
            def write(x, _site, o=o):
                delta = None
                for tc in self.writers(o):
                    f, new = state[tc.layer]
                    if new is f:
                        continue
                    d = (new - f) @ tc.W_dec[:, o - tc.layer]
                    delta = d if delta is None else delta + d
                return None if delta is None else x + delta.to(x.dtype)
            hooks.setdefault(f"blocks.{o}.hook_mlp_out", []).append(write)
        return hooks

    # ------------------------------------------------------------------ files
    def save(self, folder: str | Path, model_name: str | None = None, dtype: torch.dtype = torch.float32) -> Path:
        """Per-layer transcoders as SAELens transcoder folders `L{l}/` (PLT only)."""
        if self.cross_layer:
            raise TranscoderError("saving a cross-layer transcoder is not supported (SAELens layout is per layer)")
        folder = Path(folder)
        for l, tc in self.layers.items():
            sub = folder / f"L{l}"
            sub.mkdir(parents=True, exist_ok=True)
            t = {"W_enc": tc.W_enc, "b_enc": tc.b_enc, "W_dec": tc.W_dec[:, 0], "b_dec": tc.b_dec}
            if tc.W_skip is not None:
                t["W_skip"] = tc.W_skip.T
            if tc.threshold is not None:
                t["threshold"] = tc.threshold
            save_file({k: v.detach().to("cpu", dtype).contiguous() for k, v in t.items()},
                      str(sub / "sae_weights.safetensors"))
            arch = "jumprelu_transcoder" if tc.threshold is not None else (
                "skip_transcoder" if tc.W_skip is not None else "transcoder")
            cfg = {"architecture": arch, "d_in": tc.W_enc.shape[0], "d_sae": tc.d_tc, "d_out": tc.W_dec.shape[-1],
                   "hook_name": self.read_hook(l), "hook_name_out": f"blocks.{l}.hook_mlp_out",
                   "model_name": model_name, "dtype": str(dtype).removeprefix("torch.")}
            if tc.k is not None:
                cfg["k"] = tc.k
            (sub / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
        return folder


def _read_site_of(hook_name: str) -> tuple[int, str]:
    m = _HOOK_RE.fullmatch(hook_name)
    if not m:
        raise TranscoderError(f"transcoder hook_name {hook_name!r} is not supported; transcoders read "
                              "blocks.{l}.ln2.hook_normalized (the MLP input) or blocks.{l}.hook_resid_mid")
    return int(m.group(1)), "resid_mid" if m.group(2) in ("hook_resid_mid", "hook_mlp_in") else "mlp_in"


def _need(weights: dict, names: list[str], where: str) -> None:
    missing = [n for n in names if n not in weights]
    if missing:
        raise TranscoderError(f"{where} lacks {missing}")


def load_saelens(folder: Path) -> tuple[LayerTranscoder, str]:
    """One SAELens transcoder folder -> (its LayerTranscoder, its read site)."""
    cfg = json.loads((folder / "cfg.json").read_text())
    arch = cfg.get("architecture", "")
    if arch not in ("transcoder", "skip_transcoder", "jumprelu_transcoder"):
        raise TranscoderError(f"{folder}: architecture {arch!r} is not a transcoder (transcoder, skip_transcoder, "
                              "jumprelu_transcoder)")
    layer, site = _read_site_of(cfg.get("hook_name", ""))
    out = cfg.get("hook_name_out", f"blocks.{layer}.hook_mlp_out")
    if out != f"blocks.{layer}.hook_mlp_out":
        raise TranscoderError(f"{folder}: hook_name_out {out!r} must be blocks.{layer}.hook_mlp_out")
    w = load_file(str(folder / "sae_weights.safetensors"))
    _need(w, ["W_enc", "b_enc", "W_dec", "b_dec"], str(folder))
    if arch == "skip_transcoder":
        _need(w, ["W_skip"], str(folder))
    if arch == "jumprelu_transcoder":
        _need(w, ["threshold"], str(folder))
    f = lambda n: w[n].float() if n in w else None  # noqa: E731
    skip = f("W_skip")
    tc = LayerTranscoder(layer, f("W_enc"), f("b_enc"), f("W_dec")[:, None], f("b_dec"),
                         None if skip is None else skip.T.contiguous(), f("threshold"), cfg.get("k"))
    return tc, site


def _hook_site_name(hook: str) -> str:
    hook = hook.split(".", 2)[-1] if hook.startswith("blocks.") else hook
    if hook in ("ln2.hook_normalized", "mlp.hook_in"):
        return "mlp_in"
    if hook in ("hook_resid_mid", "hook_mlp_in"):
        return "resid_mid"
    raise TranscoderError(f"feature_input_hook {hook!r} is not supported (ln2.hook_normalized, hook_resid_mid)")


def load_circuit_tracer_clt(folder: Path, input_hook: str = "hook_resid_mid") -> TranscoderSet:
    """A circuit-tracer CLT folder (W_enc_{l}.safetensors + W_dec_{l}.safetensors per layer)."""
    layers = {}
    n = len(list(folder.glob("W_enc_*.safetensors")))
    for l in range(n):
        enc = load_file(str(folder / f"W_enc_{l}.safetensors"))
        dec = load_file(str(folder / f"W_dec_{l}.safetensors"))
        _need(enc, [f"W_enc_{l}", f"b_enc_{l}", f"b_dec_{l}"], f"W_enc_{l}.safetensors")
        _need(dec, [f"W_dec_{l}"], f"W_dec_{l}.safetensors")
        g = lambda n: enc[n].float() if n in enc else None  # noqa: E731
        W_dec = dec[f"W_dec_{l}"].float()
        if W_dec.shape[1] != n - l:
            raise TranscoderError(f"W_dec_{l} has shape {tuple(W_dec.shape)}; a CLT over {n} layers needs "
                                  f"[d_tc, {n - l}, d_model]")
        layers[l] = LayerTranscoder(l, g(f"W_enc_{l}").T.contiguous(), g(f"b_enc_{l}"), W_dec, g(f"b_dec_{l}"),
                                    g(f"W_skip_{l}"), g(f"threshold_{l}"))
    return TranscoderSet(layers, _hook_site_name(input_hook), source=str(folder))


def load_circuit_tracer_plt(folder: Path) -> TranscoderSet:
    """A circuit-tracer PLT set: `config.yaml` (feature_input_hook, transcoders: [files])."""
    import yaml

    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    site = _hook_site_name(cfg.get("feature_input_hook", "hook_resid_mid"))
    layers = {}
    for l, path in enumerate(cfg.get("transcoders") or []):
        p = Path(str(path).removeprefix("file://"))
        w = load_file(str(p if p.is_absolute() else folder / p))
        _need(w, ["W_enc", "b_enc", "W_dec", "b_dec"], str(p))
        if "log_thresholds" in w:
            raise TranscoderError(f"{p}: log_thresholds are not supported (store threshold)")
        f = lambda n: w[n].float() if n in w else None  # noqa: E731
        skip = f("W_skip")
        layers[l] = LayerTranscoder(l, f("W_enc").T.contiguous(), f("b_enc"), f("W_dec")[:, None], f("b_dec"),
                                    None if skip is None else skip.T.contiguous(), f("threshold"))
    return TranscoderSet(layers, site, source=str(folder))


def load_transcoders(paths, read_site: str | None = None) -> TranscoderSet:
    """SAELens transcoder folders (one per layer), or one circuit-tracer PLT/CLT folder."""
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    for p in paths:
        if not p.is_dir():
            raise TranscoderError(f"transcoder path {str(p)!r} is not a folder")
    if len(paths) == 1 and (paths[0] / "W_enc_0.safetensors").exists():
        return load_circuit_tracer_clt(paths[0], READ_SITES[read_site or "resid_mid"])
    if len(paths) == 1 and (paths[0] / "config.yaml").exists():
        return load_circuit_tracer_plt(paths[0])
    folders = []
    for p in paths:  # a folder of L{l}/ subfolders counts as its subfolders
        folders += [p] if (p / "cfg.json").exists() else sorted(q for q in p.iterdir() if (q / "cfg.json").exists())
    if not folders:
        raise TranscoderError(f"no transcoder found in {[str(p) for p in paths]} (SAELens cfg.json folders, a "
                              "circuit-tracer config.yaml, or W_enc_0.safetensors)")
    layers, sites = {}, set()
    for f in folders:
        tc, site = load_saelens(f)
        if tc.layer in layers:
            raise TranscoderError(f"two transcoders read layer {tc.layer}")
        layers[tc.layer] = tc
        sites.add(site)
    if len(sites) > 1:
        raise TranscoderError(f"the transcoders read different sites {sorted(sites)}; one set reads one site")
    return TranscoderSet(layers, sites.pop(), source=",".join(str(p) for p in paths))


def tc_sizes(engine) -> dict[tuple[int, str], int]:
    """{(layer, "tc"): feature count}: merged into the SAE sizes that component ids are
    range-checked against (components.TC_SITE)."""
    tcs = getattr(engine, "transcoders", None)
    return {} if tcs is None else {(l, "tc"): n for l, n in tcs.sizes().items()}


BUNDLED_TRANSCODERS = Path(__file__).resolve().parent.parent / "assets" / "transcoders"


def attach_transcoders(engine, paths=(), bundled: bool = True) -> TranscoderSet | None:
    """Attach a transcoder set to `engine.transcoders`; with `bundled`, the shipped ones of
    the bundled model when it is loaded and no path was given."""
    if paths:
        tcs = load_transcoders(paths)
    elif bundled and engine.name == "tdb-tiny" and BUNDLED_TRANSCODERS.is_dir():
        tcs = load_transcoders(BUNDLED_TRANSCODERS)
    else:
        return None
    tcs.check(engine.spec.d_model, engine.spec.n_layers, engine.spec.parallel_residual)
    engine.transcoders = tcs.to(engine.device)
    return engine.transcoders
