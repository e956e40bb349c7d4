"""What "everything outside the circuit" means, as masks over the model's hook sites.

The universe of ablatable components is every attention head and every MLP block:

* heads are ablated at `blocks.{l}.attn.hook_z` (their own z, so z·W_O is replaced);
  `L{l}.ATTN` in a circuit keeps all heads of layer l;
* MLP blocks are ablated at `blocks.{l}.hook_mlp_out`; but in a layer where the circuit
  names neurons (`L{l}.N{n}`), that layer is ablated neuron by neuron at
  `blocks.{l}.mlp.hook_post`, so the named neurons survive and the others do not (the MLP
  output is linear in its neurons, so ablating them all equals ablating the block);
* the embeddings (`EMB`) are never ablated: every circuit reads its input;
* a node pinned with `@t` is kept only at position t and ablated at every other position.

A `KeepSet` maps each kept unit to the positions where it is kept (None = all).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from tdb_agent.components import parse_component
from tdb_agent.engine.component_sites import kind_site
from tdb_agent.engine.spec import ModelSpec
from tdb_agent.errors import TdbError

UNIVERSE = ("every attention head (at hook_z) and every MLP block (at hook_mlp_out; neuron by neuron at "
            "mlp.hook_post in layers where the circuit names neurons); embeddings are never ablated")
POSITIONS = "all positions; a node pinned with @t is kept only at position t"

Unit = tuple  # ("head", l, h) | ("mlp", l) | ("neuron", l, n)
KeepSet = dict[Unit, frozenset[int] | None]


def _merge(keep: KeepSet, unit: Unit, position: int | None) -> None:
    if unit in keep and keep[unit] is None:
        return
    keep[unit] = None if position is None else (keep.get(unit) or frozenset()) | {position}


def keep_set(nodes: Iterable[str], spec: ModelSpec) -> KeepSet:
    """The units a circuit keeps (EMB and LOGITS keep nothing: they are never ablated)."""
    keep: KeepSet = {}
    for node in nodes:
        c = parse_component(node)
        if c.kind == "sae":
            raise TdbError(f"{c.id}: SAE latents cannot be validated by ablation yet; describe the circuit "
                           "with heads, MLPs or neurons (the latent's layer MLP or attention block)")
        if c.kind == "transcoder":
            raise TdbError(f"{c.id}: a transcoder feature is ablated in the feature universe "
                           "(circuits/features.py: feature_keep_set), not among heads and MLP blocks")
        c = parse_component(node, spec)
        if c.kind == "head":
            _merge(keep, ("head", c.layer, c.index), c.position)
        elif c.kind == "attn":
            for h in range(spec.n_heads):
                _merge(keep, ("head", c.layer, h), c.position)
        elif c.kind == "mlp":
            _merge(keep, ("mlp", c.layer), c.position)
        elif c.kind == "neuron":
            _merge(keep, ("neuron", c.layer, c.index), c.position)
    return keep


def full_set(spec: ModelSpec) -> KeepSet:
    keep: KeepSet = {("head", l, h): None for l in range(spec.n_layers) for h in range(spec.n_heads)}
    keep.update({("mlp", l): None for l in range(spec.n_layers)})
    return keep


def universe_size(spec: ModelSpec) -> int:
    return spec.n_layers * (spec.n_heads + 1)


def check_positions(keep: KeepSet, n_tokens: int, what: str) -> None:
    for unit, pos in keep.items():
        if pos is not None and max(pos) >= n_tokens:
            raise TdbError(f"a node pinned at position {max(pos)} is out of range for {what}, which has "
                           f"{n_tokens} tokens (0..{n_tokens - 1}); pinned circuits need prompts of one template")


def neuron_layers(keep: KeepSet) -> set[int]:
    return {u[1] for u in keep if u[0] == "neuron"}


def _positions_index(pos: frozenset[int] | None) -> slice | list[int]:
    """The positions a unit is kept at, as an index of the position axis."""
    return slice(None) if pos is None else sorted(pos)


def ablation_masks(keeps: list[KeepSet], spec: ModelSpec, n_tokens: int,
                   post_layers: set[int], layers: Iterable[int] | None = None) -> dict[str, torch.Tensor]:
    """Per-site boolean masks (True = ablate) for a batch whose row i keeps `keeps[i]`.

    hook_z: [b, s, heads, 1]; hook_mlp_out: [b, s, 1]; mlp.hook_post: [b, s, d_mlp] (only for
    `post_layers`, where rows without neurons in that layer ablate at hook_mlp_out instead).
    layers: only those blocks' sites (default: every block); units elsewhere are skipped.
    """
    wanted = set(range(spec.n_layers)) if layers is None else set(layers)
    first: dict[frozenset, int] = {}  # rows keeping the same units share one mask row (a batch of
    rows = [first.setdefault(frozenset(k.items()), len(first)) for k in keeps]  # pairs x few sets)
    if len(first) < len(keeps):
        distinct = ablation_masks([dict(k) for k in first], spec, n_tokens, post_layers, wanted)
        index = torch.tensor(rows)
        return {site: m[index] for site, m in distinct.items()}
    b, s, L, H = len(keeps), n_tokens, spec.n_layers, spec.n_heads
    head_keep = torch.zeros(b, s, L, H, dtype=torch.bool)
    mlp_keep = torch.zeros(b, s, L, dtype=torch.bool)
    post_keep = {l: torch.zeros(b, s, spec.d_mlp, dtype=torch.bool) for l in post_layers if l in wanted}
    neuron_rows = {l: torch.zeros(b, dtype=torch.bool) for l in post_keep}
    for i, keep in enumerate(keeps):
        for unit, pos in keep.items():
            if unit[1] not in wanted:
                continue
            p = _positions_index(pos)
            if unit[0] == "head":
                head_keep[i, p, unit[1], unit[2]] = True
            elif unit[0] == "mlp":
                mlp_keep[i, p, unit[1]] = True
                if unit[1] in post_keep:
                    post_keep[unit[1]][i, p] = True
            else:
                post_keep[unit[1]][i, p, unit[2]] = True
                neuron_rows[unit[1]][i] = True
    masks: dict[str, torch.Tensor] = {}
    for l in sorted(wanted):
        masks[kind_site("head", l)] = ~head_keep[:, :, l, :, None]
        out_ablate = ~mlp_keep[:, :, l, None]
        if l in post_keep:
            rows = neuron_rows[l]
            out_ablate = out_ablate & ~rows[:, None, None]  # those rows ablate neuron by neuron
            masks[kind_site("neuron", l)] = ~post_keep[l] & rows[:, None, None]
        masks[kind_site("mlp", l)] = out_ablate
    return masks
