"""What edge methods read from a run: the prompt pairs batched by length and every sender's
output (the gradient at every receiver's input is grads.py's).

Sender outputs [b, s, n_senders, d] (or kept in parts, `SenderActs`, until a chunk of
positions needs them): EMB is the residual stream entering block 0 (token and
position embeddings), a head's output is z_h · W_O[h] (its bias-free write), an MLP's is the
block's output. Biases are the same in every run, so they cancel in every difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from tdb_agent.engine import Engine
from tdb_agent.errors import TdbError
from tdb_agent.ops.edges.graph import check_supported
from tdb_agent.ops.metrics import MetricName, make_metric
from tdb_agent.ops.runs import RunCache, get_means


class Pair(Protocol):
    """A prompt pair (circuits.pairs.PromptPair has this shape)."""

    prompt: str
    corrupted_prompt: str | None
    target: str
    distractor: str | None


@dataclass
class PairGroup:
    """Pairs of one token length, batched together."""

    index: list[int]
    ids: torch.Tensor  # [n, s]
    corrupted: torch.Tensor | None  # [n, s]
    target: torch.Tensor  # [n]
    distractor: torch.Tensor | None  # [n]


def group_pairs(engine: Engine, pairs: Sequence[Pair], need_corrupted: bool,
                metric: MetricName | None = None) -> tuple[list[PairGroup], MetricName]:
    """Tokenise the pairs, check them, and group them by length (one batch per length)."""
    check_supported(engine)
    if not pairs:
        raise TdbError("edge methods need at least one prompt pair")
    name: MetricName = metric or ("logit_diff" if all(p.distractor for p in pairs) else "logprob")
    rows: dict[int, list] = {}
    for i, p in enumerate(pairs):
        m = make_metric(engine, p.target, p.distractor if name == "logit_diff" else None, name)
        ids = engine.to_tokens(p.prompt)
        cids = None
        if need_corrupted:
            if not p.corrupted_prompt:
                raise TdbError(f"pair {i} has no corrupted_prompt; the corrupted reference needs one for every "
                               "pair (or use reference='mean')")
            cids = engine.to_tokens(p.corrupted_prompt)
            if cids.shape[1] != ids.shape[1]:
                raise TdbError(f"pair {i}: the corrupted prompt has {cids.shape[1]} tokens but the prompt has "
                               f"{ids.shape[1]}; edge patching needs prompts of the same length")
        rows.setdefault(ids.shape[1], []).append((i, ids, cids, m))
    groups = []
    dev = engine.device
    for rs in rows.values():
        groups.append(PairGroup(
            index=[r[0] for r in rs], ids=torch.cat([r[1] for r in rs]),
            corrupted=torch.cat([r[2] for r in rs]) if need_corrupted else None,
            target=torch.tensor([r[3].target_id for r in rs], device=dev),
            distractor=torch.tensor([r[3].distractor_id for r in rs], device=dev) if name == "logit_diff" else None))
    return groups, name


def metric_rows(logits: torch.Tensor, target: torch.Tensor, distractor: torch.Tensor | None) -> torch.Tensor:
    """The metric of each row from last-position logits [n, vocab] (docs/DESIGN.md §4)."""
    t = logits.gather(-1, target[:, None])[:, 0]
    if distractor is not None:
        return t - logits.gather(-1, distractor[:, None])[:, 0]
    return t.float() - torch.logsumexp(logits.float(), dim=-1)


@dataclass
class SenderActs:
    """What sender outputs are made of: the residual stream entering block 0 [.., d], each
    layer's z [.., H, d_head] (a head's output is z_h · W_O[h]) and MLP output [.., d]. From a
    run ([b, s, ..]) or corpus means (no batch and position axes)."""

    emb: torch.Tensor
    z: list[torch.Tensor]
    mlp: list[torch.Tensor]

    def __sub__(self, other: "SenderActs") -> SenderActs:
        return SenderActs(self.emb - other.emb, [a - b for a, b in zip(self.z, other.z)],
                          [a - b for a, b in zip(self.mlp, other.mlp)])

    @classmethod
    def from_acts(cls, engine: Engine, acts: dict[str, torch.Tensor], rows: slice = slice(None)) -> SenderActs:
        L = engine.spec.n_layers
        return cls(acts["blocks.0.hook_resid_pre"][rows].detach(),
                   [acts[f"blocks.{l}.attn.hook_z"][rows].detach() for l in range(L)],
                   [acts[f"blocks.{l}.hook_mlp_out"][rows].detach() for l in range(L)])


def sender_sites(engine: Engine) -> list[str]:
    sites = ["blocks.0.hook_resid_pre"]
    for l in range(engine.spec.n_layers):
        sites += [f"blocks.{l}.attn.hook_z", f"blocks.{l}.hook_mlp_out"]
    return sites


def head_outputs(engine: Engine, layer: int, z: torch.Tensor) -> torch.Tensor:
    """Each head's write z_h · W_O[h]: [..., heads, d_head] -> [..., heads, d_model]."""
    return torch.einsum("...hk,hkd->...hd", z, engine.adapter.W_O(layer).to(z.dtype))


def senders_from(engine: Engine, acts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sender outputs [b, s, n_senders, d] (or [n_senders, d] from means) from captured sites."""
    parts = [acts["blocks.0.hook_resid_pre"].unsqueeze(-2)]
    for l in range(engine.spec.n_layers):
        parts += [head_outputs(engine, l, acts[f"blocks.{l}.attn.hook_z"]),
                  acts[f"blocks.{l}.hook_mlp_out"].unsqueeze(-2)]
    return torch.cat(parts, dim=-2)


@torch.no_grad()
def run_senders(engine: Engine, ids: torch.Tensor) -> torch.Tensor:
    """Sender outputs of a plain run of `ids` [b, s] -> [b, s, n_senders, d]."""
    _, acts = engine.run_with_cache(ids, sender_sites(engine), logit_positions=[-1], logit_ids=[0])
    return senders_from(engine, acts)


@torch.no_grad()
def reference_acts(engine: Engine, ids: torch.Tensor) -> SenderActs:
    """The sender parts of a plain run of `ids` [b, s] (what EAP's reference run keeps)."""
    _, acts = engine.run_with_cache(ids, sender_sites(engine), logit_positions=[-1], logit_ids=[0])
    return SenderActs.from_acts(engine, acts)


def mean_acts(engine: Engine, cache: RunCache | None) -> SenderActs:
    """The sender parts averaged over the reference corpus (ops/runs.py)."""
    return SenderActs.from_acts(engine, get_means(engine, sender_sites(engine), cache))


def mean_senders(engine: Engine, cache: RunCache | None) -> torch.Tensor:
    """Sender outputs averaged over the reference corpus (ops/runs.py): [n_senders, d]."""
    return senders_from(engine, get_means(engine, sender_sites(engine), cache))


def mean_embedding(engine: Engine, cache: RunCache | None) -> torch.Tensor:
    """The mean token embedding (`hook_embed`) over the reference corpus: [d]."""
    return get_means(engine, ["hook_embed"], cache)["hook_embed"]
