"""The flat component table of an activation dataset: every MLP neuron, every attention
head, every latent of every attached SAE and every feature of the attached transcoders,
each with one column index; and the activations of those columns on a batch of documents.
Transcoder blocks come last, so adding transcoders leaves the other columns (and, as the
build's random draws are per column, their examples) unchanged."""

from __future__ import annotations

import hashlib

import torch
from pydantic import BaseModel

from tdb_agent.components import TC_SITE, Component, parse_component
from tdb_agent.engine import Engine
from tdb_agent.engine.component_sites import kind_site, sae_site
from tdb_agent.errors import UnknownComponent


class Block(BaseModel):
    kind: str  # neuron | head | sae | transcoder
    layer: int
    site: str | None = None  # sae: resid | mlp | attn; transcoder: tc
    n: int
    offset: int

    def prefix(self) -> str:
        return {"neuron": f"L{self.layer}.N", "head": f"L{self.layer}.H"}.get(
            self.kind, f"L{self.layer}.{self.site}.F")


def component_blocks(engine: Engine) -> list[Block]:
    spec = engine.spec
    blocks, off = [], 0
    for layer in range(spec.n_layers):
        blocks.append(Block(kind="neuron", layer=layer, n=spec.d_mlp, offset=off))
        off += spec.d_mlp
        blocks.append(Block(kind="head", layer=layer, n=spec.n_heads, offset=off))
        off += spec.n_heads
    for (layer, site), sae in engine.saes.items():
        blocks.append(Block(kind="sae", layer=layer, site=site, n=sae.d_sae, offset=off))
        off += sae.d_sae
    tcs = getattr(engine, "transcoders", None)
    for layer, n in (tcs.sizes() if tcs is not None else {}).items():
        blocks.append(Block(kind="transcoder", layer=layer, site=TC_SITE, n=n, offset=off))
        off += n
    return blocks


def n_components(blocks: list[Block]) -> int:
    return blocks[-1].offset + blocks[-1].n if blocks else 0


def column(blocks: list[Block], component: str | Component, spec=None) -> int:
    """Column of a component id (positions are ignored: datasets are over all positions)."""
    c = component if isinstance(component, Component) else parse_component(component)
    for b in blocks:
        if b.kind == c.kind and b.layer == c.layer and (c.kind != "sae" or b.site == c.sae_site):
            if not 0 <= c.index < b.n:
                raise UnknownComponent(f"{c.id}: index out of range 0..{b.n - 1}")
            return b.offset + c.index
    kinds = sorted({f"{b.prefix()}*" for b in blocks})
    raise UnknownComponent(f"the dataset has no component {c.id}; it covers MLP neurons, heads and the SAE latents "
                           f"and transcoder features {', '.join(k for k in kinds if '.F' in k) or '(none)'}")


def component_name(blocks: list[Block], col: int) -> str:
    for b in blocks:
        if b.offset <= col < b.offset + b.n:
            return f"{b.prefix()}{col - b.offset}"
    raise IndexError(col)


def model_fingerprint(engine: Engine) -> str:
    """Hash of the model's parameters (float32), independent of device and load dtype."""
    h = hashlib.sha256()
    modules = dict(engine.model.named_modules())
    for name, p in sorted(engine.model.state_dict().items()):
        if p.device.type == "meta":  # offloaded by a device map: read it from the offload store
            mod, _, leaf = name.rpartition(".")
            p = engine.param(modules[mod], leaf)
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def sae_fingerprints(engine: Engine) -> dict[str, str]:
    return {f"L{l}.{s}": sae.fingerprint() for (l, s), sae in engine.saes.items()}


def transcoder_fingerprints(engine: Engine) -> dict[str, str]:
    tcs = getattr(engine, "transcoders", None)
    return {} if tcs is None else {f"L{l}.{TC_SITE}": tc.fingerprint() for l, tc in tcs.layers.items()}


def component_activations(engine: Engine, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token activations of every column of `component_blocks` [b, s, C] (float32):
    neurons post-activation, heads the norm of their write z_h·W_O[h], SAE latents, transcoder
    features (read from their layer's MLP input); and, for every head, the most attended key
    position [b, s, n_layers * n_heads]."""
    spec = engine.spec
    tcs = getattr(engine, "transcoders", None)
    sites = []
    for layer in range(spec.n_layers):
        sites += [kind_site("neuron", layer), kind_site("head", layer), f"blocks.{layer}.attn.hook_pattern"]
    sites += [sae_site(layer, site) for (layer, site), _ in engine.saes.items()]
    sites += [tcs.read_hook(layer) for layer in tcs.layers] if tcs is not None else []
    _, acts = engine.run_with_cache(ids, list(dict.fromkeys(sites)), logit_positions=[-1], logit_ids=[0])
    parts, keys = [], []
    for layer in range(spec.n_layers):
        parts.append(acts[kind_site("neuron", layer)].float())
        z = acts[kind_site("head", layer)].float()  # [b, s, h, dh]
        W_O = engine.adapter.W_O(layer).float()  # [h, dh, d]
        gram = W_O @ W_O.transpose(1, 2)  # ||z_h W_O[h]||^2 = z_h G_h z_h: d_head^2 instead of d_head x d_model
        parts.append(torch.einsum("bshk,hkl,bshl->bsh", z, gram, z).clamp(min=0).sqrt())
        keys.append(acts[f"blocks.{layer}.attn.hook_pattern"].argmax(-1).transpose(1, 2))  # [b, q, h]
    for (layer, site), sae in engine.saes.items():
        parts.append(sae.encode(acts[sae_site(layer, site)]).float())
    for layer, tc in (tcs.layers.items() if tcs is not None else ()):
        parts.append(tc.encode(acts[tcs.read_hook(layer)]).float())
    return torch.cat(parts, -1), torch.cat(keys, -1)
