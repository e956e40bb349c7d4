"""Detection, fuzzing and simulation scores of one explanation by one reader (offline or
LLM), over the contexts of `contexts.draw_contexts`.

* detection: the reader says which contexts fire; balanced accuracy against the truth
  (activating contexts from across the range vs random windows and hard negatives).
* fuzzing: each activating context is shown twice, once with its firing tokens marked and
  once with as many random non-firing tokens marked; the reader says which marks fit;
  balanced accuracy.
* simulation: correlation of the reader's per-token predictions with the truth."""

from __future__ import annotations

import numpy as np

from tdb_agent.explain.contexts import Context, ScoringSet
from tdb_agent.explain.readers import Highlighted
from tdb_agent.explain.scoring import Score, classification_score, simulation_score

UNREADABLE = "the reader's answers could not be parsed (malformed reply)"


def fuzz_items(contexts: list[Context], threshold: float, seed: int = 0) -> list[Highlighted]:
    """Correctly and randomly marked copies of every firing context (a context whose every
    token fires has no random copy)."""
    rng = np.random.default_rng(seed)
    items = []
    for c in contexts:
        if not c.fires:
            continue
        hot = [i for i, a in enumerate(c.activations) if a >= threshold]
        cold = [i for i, a in enumerate(c.activations) if a < threshold]
        items.append(Highlighted(tokens=c.tokens, marked=hot, correct=True))
        if cold:
            pick = sorted(rng.choice(cold, min(len(hot), len(cold)), replace=False).tolist())
            items.append(Highlighted(tokens=c.tokens, marked=pick, correct=False))
    return items


def detection(reader, explanation: str, scoring: ScoringSet) -> Score:
    before = reader.calls
    cs = scoring.contexts
    pred = reader.detect(explanation, [c.tokens for c in cs])
    truth = [c.fires for c in cs]
    hard = [c.source == "hard_negative" for c in cs]
    if pred is None:
        return Score(name="detection", value=None, chance=0.5, n=len(cs), reader=reader.name,
                     calls=reader.calls - before, note=UNREADABLE)
    return classification_score("detection", pred, truth, reader.name, hard=hard, calls=reader.calls - before)


def fuzzing(reader, explanation: str, scoring: ScoringSet, seed: int = 0) -> Score:
    before = reader.calls
    items = fuzz_items(scoring.contexts, scoring.threshold, seed)
    pred = reader.fuzz(explanation, items) if items else []
    if pred is None:
        return Score(name="fuzzing", value=None, chance=0.5, n=len(items), reader=reader.name,
                     calls=reader.calls - before, note=UNREADABLE)
    return classification_score("fuzzing", pred, [it.correct for it in items], reader.name,
                                calls=reader.calls - before)


def simulation(reader, explanation: str, examples) -> tuple[Score, list[list[float]]]:
    """Simulation score over examples (objects with tokens and activations); also returns
    the simulated activations, one list per example."""
    before = reader.calls
    sims = [reader.simulate(explanation, e.tokens) for e in examples]
    score = simulation_score(sims, [e.activations for e in examples], reader.name, calls=reader.calls - before)
    return score, sims
