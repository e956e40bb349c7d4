"""The contexts an explanation is scored on (Delphi-style): activating windows drawn across
the activation range (held-out top examples and the quantile sample), non-activating
windows (the random sample plus fresh corpus windows), and hard negatives: corpus windows
that contain the explanation's surface tokens but where the component does not fire.

"Fires" means an activation of at least mean + `FIRE_FRACTION` x (max - mean) somewhere in
the window (relative to the mean, so that dense components such as heads, whose write norm
is never zero, still have windows that do not fire). Fresh windows are read in their document (the model runs on the
whole document, as when the dataset was built), so their activations are comparable."""

from __future__ import annotations

import re
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, Field

from tdb_agent.components import parse_component
from tdb_agent.datasets.store import ActivationDataset, Example
from tdb_agent.engine import Engine
from tdb_agent.engine.sae import engine_site
from tdb_agent.errors import TdbError
from tdb_agent.explain.heuristic import CATEGORIES, simulate_offline
from tdb_agent.tasks import vocab as V

FIRE_FRACTION = 0.4
ROUNDS = 4  # batches of candidate windows tried per kind of negative
Source = Literal["top", "quantile", "random", "corpus", "hard_negative"]
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]+")
_NOT_SURFACE = set(V.FUNCTION_WORDS) | {"fires", "token", "tokens", "after", "before", "such", "attends", "boosts",
                                        "words", "word", "current", "previous", "e.g"}


class Context(BaseModel):
    tokens: list[str]
    activations: list[float]
    source: Source
    fires: bool = Field(description="activation >= the firing threshold somewhere in the window")


class ScoringSet(BaseModel):
    threshold: float = Field(description="firing threshold: mean + FIRE_FRACTION x (max - mean)")
    contexts: list[Context]
    forward_passes: int = Field(description="document prefixes run through the model to draw fresh windows")


def surface_tokens(explanation: str) -> set[str]:
    """The tokens an explanation names on its surface: what the offline reader would mark
    (quoted tokens, members of a named category) and content words of its 'fires on'
    clause."""
    clause = explanation.split(";")[0]
    words = {w for w in _WORD.findall(clause.replace("'", " ")) if w.lower() not in _NOT_SURFACE and len(w) > 2}
    marked = words | set(re.findall(r"'([^']+)'", clause))
    probe = sorted(set().union(*CATEGORIES.values()))  # what the offline reader predicts (category members)
    return marked | {t for t, s in zip(probe, simulate_offline(explanation, probe)) if s > 0}


def _window(start: int, end: int, pos: int, width: int, lead: int) -> tuple[int, int]:
    a = max(start + 1, pos - lead)  # position 0 of a document (BOS) is never shown
    b = min(end, a + width)
    return a, b


@torch.no_grad()
def activation_of(engine: Engine, component: str, ids: torch.Tensor) -> torch.Tensor:
    """One component's per-token activation [b, s] as the dataset defines it (docs/DESIGN.md
    §6; datasets/builder.py computes every column at once): a neuron's post-activation, a
    head's write norm |z_h W_O[h]|, an SAE latent, a transcoder feature. The model runs only up to its layer."""
    c = parse_component(component)
    tcs = getattr(engine, "transcoders", None)
    if c.kind == "transcoder" and tcs is None:
        raise TdbError(f"{component}: no transcoders are loaded")
    site = {"neuron": f"blocks.{c.layer}.mlp.hook_post", "head": f"blocks.{c.layer}.attn.hook_z",
            "sae": engine_site(c.layer, c.sae_site) if c.kind == "sae" else "",
            "transcoder": tcs.read_hook(c.layer) if c.kind == "transcoder" else ""}[c.kind]
    _, cache = engine.run_with_cache(ids, [site], stop_layer=c.layer + 1)
    x = cache[site]
    if c.kind == "neuron":
        return x[..., c.index].float()
    if c.kind == "head":
        return (x[..., c.index, :].float() @ engine.adapter.W_O(c.layer)[c.index].float()).norm(dim=-1)
    if c.kind == "transcoder":  # TopK over a token's features: the whole encoding, then the column
        return tcs.get(c.layer).encode(x.float())[..., c.index].float()
    return engine.saes.get(c.layer, c.sae_site).encode(x.float())[..., c.index].float()


