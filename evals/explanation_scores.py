"""Detection, fuzzing and simulation scores of explanations (issue: explanations a
researcher can trust), on the bundled model's dataset:

* a seeded random sample of components, each explained and scored three ways (median, and
  the fraction whose 95% interval lies above chance);
* random-label controls: the explanation of one sampled component scored on another's
  contexts (one whose own explanation names none of the same tokens: `control_pairs`), which
  must sit at chance (detection 0.5 inside its interval) without hard negatives, and at or
  below it with them;
* costs: forward passes and reader calls per explanation and scorer.

The planted features' three scores are reported by `explanations.planted_bundled`.
"""

from __future__ import annotations

import random
import statistics

from pydantic import BaseModel

from tdb_agent.datasets import ActivationDataset
from tdb_agent.datasets.components import component_name
from tdb_agent.engine import Engine
from tdb_agent.errors import TdbError
from tdb_agent.explain import Explainer, ExplainerLLM, Explanation, scorers
from tdb_agent.explain.contexts import draw_contexts, surface_tokens
from tdb_agent.explain.readers import OfflineReader
from tdb_agent.explain.scoring import Score

NAMES = ("detection", "fuzzing", "simulation")


class ScoreSummary(BaseModel):
    score: str
    n_components: int
    median: float | None
    median_low: float | None  # medians of the interval ends
    median_high: float | None
    frac_above_chance: float
    median_examples: float  # examples each score rests on (median)


class ScoreRow(BaseModel):
    group: str  # "sample (n)", "random-label control", ...
    summaries: list[ScoreSummary]


class CostRow(BaseModel):
    scorer: str
    forward_passes_per_explanation: float
    reader_calls_per_explanation: float
    reader: str = "offline"  # who read the explanations: 'offline' or 'llm:<model>'


class ScoresEval(BaseModel):
    rows: list[ScoreRow]
    costs: list[CostRow]
    refused: int  # sampled explanations that make no claim (no reading fits above chance)
    at_chance_flagged: int  # sampled explanations whose note says their scores are at chance


def _summary(name: str, scores: list[Score]) -> ScoreSummary:
    ok = [s for s in scores if s.value is not None]

    def med(xs):
        xs = [x for x in xs if x is not None]
        return statistics.median(xs) if xs else None
    return ScoreSummary(score=name, n_components=len(ok), median=med([s.value for s in ok]),
                        median_low=med([s.low for s in ok]), median_high=med([s.high for s in ok]),
                        frac_above_chance=sum(s.above_chance for s in ok) / len(ok) if ok else 0.0,
                        median_examples=med([s.n for s in ok]) or 0.0)


def sample_components(ds: ActivationDataset, n: int, seed: int = 0) -> list[str]:
    comps = [component_name(ds.blocks, c) for c in range(ds.manifest["n_components"])]
    return random.Random(seed).sample(comps, min(n, len(comps)))


def control_pairs(explanations: list[str]) -> list[tuple[int, int]]:
    """(i, j): explanation i is read on component j, the next one in the sample whose own
    explanation names none of the same tokens. In a small model many components share a
    reading (a fifth of the sample 'fires on made-up filler words'); explanation i read on
    such a twin is that twin's own explanation, not a random label. Components whose
    explanation names nothing (refusals) take part on either side."""
    surface = [surface_tokens(e) for e in explanations]
    n = len(explanations)
    out = []
    for i in range(n):
        j = next((j for j in ((i + k) % n for k in range(1, n)) if not surface[i] & surface[j]), None)
        if j is not None:
            out.append((i, j))
    return out


def run_scores(engine: Engine, ds: ActivationDataset, n: int, seed: int = 0) -> ScoresEval:
    x = Explainer(engine, ds, llm=ExplainerLLM(base_url=None, api_key=None), cache_dir=None)
    comps = sample_components(ds, n, seed)
    results = [x.explain(c, "heuristic", refresh=True) for c in comps]
    rows = [ScoreRow(group=f"heuristic, random sample of {len(comps)} components",
                     summaries=[_summary(k, [r.scores[i] for r in results]) for i, k in enumerate(NAMES)])]
    # random-label controls: a component's explanation read on another component's contexts,
    # with and without hard negatives (drawn from the explanation's own surface tokens, they
    # are built to catch a wrong explanation, so with them an unrelated one falls below chance)
    reader = OfflineReader()
    pairs = control_pairs([r.explanation for r in results])
    for n_hard, label in ((0, "random-label control, no hard negatives"),
                          (10, "random-label control, with hard negatives")):
        control = []
        for r, other in ((results[i], comps[j]) for i, j in pairs):
            sset = draw_contexts(engine, ds, other, r.explanation, ds.examples(other, "top")[1::2],
                                 ds.examples(other, "quantile")[1::2], n_hard=n_hard, seed=seed)
            control.append((scorers.detection(reader, r.explanation, sset),
                            scorers.fuzzing(reader, r.explanation, sset)))
        rows.append(ScoreRow(group=f"{label} (an explanation scored on another component)",
                             summaries=[_summary("detection", [d for d, _ in control]),
                                        _summary("fuzzing", [f for _, f in control])]))
    return ScoresEval(rows=rows, costs=costs_of(results, "offline"),
                      refused=sum(r.explanation.startswith("no reading fits") for r in results),
                      at_chance_flagged=sum(bool(r.note and r.note.startswith("at chance")) for r in results))


