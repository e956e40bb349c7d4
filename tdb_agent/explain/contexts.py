"""The contexts an explanation is scored on (Delphi-style): activating windows drawn across
the activation range (held-out top examples, the quantile and random samples' windows that
fire), non-activating windows, and hard negatives: corpus windows that contain the
explanation's surface tokens but where the component does not fire.

The non-activating windows are drawn from the same documents as the activating ones
(`same_document`) and, where those fire throughout, from the documents whose text is most
like theirs (`similar_document`), never from the corpus at large. The synthetic corpus mixes
kinds of text (induction sequences of made-up words, IOI stories, year comparisons, facts,
narrative), and a component's activating windows concentrate in one kind: against windows of
typical text, any explanation that names a token common in that kind of text (made-up words,
function words, names) separates the two, whichever component it was written for. With
corpus-wide negatives, 13 of 40 random-label controls scored above chance; with matched
ones, 2 of 40 (evals/explanation_scores.py, which also pairs each explanation with a
component whose own explanation names other tokens). Matched, the kind of text is the same on both
sides, and detection asks what it should: which windows of such text fire.

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
Source = Literal["top", "quantile", "random", "corpus", "same_document", "similar_document", "hard_negative"]
MATCHED = (10, 30)  # fewest and most non-activating windows (as many as there are activating ones)
MAX_SIMILAR = 2048  # most similar documents run to find non-activating windows
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]+")
_NOT_SURFACE = set(V.FUNCTION_WORDS) | {"fires", "token", "tokens", "after", "before", "such", "attends", "boosts",
                                        "words", "word", "current", "previous", "e.g"}


class Context(BaseModel):
    tokens: list[str]
    activations: list[float]
    source: Source
    document: int | None = Field(None, description="document index in the dataset")
    fires: bool = Field(description="activation >= the firing threshold somewhere in the window")


class ScoringSet(BaseModel):
    threshold: float = Field(description="firing threshold: mean + FIRE_FRACTION x (max - mean)")
    contexts: list[Context]
    forward_passes: int = Field(description="documents and document prefixes run through the model to draw "
                                            "fresh windows")


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


def _draw_negatives(engine: Engine, ds: ActivationDataset, component: str, threshold: float,
                    source: Source, cands: list[int], want: int, width: int, lead: int) -> tuple[list[Context], int]:
    """Up to `want` windows that do not fire, around candidate positions tried in order, a
    batch of `want` at a time (at most ROUNDS batches); also the forward passes spent."""
    out: list[Context] = []
    passes = 0
    for i in range(0, min(len(cands), ROUNDS * want), max(want, 1)):
        batch = cands[i: i + want]
        passes += len(batch)
        docs = np.searchsorted(ds.doc_starts, batch, side="right") - 1
        for d, (tokens, acts) in zip(docs.tolist(), fresh_windows(engine, ds, component, batch, width, lead)):
            if len(out) < want and not _fires(acts, threshold):  # a window that fires is no negative
                out.append(Context(tokens=tokens, activations=acts, source=source, document=d, fires=False))
        if len(out) >= want:
            break
    return out, passes


@torch.no_grad()
def quiet_windows(engine: Engine, ds: ActivationDataset, component: str, documents: list[int], threshold: float,
                  source: Source, want: int, width: int, lead: int, rng: np.random.Generator,
                  per_document: int = 1, batch: int = 64) -> tuple[list[Context], int]:
    """Up to `want` windows where the component does not fire, cut from whole documents run
    through the model `batch` at a time, in the order given (at most `per_document` windows,
    at random quiet positions, from each); also the documents run."""
    starts, lens, toks, vocab = ds.doc_starts, ds.a["doc_lengths"], ds.a["tokens"], ds.vocab
    out: list[Context] = []
    run = 0
    for i in range(0, len(documents), batch):
        part = documents[i: i + batch]
        ids = torch.zeros((len(part), int(max(lens[d] for d in part))), dtype=torch.long)
        for j, d in enumerate(part):
            ids[j, : lens[d]] = torch.from_numpy(toks[starts[d]: starts[d] + lens[d]].astype(np.int64))
        acts = activation_of(engine, component, ids.to(engine.device)).cpu().numpy()
        run += len(part)
        for j, d in enumerate(part):
            n = int(lens[d])
            spans = {_window(0, n, q, width, lead) for q in range(1, n)}
            quiet = sorted(w for w in spans if w[1] > w[0] and acts[j, w[0]: w[1]].max() < threshold)
            for k in rng.permutation(len(quiet))[:per_document].tolist():
                x, y = quiet[k]
                out.append(Context(tokens=[vocab[int(t)] for t in toks[starts[d] + x: starts[d] + y]],
                                   activations=acts[j, x:y].tolist(), source=source, document=d, fires=False))
        if len(out) >= want:
            break
    return out[:want], run


def similar_documents(ds: ActivationDataset, documents: list[int]) -> list[int]:
    """The other documents, most similar first to the given ones' text (cosine of token
    counts against their summed counts): the same kind of text, where negatives do not
    bring a kind of text of their own."""
    toks, lens = ds.a["tokens"].astype(np.int64), ds.a["doc_lengths"]
    doc_of = np.repeat(np.arange(len(lens)), lens)
    mine = np.isin(doc_of, documents)
    profile = np.bincount(toks[mine], minlength=int(toks.max()) + 1).astype(np.float64)
    pairs, counts = np.unique(doc_of * len(profile) + toks, return_counts=True)
    norms = np.sqrt(np.bincount(pairs // len(profile), weights=counts.astype(np.float64) ** 2, minlength=len(lens)))
    sim = np.bincount(doc_of, weights=profile[toks], minlength=len(lens)) / np.maximum(norms, 1e-12)
    sim[np.unique(doc_of[mine])] = -np.inf
    order = np.argsort(-sim, kind="stable")
    return order[np.isfinite(sim[order])].tolist()


def draw_contexts(engine: Engine, ds: ActivationDataset, component: str, explanation: str,
                  held_top: list[Example], held_quantile: list[Example] | None = None, *, n_hard: int = 10,
                  n_negative: int | None = None, seed: int = 0) -> ScoringSet:
    """Activating contexts across the activation range, non-activating ones from the same
    documents and hard negatives for one component (see the module docstring). `held_top`,
    `held_quantile`: the top and quantile examples the explanation was NOT written from (all
    quantile examples when None); `n_negative`: same-document negatives wanted (default: as
    many as there are activating windows, within MATCHED)."""
    threshold = firing_threshold(ds, component)
    groups = (("top", held_top), ("quantile", ds.examples(component, "quantile") if held_quantile is None
                                  else held_quantile), ("random", ds.examples(component, "random")))
    contexts = [Context(tokens=e.tokens, activations=e.activations, source=g, document=e.document, fires=True)
                for g, group in groups for e in group if _fires(e.activations, threshold)]
    cfg = ds.manifest.get("config", {})
    width, lead = int(cfg.get("window", 20)), int(cfg.get("lead", 16))
    rng = np.random.default_rng(seed)
    want = n_negative if n_negative is not None else min(max(len(contexts), MATCHED[0]), MATCHED[1])
    mine = sorted({c.document for c in contexts})
    negatives, passes = quiet_windows(engine, ds, component, rng.permutation(mine).tolist(), threshold,
                                      "same_document", want, width, lead, rng,
                                      per_document=-(-want // max(len(mine), 1)))
    if len(negatives) < want:  # the documents fire throughout: the rest from the most similar others
        more, extra = quiet_windows(engine, ds, component, similar_documents(ds, mine)[:MAX_SIMILAR], threshold,
                                    "similar_document", want - len(negatives), width, lead, rng)
        negatives, passes = negatives + more, passes + extra
    toks = ds.a["tokens"]
    first = np.zeros(len(toks), bool)
    first[ds.doc_starts] = True  # BOS positions are never candidates
    contexts += negatives
    surface = surface_tokens(explanation)
    ids = [i for i, t in enumerate(ds.vocab) if t.strip() in surface]
    hard_cands = np.flatnonzero(np.isin(toks, ids) & ~first) if ids and n_hard else np.zeros(0, int)
    hard, more = _draw_negatives(engine, ds, component, threshold, "hard_negative",
                                 rng.permutation(hard_cands)[: ROUNDS * n_hard].tolist(), n_hard, width, lead)
    return ScoringSet(threshold=threshold, contexts=contexts + hard, forward_passes=passes + more)
