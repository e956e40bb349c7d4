"""Component ids (docs/DESIGN.md §3): the vocabulary every tool, graph and file shares.

    EMB                 token (+ position) embedding
    L{l}.H{h}           attention head h of layer l (its write z·W_O)
    L{l}.ATTN / L{l}.MLP  a whole attention / MLP block's output
    L{l}.N{n}           MLP neuron n of layer l (post-activation)
    L{l}.{site}.F{i}    latent i of the SAE at site resid|mlp|attn of layer l
    L{l}.tc.F{i}        feature i of the transcoder that reads layer l's MLP input
    LOGITS              the metric node

An optional `@t` pins a node to token position t (0-based), e.g. `L5.H1@12`.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict

from tdb_agent.engine.component_sites import EMBED_SITE, SAE_SITES, kind_site, sae_site
from tdb_agent.engine.spec import ModelSpec
from tdb_agent.errors import UnknownComponent

Kind = Literal["emb", "head", "attn", "mlp", "neuron", "sae", "transcoder", "logits"]
TC_SITE = "tc"  # sae_sizes key (layer, "tc") holds a transcoder's feature count (engine/transcoder.py)

GRAMMAR = ("EMB | L{l}.H{h} | L{l}.ATTN | L{l}.MLP | L{l}.N{n} | L{l}.{" + "|".join(SAE_SITES) + "}.F{i} | "
           "L{l}.tc.F{i} | LOGITS, optionally with @t for a token position (e.g. L1.H3@7)")

_PATTERNS: list[tuple[Kind, re.Pattern]] = [
    ("emb", re.compile(r"EMB")),
    ("logits", re.compile(r"LOGITS")),
    ("head", re.compile(r"L(?P<layer>[0-9]+)\.H(?P<index>[0-9]+)")),
    ("attn", re.compile(r"L(?P<layer>[0-9]+)\.ATTN")),
    ("mlp", re.compile(r"L(?P<layer>[0-9]+)\.MLP")),
    ("neuron", re.compile(r"L(?P<layer>[0-9]+)\.N(?P<index>[0-9]+)")),
    ("sae", re.compile(r"L(?P<layer>[0-9]+)\.(?P<site>" + "|".join(SAE_SITES) + r")\.F(?P<index>[0-9]+)")),
    ("transcoder", re.compile(r"L(?P<layer>[0-9]+)\.tc\.F(?P<index>[0-9]+)")),
]


_DIGITS = re.compile(r"[0-9]+")


class Component(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: Kind
    layer: int | None = None
    index: int | None = None
    sae_site: str | None = None
    position: int | None = None

    @property
    def id(self) -> str:
        base = {
            "emb": "EMB",
            "logits": "LOGITS",
            "head": f"L{self.layer}.H{self.index}",
            "attn": f"L{self.layer}.ATTN",
            "mlp": f"L{self.layer}.MLP",
            "neuron": f"L{self.layer}.N{self.index}",
            "sae": f"L{self.layer}.{self.sae_site}.F{self.index}",
            "transcoder": f"L{self.layer}.tc.F{self.index}",
        }[self.kind]
        return base if self.position is None else f"{base}@{self.position}"

    def at(self, position: int | None) -> "Component":
        return self.model_copy(update={"position": position})

    def __str__(self) -> str:
        return self.id


def parse_component(text: str, spec: ModelSpec | None = None, n_positions: int | None = None,
                    sae_sizes: dict[tuple[int, str], int] | None = None) -> Component:
    """Parse and (given the model's spec) range-check a component id."""
    if not isinstance(text, str):
        raise UnknownComponent(f"a component id must be a string like 'L1.H3', not {type(text).__name__}")
    raw = text.strip()
    body, _, pos = raw.partition("@")
    position = None
    if pos:
        if not _DIGITS.fullmatch(pos):  # ASCII only: str.isdigit() also accepts '²', which int() refuses
            raise UnknownComponent(f"bad position in {raw!r}: '@' must be followed by a token index (digits 0-9)")
        position = int(pos)
    for kind, pat in _PATTERNS:
        m = pat.fullmatch(body)
        if m:
            g = m.groupdict()
            comp = Component(kind=kind, layer=int(g["layer"]) if g.get("layer") else None,
                             index=int(g["index"]) if g.get("index") else None,
                             sae_site=g.get("site"), position=position)
            if spec is not None:
                _check_ranges(comp, raw, spec, n_positions, sae_sizes)
            return comp
    raise UnknownComponent(f"unknown component {raw!r}; ids look like {GRAMMAR}")


def _check_ranges(c: Component, raw: str, spec: ModelSpec, n_positions: int | None,
                  sae_sizes: dict[tuple[int, str], int] | None) -> None:
    if c.layer is not None and not 0 <= c.layer < spec.n_layers:
        raise UnknownComponent(f"{raw!r}: layer {c.layer} is out of range; layers are 0..{spec.n_layers - 1}")
    if c.kind == "head" and not 0 <= c.index < spec.n_heads:
        raise UnknownComponent(f"{raw!r}: head {c.index} is out of range; heads are 0..{spec.n_heads - 1}")
    if c.kind == "neuron" and not 0 <= c.index < spec.d_mlp:
        raise UnknownComponent(f"{raw!r}: neuron {c.index} is out of range; neurons are 0..{spec.d_mlp - 1}")
    if c.kind == "sae":
        size = (sae_sizes or {}).get((c.layer, c.sae_site))
        if size is None:
            have = ", ".join(f"L{l}.{s}" for l, s in sorted(sae_sizes or {}) if s != TC_SITE) or "none"
            raise UnknownComponent(f"{raw!r}: no SAE is loaded at L{c.layer}.{c.sae_site}; loaded SAEs: {have}")
        if not 0 <= c.index < size:
            raise UnknownComponent(f"{raw!r}: latent {c.index} is out of range; latents are 0..{size - 1}")
    if c.kind == "transcoder":
        size = (sae_sizes or {}).get((c.layer, TC_SITE))
        if size is None:
            have = ", ".join(f"L{l}" for l, s in sorted(sae_sizes or {}) if s == TC_SITE) or "none"
            raise UnknownComponent(f"{raw!r}: no transcoder reads layer {c.layer}; transcoders: {have}")
        if not 0 <= c.index < size:
            raise UnknownComponent(f"{raw!r}: feature {c.index} is out of range; features are 0..{size - 1}")
    if c.position is not None and n_positions is not None and not 0 <= c.position < n_positions:
        raise UnknownComponent(f"{raw!r}: position {c.position} is out of range; the prompt has "
                               f"{n_positions} tokens (0..{n_positions - 1})")


def hook_site(c: Component) -> tuple[str, int | None]:
    """The engine site a component reads and writes, and its unit index there."""
    if c.kind == "emb":
        return EMBED_SITE, None
    if c.kind in ("head", "neuron"):
        return kind_site(c.kind, c.layer), c.index
    if c.kind in ("attn", "mlp"):
        return kind_site(c.kind, c.layer), None
    if c.kind == "sae":  # the SAE's site; the unit is the latent (spliced, see engine/sae.py)
        return sae_site(c.layer, c.sae_site), c.index
    if c.kind == "transcoder":  # where the feature writes (its own layer's MLP output)
        return kind_site("mlp", c.layer), c.index
    raise UnknownComponent(f"{c.id} has no hook site of its own")