def costs_of(results: list[Explanation], reader: str) -> list[CostRow]:
    """Forward passes and reader calls per explanation, per scorer (detection and fuzzing
    share the passes that draw their contexts; the heuristic's background windows count too)."""
    n_r = max(len(results), 1)
    passes = sum(r.cost.get("forward_passes", 0) for r in results) / n_r
    return [CostRow(scorer=k, forward_passes_per_explanation=passes if k != "simulation" else 0.0,
                    reader_calls_per_explanation=sum(r.scores[i].calls for r in results) / n_r, reader=reader)
            for i, k in enumerate(NAMES)]


def llm_sample(engine: Engine, ds: ActivationDataset, per_kind: int, settings: ExplainerLLM,
               seed: int = 0) -> tuple[dict[str, list[Explanation]], dict[str, int]]:
    """LLM explanations (written and read by the endpoint's model) of a seeded sample of
    each kind of component, with all three scores; per kind, the components whose
    explanation failed (endpoint errors, unusable replies) are counted, not scored."""
    explainer = Explainer(engine, ds, llm=settings, cache_dir=None)
    comps = [component_name(ds.blocks, c) for c in range(ds.manifest["n_components"])]
    rng = random.Random(seed)
    done: dict[str, list[Explanation]] = {}
    failed: dict[str, int] = {}
    for kind in KINDS:
        of_kind = [c for c in comps if kind_of(c) == kind]
        done[kind], failed[kind] = [], 0
        for c in rng.sample(of_kind, min(per_kind, len(of_kind))):
            try:
                done[kind].append(explainer.explain(c, method="llm", refresh=True))
            except TdbError:  # an endpoint error stays visible as a failure
                failed[kind] += 1
    return done, failed


def llm_rows(done: dict[str, list[Explanation]], failed: dict[str, int], model: str) -> tuple[list[ScoreRow],
                                                                                              list[CostRow]]:
    """The LLM sample's three scores (all kinds together) and its costs per scorer."""
    results = [r for rs in done.values() for r in rs]
    group = f"LLM ({model}), seeded sample of {len(results)} components, {sum(failed.values())} failed"
    rows = [ScoreRow(group=group, summaries=[_summary(k, [r.scores[i] for r in results]) for i, k in enumerate(NAMES)])]
    return rows, costs_of(results, f"llm:{model}")


KINDS = ("head", "neuron", "sae latent")


def kind_of(cid: str) -> str:
    return "transcoder feature" if ".tc.F" in cid else "sae latent" if ".F" in cid else "head" if ".H" in cid \
        else "neuron"


def markdown(s: ScoresEval) -> list[str]:
    def f(v):
        return "–" if v is None else f"{v:.2f}"
    L = ["Detection, fuzzing (balanced accuracy, chance 0.5) and simulation (correlation, chance 0): medians "
         "over components, with the medians of their 95% bootstrap intervals, and the fraction of components "
         "whose interval lies above chance.", "",
         "| group | score | components | median | median interval | above chance | examples per score |",
         "|---|---|---|---|---|---|---|"]
    for row in s.rows:
        for m in row.summaries:
            L.append(f"| {row.group} | {m.score} | {m.n_components} | {f(m.median)} | [{f(m.median_low)}, "
                     f"{f(m.median_high)}] | {m.frac_above_chance:.2f} | {m.median_examples:g} |")
    L += ["", f"Sampled explanations that refuse to claim (no reading fits above chance): {s.refused}; flagged "
              f"'at chance' in their note: {s.at_chance_flagged}.", "",
          "| reader | scorer | forward passes per explanation | reader calls per explanation |", "|---|---|---|---|"]
    for c in s.costs:
        L.append(f"| {c.reader} | {c.scorer} | {c.forward_passes_per_explanation:.1f} | "
                 f"{c.reader_calls_per_explanation:.1f} |")
    L.append("")
    L.append("Forward passes count documents (and document prefixes) run through the model, batched: the "
             "documents searched for non-activating windows (the activating windows' own, then the most similar "
             "others), the prefixes behind hard negatives, and the heuristic's background windows; they are shared "
             "by detection and fuzzing. The offline reader makes no calls; an LLM reader makes one call per "
             "simulated example and one per 10 contexts for detection and fuzzing.")
    return L
