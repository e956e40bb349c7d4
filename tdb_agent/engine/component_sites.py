"""Which engine hook site each kind of component and each SAE site reads and writes
(docs/DESIGN.md §3). The one place these names are written: component ids, SAEs, the
attribution and ablation operations and the dataset builder all look them up here."""

from __future__ import annotations

#: where an SAE can sit, as named in component ids (`L{l}.{site}.F{i}`)
SAE_SITES = ("resid", "mlp", "attn")
#: SAE site -> the block's hook it reads (an SAE on `hook_resid_pre` of l+1 is filed as resid of l)
SAE_HOOKS = {"resid": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}
#: component kind -> the block's hook holding its activation (heads and neurons: one unit per index)
KIND_HOOKS = {"head": "attn.hook_z", "neuron": "mlp.hook_post", "attn": "hook_attn_out", "mlp": "hook_mlp_out"}
#: the embedding's write: the residual stream entering block 0
EMBED_SITE = "blocks.0.hook_resid_pre"
#: edge receiver kind -> the block's hook where what it reads arrives (ops/edges): each head's
#: q, k, v (after q/k norms and rotary) and the MLP's input (after its norm)
RECEIVER_HOOKS = {"q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v", "mlp": "ln2.hook_normalized"}
#: the residual stream entering a block, and between its attention and MLP (sequential blocks)
RESID_HOOKS = {"pre": "hook_resid_pre", "mid": "hook_resid_mid"}


def sae_site(layer: int, site: str) -> str:
    """The hook site an SAE at (layer, resid|mlp|attn) reads and writes."""
    return f"blocks.{layer}.{SAE_HOOKS[site]}"


def kind_site(kind: str, layer: int) -> str:
    """The hook site of a component kind (head, neuron, attn, mlp) in `layer`."""
    return f"blocks.{layer}.{KIND_HOOKS[kind]}"


def receiver_site(kind: str, layer: int) -> str:
    """The hook site where an edge receiver of `kind` (q, k, v, mlp) of block `layer` reads."""
    return f"blocks.{layer}.{RECEIVER_HOOKS[kind]}"


def resid_site(where: str, layer: int) -> str:
    """The residual stream entering block `layer` ("pre") or between its attention and MLP ("mid")."""
    return f"blocks.{layer}.{RESID_HOOKS[where]}"
