"""What an attention head writes where it is most active: the vocabulary direction of its
mean write z_h W_O[h] at its top examples, read through the logit lens (what it attends to
is read from the examples alone: heuristic.attention_clause)."""

from __future__ import annotations

import numpy as np
import torch

from tdb_agent.components import parse_component
from tdb_agent.datasets.store import ActivationDataset
from tdb_agent.engine import Engine
from tdb_agent.ops.lens import top_tokens


@torch.no_grad()
def head_write_tokens(engine: Engine, ds: ActivationDataset, component: str, ranks: list[int],
                      k: int = 3) -> list[str] | None:
    """Tokens the head's mean write at its top examples `ranks` promotes (logit lens, final
    norm's scale frozen): what it moves into the residual stream where it is most active.
    Each example's document runs up to the example's token."""
    c = parse_component(component)
    col = ds.column(component)
    starts = ds.a["top.start"][col]
    ranks = [j for j in ranks if starts[j] >= 0]
    if c.kind != "head" or not ranks:
        return None
    toks, doc_starts = ds.a["tokens"], ds.doc_starts
    pos = [int(starts[j] + ds.a["top.center"][col, j]) for j in ranks]
    first = [int(doc_starts[np.searchsorted(doc_starts, p, side="right") - 1]) for p in pos]
    s = max(p + 1 - f for p, f in zip(pos, first))
    ids = torch.zeros((len(pos), s), dtype=torch.long)
    for i, (p, f) in enumerate(zip(pos, first)):
        ids[i, : p + 1 - f] = torch.from_numpy(toks[f: p + 1].astype(np.int64))
    site = f"blocks.{c.layer}.attn.hook_z"
    _, cache = engine.run_with_cache(ids.to(engine.device), [site], stop_layer=c.layer + 1)
    last = torch.tensor([p - f for p, f in zip(pos, first)], device=cache[site].device)
    z = cache[site][torch.arange(len(pos), device=last.device), last, c.index].float()  # [n, d_head]
    write = (z @ engine.adapter.W_O(c.layer)[c.index].float()).mean(0)
    return [t.strip() for t, _ in top_tokens(engine, write, k)[0]]
