"""Explanations of components with their scores, cached on disk.

The explanation is written from the even-ranked top examples (0, 2, 4, ...). `score` is the
simulation score (Bills et al. 2023): the correlation between simulated and true per-token
activations on held-out examples, the odd-ranked top examples plus the random sample.
`scores` adds detection and fuzzing (Delphi; balanced accuracy, 0.5 = chance) on contexts
from across the activation range, random windows and hard negatives (explain/contexts.py),
each with its number of examples and a bootstrap interval. Offline, a heuristic explanation
is read by the offline reader; with an LLM (an OpenAI-compatible endpoint, or the MCP
client's model passed in as `model`), an LLM explanation by the LLM reader.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field

from tdb_agent.components import parse_component
from tdb_agent.datasets.store import ActivationDataset
from tdb_agent.engine import Engine
from tdb_agent.errors import TdbError
from tdb_agent.explain import scorers
from tdb_agent.explain.contexts import corpus_sample, draw_contexts, firing_threshold
from tdb_agent.explain.heads import head_write_tokens
from tdb_agent.explain.heuristic import heuristic_explanation
from tdb_agent.explain.llm import ExplainerLLM, LLMClient, TextModel, explain_with
from tdb_agent.explain.readers import LLMReader, OfflineReader
from tdb_agent.explain.scoring import Score
from tdb_agent.ops.lens import top_tokens

Method = Literal["auto", "llm", "heuristic"]
BACKGROUND = 10  # random corpus windows the heuristic also fits its reading on (not the scoring ones)
SCORING = 2  # how scores are computed (2: detection negatives matched by document); a change starts a new cache


class ScoredExample(BaseModel):
    group: Literal["top", "random"]
    tokens: list[str]
    activations: list[float]
    simulated: list[float]


class Explanation(BaseModel):
    component: str
    method: Literal["llm", "heuristic"]
    explanation: str
    score: float = Field(description="correlation of simulated with true activations on held-out top and random "
                                     "examples (1 = perfect, 0 = none)")
    simulator: str = Field(description="who scored it: 'offline' (the heuristic reader) or 'llm:<model>'")
    writer: str = Field("heuristic", description="who wrote it: 'heuristic' or 'llm:<model>'")
    scores: list[Score] = Field([], description="detection, fuzzing and simulation, each with the examples it rests "
                                                "on and a 95% bootstrap interval")
    note: str | None = Field(None, description="what to know before relying on it: a fallback taken, or scores "
                                               "at chance")
    cost: dict[str, int] = Field({}, description="forward passes and reader calls spent scoring it")
    explained_from: int = Field(description="top examples the explanation was written from")
    scored_on: dict[str, int] = Field(description="held-out examples scored, per group")
    evidence: dict = {}
    examples: list[ScoredExample] = Field([], description="the scored examples with true and simulated activations")
    cached: bool = False


def output_boosts(engine: Engine, component: str, k: int = 3) -> list[str] | None:
    """Tokens whose logits the component's output direction raises most (the logit lens of
    ops/lens.py, final norm's scale frozen): neurons, SAE latents and transcoder features (the
    decoder row into their own layer's MLP output)."""
    c = parse_component(component)
    if c.kind == "neuron":
        d = engine.adapter.W_out(c.layer)[c.index]
    elif c.kind == "sae":
        d = engine.saes.get(c.layer, c.sae_site).W_dec[c.index]
    elif c.kind == "transcoder" and getattr(engine, "transcoders", None) is not None:
        d = engine.transcoders.get(c.layer).W_dec[c.index, 0]
    else:
        return None
    with torch.no_grad():
        return [t.strip() for t, _ in top_tokens(engine, d, k)[0]]


