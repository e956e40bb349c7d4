"""Explanations: simulation-score distributions and planted features.

1. Distribution: heuristic explanations of the bundled model's heads, neurons and SAE
   latents, recomputed here from the bundled activation dataset (a seeded sample per kind;
   every head), scored by the offline simulator; compared with the shipped
   `explanations.json`, whose full distribution is reported beside it.
2. Planted features: the neuron and SAE latent most selective for names and for two-digit
   year tokens, found by measuring activations on corpus text directly (not from the
   dataset), and the constructed model's name neuron L0.N5 (a dataset is built for it
   here). Does the explanation name the feature, and what does it score?

LLM explanations are scored only when an explainer endpoint is configured.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel

from evals.cost import Cost, count_passes
from evals.explanation_scores import ScoresEval, kind_of, llm_rows, llm_sample, run_scores
from tdb_agent.datasets import ActivationDataset, BuildConfig, build, documents_from_corpus
from tdb_agent.datasets.store import BUNDLED_DATASET, EXPLANATIONS, read_member
from tdb_agent.datasets.components import component_name
from tdb_agent.engine import Engine
from tdb_agent.engine.sae import attach_saes
from tdb_agent.engine.transcoder import attach_transcoders
from tdb_agent.explain import Explainer, ExplainerLLM, Explanation
from tdb_agent.explain.heuristic import CATEGORIES
from tdb_agent.explain.scoring import Score
from tdb_agent.tasks import corpus_documents

FEATURES = {"names": "names", "years": "two-digit numbers (year parts)"}  # feature -> heuristic category


class Distribution(BaseModel):
    kind: str
    source: str  # "recomputed (sample)" or "shipped explanations.json (all)"
    n: int
    median: float
    q1: float
    q3: float
    frac_ge_05: float
    max_abs_diff_vs_shipped: float | None = None


class PlantedResult(BaseModel):
    feature: str
    component: str
    how_found: str
    selectivity: float | None  # fraction of the component's top-activating corpus tokens in the feature's class
    explanation: str
    score: float
    names_feature: bool  # the explanation's 'fires on' clause names the feature's category
    scores: list[Score] = []  # detection, fuzzing, simulation with intervals


class ExplanationEval(BaseModel):
    distributions: list[Distribution]
    planted: list[PlantedResult]
    scores: ScoresEval | None = None
    llm: str
    cost: Cost


def _dist(kind: str, source: str, scores: list[float], diff: float | None = None) -> Distribution:
    q = np.quantile(scores, [0.25, 0.5, 0.75]) if scores else [float("nan")] * 3
    return Distribution(kind=kind, source=source, n=len(scores), median=float(q[1]), q1=float(q[0]), q3=float(q[2]),
                        frac_ge_05=sum(s >= 0.5 for s in scores) / len(scores) if scores else float("nan"),
                        max_abs_diff_vs_shipped=diff)


def llm_distributions(done: dict[str, list[Explanation]], failed: dict[str, int], model: str) -> list[Distribution]:
    """Simulation scores of the LLM sample (`explanation_scores.llm_sample`), per kind; a
    component whose explanation failed scores 0 and is counted in the source column."""
    return [_dist(kind, f"LLM ({model}), seeded sample, {failed[kind]} failed",
                  [r.score for r in done[kind]] + [0.0] * failed[kind]) for kind in done]


def distributions(engine: Engine, ds: ActivationDataset, per_kind: int, seed: int = 0) -> list[Distribution]:
    explainer = Explainer(engine, ds, llm=ExplainerLLM(base_url=None, api_key=None), cache_dir=None)
    comps = [component_name(ds.blocks, c) for c in range(ds.manifest["n_components"])]
    shipped = json.loads(read_member(ds.folder, EXPLANATIONS) or "{}")
    rng = random.Random(seed)
    out = []
    for kind in ("head", "neuron", "sae latent", "transcoder feature"):
        of_kind = [c for c in comps if kind_of(c) == kind]
        if not of_kind:
            continue
        every = kind == "head" and len(of_kind) <= per_kind * 4  # all heads; a seeded sample of the rest
        sample = of_kind if every else rng.sample(of_kind, min(per_kind, len(of_kind)))
        scores = [explainer.explain(c, method="heuristic", refresh=True).score for c in sample]
        diff = max(abs(s - shipped[c]["score"]) for c, s in zip(sample, scores) if c in shipped)
        what = "all" if len(sample) == len(of_kind) else "seeded sample"
        out.append(_dist(kind, f"recomputed, {what}", scores, diff))
        out.append(_dist(kind, "shipped explanations.json, all",
                         [shipped[c]["score"] for c in of_kind if c in shipped]))
    return out


@torch.no_grad()
def _selective(engine: Engine, n_docs: int, seed: int = 777) -> dict[str, tuple[str, float]]:
    """For each planted feature, the neuron and the SAE latent whose top-50 activating corpus
    tokens are most often in the feature's class (measured directly on the model)."""
    docs = corpus_documents(n_docs, seed=seed)
    s = engine.spec
    sites = [f"blocks.{l}.mlp.hook_post" for l in range(s.n_layers)]
    sae_keys = [k for k, _ in engine.saes.items()]
    resid_sites = {k: f"blocks.{k[0]}.hook_resid_post" for k in sae_keys}
    acts, toks = [], []
    for text in docs:
        ids = engine.to_tokens(text)[:, : s.n_ctx]
        _, cache = engine.run_with_cache(ids, sites + list(resid_sites.values()), logit_positions=[-1], logit_ids=[0])
        parts = [cache[site][0, 1:] for site in sites]  # skip BOS
        parts += [engine.saes.get(*k).encode(cache[resid_sites[k]][0, 1:].float()) for k in sae_keys]
        acts.append(torch.cat(parts, -1).float())
        toks += engine.str_tokens(ids[0, 1:])
    A = torch.cat(acts)  # [tokens, units]
    names = [f"L{l}.N{n}" for l in range(s.n_layers) for n in range(s.d_mlp)]
    names += [f"L{k[0]}.{k[1]}.F{i}" for k in sae_keys for i in range(engine.saes.get(*k).d_sae)]
    top = A.topk(50, dim=0).indices  # [50, units]
    out = {}
    for feature, cat in FEATURES.items():
        member = torch.tensor([t.strip() in CATEGORIES[cat] for t in toks])
        frac = member[top].float().mean(0)
        for kind, lo, hi in (("neuron", 0, s.n_layers * s.d_mlp), ("sae latent", s.n_layers * s.d_mlp, len(names))):
            if hi > lo:
                i = lo + int(frac[lo:hi].argmax())
                out[f"{feature} {kind}"] = (names[i], float(frac[i]))
    return out