@torch.no_grad()
def fresh_windows(engine: Engine, ds: ActivationDataset, component: str, positions: list[int],
                  width: int, lead: int) -> list[tuple[list[str], list[float]]]:
    """Windows around corpus token positions, with the component's activations computed by
    running each window's document from its start up to the window's end (later tokens
    cannot change them), all in one batch."""
    if not positions:
        return []
    toks, lens, starts = ds.a["tokens"], ds.a["doc_lengths"], ds.doc_starts
    docs = (np.searchsorted(starts, positions, side="right") - 1).tolist()
    spans = [(int(starts[d]),) + _window(int(starts[d]), int(starts[d] + lens[d]), p, width, lead)
             for p, d in zip(positions, docs)]
    s = max(b - st for st, _, b in spans)
    ids = torch.zeros((len(spans), s), dtype=torch.long)  # right padding is never read (causal)
    for j, (st, _, b) in enumerate(spans):
        ids[j, : b - st] = torch.from_numpy(toks[st:b].astype(np.int64))
    acts = activation_of(engine, component, ids.to(engine.device)).cpu()  # moved once
    vocab = ds.vocab
    return [([vocab[int(t)] for t in toks[a:b]], acts[j, a - st: b - st].tolist()) for j, (st, a, b) in enumerate(spans)]


def corpus_sample(engine: Engine, ds: ActivationDataset, component: str, n: int, seed: int) -> list[Context]:
    """n windows at random corpus positions, firing or not (typical text), read in their
    documents."""
    cfg = ds.manifest.get("config", {})
    first = np.zeros(len(ds.a["tokens"]), bool)
    first[ds.doc_starts] = True
    pos = np.random.default_rng(seed).choice(np.flatnonzero(~first), n, replace=False).tolist()
    threshold = firing_threshold(ds, component)
    return [Context(tokens=t, activations=a, source="corpus", fires=_fires(a, threshold))
            for t, a in fresh_windows(engine, ds, component, pos, int(cfg.get("window", 20)), int(cfg.get("lead", 16)))]


def firing_threshold(ds: ActivationDataset, component: str) -> float:
    st = ds.stats(component)
    return st.mean + FIRE_FRACTION * (st.max - st.mean) if st.max > st.mean else float("inf")


def _fires(acts: list[float], threshold: float) -> bool:
    return bool(acts) and max(acts) >= threshold


def draw_contexts(engine: Engine, ds: ActivationDataset, component: str, explanation: str,
                  held_top: list[Example], held_quantile: list[Example] | None = None, *, n_hard: int = 10,
                  n_corpus: int = 10, seed: int = 0) -> ScoringSet:
    """Activating contexts across the activation range, non-activating ones and hard
    negatives for one component (see the module docstring). `held_top`, `held_quantile`:
    the top and quantile examples the explanation was NOT written from (all quantile
    examples when None)."""
    threshold = firing_threshold(ds, component)
    contexts = [Context(tokens=e.tokens, activations=e.activations, source=g,
                        fires=_fires(e.activations, threshold))
                for g, group in (("top", held_top), ("quantile", ds.examples(component, "quantile") if held_quantile is None
                                              else held_quantile),
                                 ("random", ds.examples(component, "random"))) for e in group]
    cfg = ds.manifest.get("config", {})
    width, lead = int(cfg.get("window", 20)), int(cfg.get("lead", 16))
    rng = np.random.default_rng(seed)
    toks = ds.a["tokens"]
    first = np.zeros(len(toks), bool)
    first[ds.doc_starts] = True  # BOS positions are never candidates
    surface = surface_tokens(explanation)
    vocab = ds.vocab
    ids = [i for i, t in enumerate(vocab) if t.strip() in surface]
    hard_cands = np.flatnonzero(np.isin(toks, ids) & ~first) if ids else np.zeros(0, int)
    passes = 0
    for source, cands, want in (("hard_negative", hard_cands, n_hard), ("corpus", np.flatnonzero(~first), n_corpus)):
        order = rng.permutation(cands)[: ROUNDS * want].tolist() if len(cands) and want else []
        kept = 0
        for i in range(0, len(order), max(want, 1)):  # a batch of candidates at a time, until enough do not fire
            batch = order[i: i + want]
            passes += len(batch)
            for tokens, acts in fresh_windows(engine, ds, component, batch, width, lead):
                if kept < want and not _fires(acts, threshold):  # a window that fires is no negative
                    kept += 1
                    contexts.append(Context(tokens=tokens, activations=acts, source=source, fires=False))
            if kept >= want:
                break
    return ScoringSet(threshold=threshold, contexts=contexts, forward_passes=passes)
