"""Sparse autoencoders in the SAELens folder layout, and their splice into the forward pass.

A folder holds `cfg.json` (d_in, d_sae, hook_name, architecture, ...) and
`sae_weights.safetensors` (W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec, plus
`threshold` for JumpReLU). Architectures: ReLU ("standard"), TopK (`k` in cfg) and JumpReLU.

Splicing keeps the SAE's error term, so the spliced model computes exactly what the
original does until a latent is changed:

    out = x + (decode(f') - decode(f)),   f = encode(x), f' = f after latent interventions

With f' = f the difference is exactly zero (same tensor, same ops), so logits are
bit-identical; ablating latent i gives x - f_i W_dec[i] (its decoder contribution removed).

Latents are components `L{l}.{resid|mlp|attn}.F{i}` (docs/DESIGN.md §3); an SAE on
`blocks.{l+1}.hook_resid_pre` is the same tensor as `blocks.{l}.hook_resid_post` and is
filed as `L{l}.resid`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from tdb_agent.engine.component_sites import SAE_HOOKS, sae_site
from tdb_agent.errors import TdbError

Architecture = Literal["standard", "topk", "jumprelu"]
LatentFn = Callable[[torch.Tensor], "torch.Tensor | None"]

_SITE_RE = re.compile(r"blocks\.(\d+)\.(" + "|".join([*SAE_HOOKS.values(), "hook_resid_pre"]) + ")")
_SITE_KIND = {hook: site for site, hook in SAE_HOOKS.items()}


class SAEError(TdbError):
    pass


class SAEConfig(BaseModel):
    """The cfg.json fields we read; any others are kept and written back unchanged."""

    model_config = ConfigDict(extra="allow")

    d_in: int = Field(gt=0)
    d_sae: int = Field(gt=0)
    hook_name: str
    architecture: str = "standard"
    k: int | None = Field(None, description="active latents per token (topk)")
    apply_b_dec_to_input: bool = True
    normalize_activations: str | None = "none"
    model_name: str | None = None
    dtype: str | None = "float32"


def _normalise_cfg(raw: dict) -> dict:
    """Accept the variants SAELens has written over time (activation_fn_str, kwargs k)."""
    raw = dict(raw)
    arch = raw.get("architecture")
    act = raw.get("activation_fn_str") or raw.get("activation_fn")
    if arch in (None, "standard") and act == "topk":
        arch = "topk"
    if arch is None:
        arch = "standard"
    if arch == "relu":
        arch = "standard"
    if arch == "topk" and raw.get("k") is None:
        raw["k"] = (raw.get("activation_fn_kwargs") or {}).get("k")
    raw["architecture"] = arch
    return raw


def site_of(hook_name: str, n_layers: int | None = None) -> tuple[int, str]:
    """(layer, resid|mlp|attn) for an SAE's hook_name; resid_pre of l+1 is resid of l."""
    m = _SITE_RE.fullmatch(hook_name)
    if not m:
        raise SAEError(f"SAE hook_name {hook_name!r} is not supported; SAEs can sit on blocks.{{l}}."
                       "hook_resid_post, hook_resid_pre (l >= 1), hook_mlp_out or hook_attn_out")
    layer, name = int(m.group(1)), m.group(2)
    if name == "hook_resid_pre":
        if layer == 0:
            raise SAEError("an SAE on blocks.0.hook_resid_pre (the embedding) has no component id; "
                           "supported: resid_post / resid_pre of layer >= 1, mlp_out, attn_out")
        layer, name = layer - 1, "hook_resid_post"
    if n_layers is not None and not 0 <= layer < n_layers:
        raise SAEError(f"SAE hook_name {hook_name!r} is outside the model's layers 0..{n_layers - 1}")
    return layer, _SITE_KIND[name]


#: the hook site an SAE at (layer, site) reads and writes: the name explain/ imports (the
#: table itself is engine/component_sites.py)
engine_site = sae_site