class Explainer:
    def __init__(self, engine: Engine, dataset: ActivationDataset, llm: ExplainerLLM | None = None,
                 cache_dir: str | Path | None = None):
        self.engine = engine
        self.dataset = dataset
        self.llm_settings = llm or ExplainerLLM.from_env()
        self._llm: LLMClient | None = None
        m = dataset.manifest
        fps = [m["model_fingerprint"], m["sae_fingerprints"], SCORING] + (
            [m["transcoder_fingerprints"]] if m.get("transcoder_fingerprints") else [])
        tag = hashlib.sha256(json.dumps(fps, sort_keys=True).encode()).hexdigest()[:16]
        self.cache_file = Path(cache_dir) / f"explanations-{tag}.json" if cache_dir else None
        self._cache: dict[str, dict] = {}
        if self.cache_file is not None and self.cache_file.exists():
            self._cache = json.loads(self.cache_file.read_text())
        self._lock = threading.Lock()

    @property
    def llm(self) -> LLMClient:
        if self._llm is None:
            self._llm = LLMClient(self.llm_settings)
        return self._llm

    def resolve(self, method: Method, model: TextModel | None = None) -> Literal["llm", "heuristic"]:
        if method == "auto":
            return "llm" if model is not None or self.llm_settings.configured else "heuristic"
        if method not in ("llm", "heuristic"):
            raise TdbError(f"unknown method {method!r}; methods: auto, llm, heuristic")
        return method

    def _key(self, component: str, method: str, model: TextModel | None) -> str:
        name = "" if method != "llm" else model.name if model is not None else self.llm_settings.model
        return f"{method}:{name}:{component}"

    def explain(self, component: str, method: Method = "auto", refresh: bool = False,
                model: TextModel | None = None, no_model: str | None = None) -> Explanation:
        """`model`: the LLM to write and read it (e.g. the MCP client's, through sampling);
        without one, the configured OpenAI-compatible endpoint. With `auto`, an LLM that
        fails (refusal, timeout, malformed answer) gives way to the heuristic, and the
        result's note says why; `no_model`: why no LLM was offered (said in the note)."""
        cid = parse_component(component).model_copy(update={"position": None}).id
        self.dataset.column(cid)  # a clear error for a component the dataset lacks
        how = self.resolve(method, model)
        why = f"heuristic explanation: {no_model}" if how == "heuristic" and method == "auto" and no_model else None
        try:
            result = self._cached_or_computed(cid, how, model, refresh)
        except TdbError as e:
            if method != "auto" or how != "llm":
                raise
            result, why = self._cached_or_computed(cid, "heuristic", None, refresh), f"heuristic fallback: {e}"
        if why:
            result = result.model_copy(update={"note": "; ".join(n for n in (why, result.note) if n)})
        return result

    def _cached_or_computed(self, cid: str, how: str, model: TextModel | None, refresh: bool) -> Explanation:
        key = self._key(cid, how, model)
        if not refresh:
            hit = self._cache.get(key)
            if hit is not None:
                return Explanation(**hit, cached=True)
        result = self._compute(cid, how, model)
        settle = getattr(model, "settle", None)  # a model answering in rounds: every prompt answered?
        if how == "llm" and settle is not None:
            settle()
        with self._lock:
            self._cache[key] = result.model_dump(exclude={"cached"})
            if self.cache_file is not None:
                self.cache_file.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.cache_file.with_suffix(".tmp")
                tmp.write_text(json.dumps(self._cache))
                tmp.replace(self.cache_file)
        return result

    def _compute(self, cid: str, how: str, model: TextModel | None = None, seed: int = 0,
                 detect: bool = True) -> Explanation:
        """`detect=False`: the simulation score only (no detection/fuzzing contexts drawn)."""
        top = self.dataset.examples(cid, "top")
        rand = self.dataset.examples(cid, "random")
        quantile = self.dataset.examples(cid, "quantile")
        train, held = top[0::2], top[1::2]  # written from the even ranks, scored on the odd ones
        evidence: dict = {}
        if how == "heuristic":
            boosts = output_boosts(self.engine, cid) or head_write_tokens(
                self.engine, self.dataset, cid, list(range(0, len(top), 2)))
            background = corpus_sample(self.engine, self.dataset, cid, BACKGROUND, seed=seed + 1)
            text, evidence = heuristic_explanation(train, boosts, spread=quantile[0::2], background=background,
                                                   threshold=firing_threshold(self.dataset, cid))
            reader, writer = OfflineReader(), "heuristic"
        else:
            model = model or self.llm
            text = explain_with(model, cid, train, max((e.activation for e in train), default=0.0))
            reader, writer = LLMReader(model), f"llm:{model.name}"
        sim, sims = scorers.simulation(reader, text, held + rand)
        scores, passes = [sim], 0
        if detect:
            scoring = draw_contexts(self.engine, self.dataset, cid, text, held, quantile[1::2], seed=seed)
            scores = [scorers.detection(reader, text, scoring), scorers.fuzzing(reader, text, scoring, seed), sim]
            passes = scoring.forward_passes
        scored = [ScoredExample(group=g, tokens=e.tokens, activations=e.activations, simulated=s)
                  for (g, e), s in zip([("top", e) for e in held] + [("random", e) for e in rand], sims)]
        return Explanation(component=cid, method=how, explanation=text, score=sim.value or 0.0,
                           simulator=reader.name, writer=writer, scores=scores, note=at_chance_note(scores),
                           cost={"forward_passes": passes + (BACKGROUND if how == "heuristic" else 0),
                                 "reader_calls": reader.calls},
                           explained_from=len(train), scored_on={"top": len(held), "random": len(rand)},
                           evidence=evidence, examples=scored)


def at_chance_note(scores: list[Score]) -> str | None:
    """A warning when no score's interval lies above chance."""
    usable = [s for s in scores if s.value is not None]
    if any(s.above_chance for s in usable):
        return None
    shown = ", ".join(f"{s.name} {s.value:.2f} [{s.low:.2f}, {s.high:.2f}] (chance {s.chance:g}, n={s.n})"
                      for s in usable if s.low is not None)
    return f"at chance: no score is above chance ({shown or 'no usable score'}); do not rely on this explanation"


def precompute_heuristic(explainer: Explainer, components: list[str]) -> dict[str, dict]:
    """Heuristic explanation and simulation score of every component (what ships with a
    dataset; detection and fuzzing are computed live by explain_component)."""
    out = {}
    for cid in components:
        e = explainer._compute(cid, "heuristic", detect=False)
        out[cid] = {"explanation": e.explanation, "score": round(e.score, 4)}
    return out
