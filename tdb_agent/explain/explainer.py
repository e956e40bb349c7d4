"""Explanations of components with simulation scores (Bills et al. 2023), cached on disk.

The explanation is written from the even-ranked top examples (0, 2, 4, ...); the score is
the correlation between simulated and true per-token activations on held-out examples: the
odd-ranked top examples plus the random sample. Offline, a heuristic explanation is scored by
the offline simulator; with an LLM configured, an LLM explanation by the LLM simulator.
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
from tdb_agent.explain.heuristic import correlation, heuristic_explanation, simulate_offline
from tdb_agent.explain.llm import ExplainerLLM, LLMClient

Method = Literal["auto", "llm", "heuristic"]
SHIPPED = "explanations.json"  # precomputed heuristic explanations next to a dataset (tools/precompute_...)


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
    simulator: str
    explained_from: int = Field(description="top examples the explanation was written from")
    scored_on: dict[str, int] = Field(description="held-out examples scored, per group")
    evidence: dict = {}
    examples: list[ScoredExample] = Field([], description="the scored examples with true and simulated activations")
    cached: bool = False


def output_boosts(engine: Engine, component: str, k: int = 3) -> list[str] | None:
    """Tokens whose logits the component's output direction raises most (logit lens through
    the final norm's weight, scale ignored): neurons and SAE latents."""
    c = parse_component(component)
    if c.kind == "neuron":
        d = engine.adapter.W_out(c.layer)[c.index]
    elif c.kind == "sae":
        d = engine.saes.get(c.layer, c.sae_site).W_dec[c.index]
    else:
        return None
    d = d.float()
    norm = engine.adapter.final_norm()
    if engine.spec.norm == "layernorm":
        d = d - d.mean()
    d = d * engine.adapter.norm_gain(norm).float()
    with torch.no_grad():
        logits = d @ engine.adapter.W_U().float()
    return [engine.tokenizer.decode([i]).strip() for i in logits.topk(k).indices.tolist()]


class Explainer:
    def __init__(self, engine: Engine, dataset: ActivationDataset, llm: ExplainerLLM | None = None,
                 cache_dir: str | Path | None = None):
        self.engine = engine
        self.dataset = dataset
        self.llm_settings = llm or ExplainerLLM.from_env()
        self._llm: LLMClient | None = None
        m = dataset.manifest
        tag = hashlib.sha256(json.dumps([m["model_fingerprint"], m["sae_fingerprints"]], sort_keys=True)
                             .encode()).hexdigest()[:16]
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

    def resolve(self, method: Method) -> Literal["llm", "heuristic"]:
        if method == "auto":
            return "llm" if self.llm_settings.configured else "heuristic"
        if method not in ("llm", "heuristic"):
            raise TdbError(f"unknown method {method!r}; methods: auto, llm, heuristic")
        return method

    def _key(self, component: str, method: str) -> str:
        return f"{method}:{self.llm_settings.model if method == 'llm' else ''}:{component}"

    def explain(self, component: str, method: Method = "auto", refresh: bool = False) -> Explanation:
        cid = parse_component(component).model_copy(update={"position": None}).id
        self.dataset.column(cid)  # a clear error for a component the dataset lacks
        how = self.resolve(method)
        key = self._key(cid, how)
        if not refresh:
            hit = self._cache.get(key)
            if hit is not None:
                return Explanation(**hit, cached=True)
        result = self._compute(cid, how)
        with self._lock:
            self._cache[key] = result.model_dump(exclude={"cached"})
            if self.cache_file is not None:
                self.cache_file.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.cache_file.with_suffix(".tmp")
                tmp.write_text(json.dumps(self._cache))
                tmp.replace(self.cache_file)
        return result

    def _compute(self, cid: str, how: str) -> Explanation:
        top = self.dataset.examples(cid, "top")
        rand = self.dataset.examples(cid, "random")
        train, held = top[0::2], top[1::2]
        evidence: dict = {}
        if how == "heuristic":
            text, evidence = heuristic_explanation(train, output_boosts(self.engine, cid),
                                                   spread=self.dataset.examples(cid, "quantile"))
            sim, simulator = (lambda toks: simulate_offline(text, toks)), "offline"
        else:
            peak = max((e.activation for e in train), default=0.0)
            text = self.llm.explain(cid, train, peak)
            sim, simulator = (lambda toks: self.llm.simulate(text, toks)), f"llm:{self.llm_settings.model}"
        scored = [ScoredExample(group=g, tokens=e.tokens, activations=e.activations, simulated=sim(e.tokens))
                  for g, group in (("top", held), ("random", rand)) for e in group]
        true = [a for s in scored for a in s.activations]
        pred = [a for s in scored for a in s.simulated]
        return Explanation(component=cid, method=how, explanation=text, score=correlation(pred, true),
                           simulator=simulator, explained_from=len(train),
                           scored_on={"top": len(held), "random": len(rand)}, evidence=evidence, examples=scored)


def precompute_heuristic(explainer: Explainer, components: list[str]) -> dict[str, dict]:
    """Heuristic explanation and score of every component (what ships with a dataset)."""
    out = {}
    for cid in components:
        e = explainer._compute(cid, "heuristic")
        out[cid] = {"explanation": e.explanation, "score": round(e.score, 4)}
    return out