class SAE(torch.nn.Module):
    def __init__(self, cfg: SAEConfig, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.cfg = cfg
        arch = cfg.architecture
        if arch not in ("standard", "topk", "jumprelu"):
            raise SAEError(f"SAE architecture {arch!r} is not supported; supported: standard (ReLU), topk, jumprelu")
        if arch == "topk" and not cfg.k:
            raise SAEError("a topk SAE needs `k` in cfg.json")
        if (cfg.normalize_activations or "none") != "none":
            raise SAEError(f"normalize_activations={cfg.normalize_activations!r} is not supported (only 'none')")
        need = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if arch == "jumprelu" else [])
        missing = [n for n in need if n not in weights]
        if missing:
            raise SAEError(f"sae_weights.safetensors lacks {missing}; a {arch} SAE needs {need}")
        shapes = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, cfg.d_in),
                  "b_dec": (cfg.d_in,), "threshold": (cfg.d_sae,)}
        for n in need:
            if tuple(weights[n].shape) != shapes[n]:
                raise SAEError(f"{n} has shape {tuple(weights[n].shape)}; cfg.json (d_in={cfg.d_in}, "
                               f"d_sae={cfg.d_sae}) needs {shapes[n]}")
        for n in need:
            self.register_buffer(n, weights[n].detach().clone().float())
        if arch != "jumprelu":
            self.threshold = None

    # ------------------------------------------------------------------ maths
    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(self.W_enc.dtype)
        if self.cfg.apply_b_dec_to_input:
            xf = xf - self.b_dec
        return xf @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        arch = self.cfg.architecture
        if arch == "standard":
            return torch.relu(pre)
        if arch == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        top = pre.topk(self.cfg.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_acts(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # ------------------------------------------------------------------ files
    @classmethod
    def load(cls, path: str | Path, allow_download: bool = False, device: str | torch.device = "cpu") -> "SAE":
        """A local SAELens folder, or `hf://repo_id[/subfolder]` / `repo_id/subfolder` from the
        hub when `allow_download` (never on the default path)."""
        folder = Path(path)
        if not folder.exists():
            if not allow_download:
                raise SAEError(f"SAE {str(path)!r} is not a local folder; pass allow_download=True "
                               "(CLI: --allow-download) to fetch it from the Hugging Face hub")
            folder = _download(str(path))
        cfg_file, w_file = folder / "cfg.json", folder / "sae_weights.safetensors"
        for f in (cfg_file, w_file):
            if not f.exists():
                raise SAEError(f"{folder} is not an SAE folder: {f.name} is missing (SAELens layout: cfg.json + "
                               "sae_weights.safetensors)")
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise SAEError(f"{cfg_file} is not valid JSON: {e}") from e
        try:
            cfg = SAEConfig.model_validate(_normalise_cfg(raw))
        except ValueError as e:
            raise SAEError(f"{cfg_file}: {e}") from e
        sae = cls(cfg, load_file(str(w_file)))
        sae.source = str(path)
        return sae.to(device)

    def save(self, folder: str | Path, dtype: torch.dtype = torch.float32) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        names = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if self.threshold is not None else [])
        tensors = {n: getattr(self, n).detach().to("cpu", dtype).contiguous() for n in names}
        save_file(tensors, str(folder / "sae_weights.safetensors"))
        cfg = self.cfg.model_dump()
        cfg["dtype"] = str(dtype).removeprefix("torch.")
        (folder / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
        return folder

    def fingerprint(self) -> str:
        """Hash of the weights (as float32) and cfg: datasets and explanations record it."""
        h = hashlib.sha256(json.dumps({"d_in": self.cfg.d_in, "d_sae": self.cfg.d_sae, "hook": self.cfg.hook_name,
                                       "arch": self.cfg.architecture, "k": self.cfg.k}).encode())
        for n in ("W_enc", "b_enc", "W_dec", "b_dec"):
            h.update(getattr(self, n).detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]


def _download(spec: str) -> Path:  # pragma: no cover - needs the network
    from huggingface_hub import snapshot_download

    spec = spec.removeprefix("hf://")
    parts = spec.split("/")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    root = Path(snapshot_download(repo, allow_patterns=[f"{sub}/*"] if sub else None))
    return root / sub if sub else root


class SAESet:
    """The SAEs attached to an engine, keyed by (layer, site)."""

    def __init__(self):
        self._saes: dict[tuple[int, str], SAE] = {}
        self.latent_means: dict[tuple[int, str], torch.Tensor] = {}

    def add(self, sae: SAE, n_layers: int, d_model: int, device=None) -> tuple[int, str]:
        key = site_of(sae.cfg.hook_name, n_layers)
        if sae.cfg.d_in != d_model:
            raise SAEError(f"the SAE at {sae.cfg.hook_name} has d_in={sae.cfg.d_in}, but the model's d_model is "
                           f"{d_model}")
        if key in self._saes:
            raise SAEError(f"an SAE is already attached at L{key[0]}.{key[1]}")
        self._saes[key] = sae if device is None else sae.to(device)
        self.latent_means.pop(key, None)
        return key

    def get(self, layer: int, site: str) -> SAE:
        key = (layer, site)
        if key not in self._saes:
            have = ", ".join(f"L{l}.{s}" for l, s in sorted(self._saes)) or "none"
            raise SAEError(f"no SAE is loaded at L{layer}.{site}; loaded SAEs: {have}")
        return self._saes[key]

    def sizes(self) -> dict[tuple[int, str], int]:
        return {k: s.d_sae for k, s in self._saes.items()}

    def items(self) -> list[tuple[tuple[int, str], SAE]]:
        return sorted(self._saes.items())

    def names(self) -> list[str]:
        return [f"L{l}.{s} ({sae.cfg.architecture}, d_sae={sae.d_sae})" for (l, s), sae in self.items()]

    def __len__(self) -> int:
        return len(self._saes)

    def __contains__(self, key) -> bool:
        return key in self._saes


def splice_hook(sae: SAE, latent_fns: list[LatentFn] | None = None,
                capture: dict | None = None, key=None):
    """Engine hook for the SAE's site: encode, let `latent_fns` rewrite the latents [b, s,
    d_sae], capture them, and add the change of the reconstruction to x (error term kept)."""
    fns = latent_fns or []

    def hook(x: torch.Tensor, _site: str):
        dev = sae.W_dec.device  # the SAE sits on the home device; the site may be elsewhere (device maps)
        x_in = x if x.device == dev else x.to(dev)
        f = sae.encode(x_in)
        new = f
        for fn in fns:
            out = fn(new)
            if out is not None:
                new = out
        if capture is not None:
            capture[key] = new
        if new is f:
            return None
        return x + (sae.decode(new) - sae.decode(f)).to(x.device, x.dtype)

    return hook


def load_saes(paths, engine, allow_download: bool = False) -> list[tuple[int, str]]:
    """Load SAE folders and attach them to `engine.saes`."""
    keys = []
    for p in paths:
        sae = SAE.load(p, allow_download=allow_download, device=engine.device)
        keys.append(engine.saes.add(sae, engine.spec.n_layers, engine.spec.d_model))
    return keys


BUNDLED_SAES = Path(__file__).resolve().parent.parent / "assets" / "saes"


def attach_saes(engine, paths=(), bundled: bool = True, allow_download: bool = False) -> list[tuple[int, str]]:
    """Attach SAE folders; with `bundled`, also the shipped SAEs of the bundled model when
    that model is loaded (its name is tdb-tiny) and no SAE was given for the same site."""
    keys = load_saes(paths, engine, allow_download=allow_download)
    if bundled and engine.name == "tdb-tiny" and BUNDLED_SAES.is_dir():
        for folder in sorted(p for p in BUNDLED_SAES.iterdir() if (p / "cfg.json").exists()):
            sae = SAE.load(folder, device=engine.device)
            if site_of(sae.cfg.hook_name, engine.spec.n_layers) not in engine.saes:
                keys.append(engine.saes.add(sae, engine.spec.n_layers, engine.spec.d_model))
    return keys