def _names_feature(explanation: str, feature: str) -> bool:
    clause = explanation.split(";")[0]
    return FEATURES[feature] in clause


def planted_bundled(engine: Engine, ds: ActivationDataset, n_docs: int) -> list[PlantedResult]:
    explainer = Explainer(engine, ds, llm=ExplainerLLM(base_url=None, api_key=None), cache_dir=None)
    out = []
    for key, (cid, sel) in _selective(engine, n_docs).items():
        feature = key.split()[0]
        e = explainer.explain(cid, method="heuristic", refresh=True)
        out.append(PlantedResult(feature=feature, component=cid, selectivity=sel, explanation=e.explanation,
                                 score=e.score, scores=e.scores, names_feature=_names_feature(e.explanation, feature),
                                 how_found=f"bundled model: the {key.split(' ', 1)[1]} whose top-50 activations on "
                                           f"{n_docs} corpus documents are most often {FEATURES[feature]}"))
    return out


def planted_constructed(model_dir: str, n_docs: int) -> PlantedResult:
    """Build an activation dataset for the constructed name-neuron model and explain L0.N5."""
    engine = Engine.load(model_dir, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        docs = documents_from_corpus(n_docs, 31337, engine.tokenizer, engine.spec.n_ctx)
        build(engine, docs, Path(tmp) / "ds", BuildConfig(batch_size=32, warmup_docs=min(64, n_docs)),
              source=f"{n_docs} corpus documents", progress=False, resume=False)
        ds = ActivationDataset.open(Path(tmp) / "ds", engine)
        e = Explainer(engine, ds, llm=ExplainerLLM(base_url=None, api_key=None), cache_dir=None).explain(
            "L0.N5", method="heuristic")
    return PlantedResult(feature="names", component="L0.N5", selectivity=None,
                         how_found=f"constructed model class_neuron: L0.N5 fires on 10 of the 109 names by "
                                   f"construction "
                                   f"(dataset built here over {n_docs} corpus documents; the simulator predicts "
                                   f"every name, hence a middling score)",
                         explanation=e.explanation, score=e.score, scores=e.scores,
                         names_feature=_names_feature(e.explanation, "names"))


def run(constructed_class_neuron: str | None, quick: bool) -> ExplanationEval:
    with count_passes() as cost:
        engine = Engine.load(device="cpu")
        attach_saes(engine, [], bundled=True)
        attach_transcoders(engine)  # the dataset's transcoder features are explained and scored too
        ds = ActivationDataset.open(BUNDLED_DATASET, engine)
        dists = distributions(engine, ds, per_kind=16 if quick else 96)
        settings = ExplainerLLM.from_env()
        llm_on = settings.configured
        planted = [] if quick else planted_bundled(engine, ds, n_docs=200)
        scores = run_scores(engine, ds, n=30 if quick else 200)
        if llm_on:
            done, failed = llm_sample(engine, ds, 4 if quick else 16, settings)
            dists += llm_distributions(done, failed, settings.model)
            rows, costs = llm_rows(done, failed, settings.model)
            scores.rows += rows
            scores.costs += costs
        if constructed_class_neuron:
            planted.append(planted_constructed(constructed_class_neuron, n_docs=256))
    llm = ("LLM explanations: not run, no explainer endpoint (TDB_EXPLAINER_BASE_URL / OPENAI_BASE_URL); "
           "heuristic explanations only" if not llm_on else
           f"LLM explanations ({settings.model}) written and read by the endpoint's model on a seeded sample "
           "(rows 'LLM': simulation below, all three scores and their reader calls in the score tables)")
    return ExplanationEval(distributions=dists, planted=planted, scores=scores, llm=llm, cost=cost)
