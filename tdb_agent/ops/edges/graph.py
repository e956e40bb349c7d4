"""The edge graph of ACDC, EAP and the MIB circuit track.

Senders (nodes that write to the residual stream), in topological order:

    EMB, L0.H0 .. L0.H{H-1}, L0.MLP, L1.H0, ..., L{L-1}.MLP

Receivers (nodes that read it), each head's query, key and value inputs kept apart:

    per layer l: L{l}.H{h}.q (H of them), the key and value inputs (one per key/value head:
    L{l}.H{h}.k / .v, or L{l}.KV{g}.k / .v under grouped-query attention, where one input
    feeds a group of query heads), L{l}.MLP; then LOGITS.

Sender u feeds receiver r when u is upstream of r: heads and MLP blocks of earlier layers,
plus the same layer's heads for that layer's MLP (unless the block is parallel, as in
GPT-NeoX, where the MLP reads the block's input). Because senders are in topological order,
the senders of a receiver are always a prefix of the sender list (`n_upstream`).

GPT-2 small (12 layers, 12 heads): 32,491 edges (`count_edges`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Literal

import torch

from tdb_agent.engine.spec import ModelSpec

Via = Literal["q", "k", "v", "direct"]


@dataclass(frozen=True)
class Receiver:
    name: str  # "L1.H2.q", "L1.KV0.k", "L1.MLP", "LOGITS"
    kind: Literal["q", "k", "v", "mlp", "logits"]
    layer: int  # n_layers for LOGITS
    index: int  # head (q), key/value head (k, v), 0 otherwise
    heads: tuple[str, ...]  # the circuit node(s) it belongs to: "L1.H2" (query heads of a group), "L1.MLP", "LOGITS"

    @property
    def via(self) -> Via:
        return self.kind if self.kind in ("q", "k", "v") else "direct"


#: model types whose receivers' reads (ops/edges/heads.py) and senders' writes (capture.py)
#: are written out; each is tested against hand-written hooks on the plain transformers
#: model (tests/test_edges_families.py)
EDGE_MODEL_TYPES = ("gpt2", "gpt_neox", "llama", "qwen2", "mistral", "qwen3", "phi3", "gemma", "gemma2",
                    "gemma3_text", "olmo2", "stablelm", "gpt_neo", "gptj", "opt", "falcon", "cohere")


def check_supported(engine) -> None:
    """Refuse a family whose blocks the edge methods do not decompose exactly."""
    from tdb_agent.errors import TdbError
    model_type = getattr(engine.model.config, "model_type", None)
    if model_type not in EDGE_MODEL_TYPES:
        raise TdbError(f"edge methods (EAP, edge patching) support the model types {', '.join(EDGE_MODEL_TYPES)}; "
                       f"this model is {model_type!r}. Use the node-level tools (attribute, ablate, "
                       "circuit_validate) instead")
    a = engine.adapter
    if a.post_attn_norm(0) is not None and a.b_O(0) is not None:
        raise TdbError(f"this {model_type} model has an attention output bias before its post-norm: the bias's "
                       "share of the block's write changes with the norm's scale from run to run, so the heads' "
                       "edges do not add up to the residual stream. Use the node-level tools instead")


def count_edges(n_layers: int, n_heads: int, n_kv_heads: int | None = None, parallel: bool = False) -> int:
    """Edges of the graph in closed form (used to check `EdgeGraph`)."""
    kv = n_kv_heads or n_heads
    total = 0
    for l in range(n_layers):
        up = 1 + l * (n_heads + 1)
        total += (n_heads + 2 * kv) * up + up + (0 if parallel else n_heads)
    return total + 1 + n_layers * (n_heads + 1)


class EdgeGraph:
    """Senders, receivers and which sender feeds which receiver, for one model shape."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        L, H, KV = spec.n_layers, spec.n_heads, spec.n_kv_heads
        self.senders: list[str] = ["EMB"]
        for l in range(L):
            self.senders += [f"L{l}.H{h}" for h in range(H)] + [f"L{l}.MLP"]
        group = H // KV
        recv: list[Receiver] = []
        up: list[int] = []
        for l in range(L):
            before = 1 + l * (H + 1)
            recv += [Receiver(f"L{l}.H{h}.q", "q", l, h, (f"L{l}.H{h}",)) for h in range(H)]
            for kind in ("k", "v"):
                for g in range(KV):
                    heads = tuple(f"L{l}.H{h}" for h in range(g * group, (g + 1) * group))
                    name = f"L{l}.H{g}.{kind}" if KV == H else f"L{l}.KV{g}.{kind}"
                    recv.append(Receiver(name, kind, l, g, heads))
            up += [before] * (H + 2 * KV)
            recv.append(Receiver(f"L{l}.MLP", "mlp", l, 0, (f"L{l}.MLP",)))
            up.append(before + (0 if spec.parallel_residual else H))
        recv.append(Receiver("LOGITS", "logits", L, 0, ("LOGITS",)))
        up.append(len(self.senders))
        self.receivers = recv
        self.n_upstream = up
        self.receiver_index = {r.name: i for i, r in enumerate(recv)}
        self.sender_index = {s: i for i, s in enumerate(self.senders)}

    @property
    def n_senders(self) -> int:
        return len(self.senders)

    @property
    def n_receivers(self) -> int:
        return len(self.receivers)

    @cached_property
    def valid(self) -> torch.Tensor:
        """[n_senders, n_receivers] bool: which (sender, receiver) pairs are edges."""
        up = torch.tensor(self.n_upstream)
        return torch.arange(self.n_senders)[:, None] < up[None, :]

    @property
    def n_edges(self) -> int:
        return int(self.valid.sum())

    def layer_receivers(self, layer: int) -> slice:
        """Receivers of block `layer`: its q, k, v inputs then its MLP."""
        H, KV = self.spec.n_heads, self.spec.n_kv_heads
        start = layer * (H + 2 * KV + 1)
        return slice(start, start + H + 2 * KV + 1)

    def edge_name(self, s: int, r: int) -> str:
        return f"{self.senders[s]}->{self.receivers[r].name}"

    def parse_edge(self, name: str) -> tuple[int, int]:
        """(sender index, receiver index) of "SENDER->RECEIVER" (e.g. "L0.H1->L1.H3.k")."""
        from tdb_agent.errors import TdbError
        src, _, dst = name.replace(" ", "").partition("->")
        if src not in self.sender_index or dst not in self.receiver_index:
            raise TdbError(f"unknown edge {name!r}: edges are SENDER->RECEIVER with senders EMB, L{{l}}.H{{h}}, "
                           f"L{{l}}.MLP and receivers L{{l}}.H{{h}}.q|k|v, L{{l}}.MLP, LOGITS (e.g. "
                           f"{self.edge_name(0, 0)!r})")
        s, r = self.sender_index[src], self.receiver_index[dst]
        if not self.valid[s, r]:
            raise TdbError(f"{src} does not feed {dst} (a receiver reads only senders upstream of it)")
        return s, r


def edge_graph(spec: ModelSpec) -> EdgeGraph:
    """The edge graph of this model shape, made once per shape (its names, masks and index
    maps cost more than a small model's EAP bookkeeping). Shared: treat it as read-only."""
    return _graph_of(spec.model_dump_json())


@lru_cache(maxsize=16)
def _graph_of(spec_json: str) -> EdgeGraph:
    return EdgeGraph(ModelSpec.model_validate_json(spec_json))
