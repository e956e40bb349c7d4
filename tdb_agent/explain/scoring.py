"""The arithmetic of explanation scores: balanced accuracy (0.5 = chance), Pearson
correlation (simulation), and percentile bootstrap intervals on a fixed seed, each score
carrying the number of examples it rests on (Delphi's detection and fuzzing; Bills et al.'s
simulation)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, Field

BOOTSTRAP_ROUNDS = 1000
BOOTSTRAP_SEED = 0


def correlation(a: list[float], b: list[float]) -> float:
    """Pearson correlation; 0 when either side is constant."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


class Score(BaseModel):
    """One score of one explanation."""
    name: str = Field(description="detection | fuzzing | simulation")
    value: float | None = Field(description="balanced accuracy (0.5 = chance, 1 = perfect) for detection and "
                                            "fuzzing; correlation (0 = none, 1 = perfect) for simulation; "
                                            "None when the reader's answers could not be used")
    low: float | None = Field(None, description="95% bootstrap interval, lower end")
    high: float | None = Field(None, description="95% bootstrap interval, upper end")
    chance: float = Field(description="the value a useless explanation gets")
    n: int = Field(description="examples the score rests on")
    n_positive: int | None = Field(None, description="of them, activating (detection) / correctly highlighted "
                                                     "(fuzzing)")
    n_negative: int | None = Field(None, description="of them, non-activating (of which hard negatives: "
                                                     "`n_hard_negative`) / wrongly highlighted")
    n_hard_negative: int | None = None
    reader: str = Field(description="who read the explanation: 'offline' or 'llm:<model>'")
    calls: int = Field(0, description="reader calls (LLM requests) this score cost")
    note: str | None = None

    @property
    def above_chance(self) -> bool:
        """The interval lies above chance (a claim the examples support)."""
        return self.low is not None and self.low > self.chance


def balanced_accuracy(predicted: Sequence[bool], truth: Sequence[bool]) -> float:
    """(true-positive rate + true-negative rate) / 2; a class with no examples is left out
    (then it is that one class's accuracy). 0.5 = chance whatever the class balance."""
    p, t = np.asarray(predicted, bool), np.asarray(truth, bool)
    if len(p) != len(t):
        raise ValueError(f"{len(p)} predictions for {len(t)} labels")
    rates = [float((p[t == c] == c).mean()) for c in (True, False) if (t == c).any()]
    return float(np.mean(rates)) if rates else float("nan")


def resample(groups: Sequence[int], rounds: int = BOOTSTRAP_ROUNDS, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """[rounds, n] example indices drawn with replacement within each stratum
    (`groups[i]` = stratum of example i; stratifying keeps both classes in every resample of
    a balanced accuracy)."""
    g = np.asarray(groups)
    rng = np.random.default_rng(seed)
    cols = [s[rng.integers(0, len(s), (rounds, len(s)))] for s in (np.flatnonzero(g == v) for v in np.unique(g))]
    return np.concatenate(cols, axis=1) if cols else np.zeros((rounds, 0), int)


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float | None, float | None]:
    """The central `level` percentile interval of bootstrap values (NaNs dropped)."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return None, None
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def balanced_accuracy_rows(correct: np.ndarray, truth: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Balanced accuracy of each resample (row of `idx`), vectorised."""
    c, t = correct[idx], truth[idx]
    rates = [np.where(t == v, c, 0).sum(1) / (t == v).sum(1) for v in (True, False) if (truth == v).any()]
    return np.mean(rates, axis=0)


def correlation_rows(stats: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Pearson correlation of each resample from per-example sums [n, x, y, xx, yy, xy]
    (0 where either side is constant, as `correlation`)."""
    n, x, y, xx, yy, xy = stats[idx].sum(1).T
    with np.errstate(invalid="ignore", divide="ignore"):
        vx, vy = xx - x * x / n, yy - y * y / n
        r = (xy - x * y / n) / np.sqrt(vx * vy)
    eps = 1e-12 * np.maximum(1.0, np.maximum(xx, yy))
    return np.where((vx > eps) & (vy > eps) & (n >= 2), r, 0.0)


def classification_score(name: str, predicted: Sequence[bool], truth: Sequence[bool], reader: str, *,
                         hard: Sequence[bool] | None = None, calls: int = 0, note: str | None = None,
                         seed: int = BOOTSTRAP_SEED) -> Score:
    """Balanced accuracy with a stratified bootstrap interval; None (with a note) unless both
    classes have examples."""
    p, t = np.asarray(predicted, bool), np.asarray(truth, bool)
    counts = dict(n_positive=int(t.sum()), n_negative=int((~t).sum()),
                  n_hard_negative=None if hard is None else int(np.asarray(hard, bool).sum()))
    if not len(t) or t.all() or not t.any():  # one class alone: its accuracy is no balanced accuracy
        why = "no examples to score on" if not len(t) else \
            f"only {'positive' if t.all() else 'negative'} examples (a balanced accuracy needs both)"
        return Score(name=name, value=None, chance=0.5, n=len(t), reader=reader, calls=calls,
                     note="; ".join(x for x in (note, why) if x), **counts)
    lo, hi = percentile_interval(balanced_accuracy_rows(p == t, t, resample(t.astype(int), seed=seed)))
    return Score(name=name, value=balanced_accuracy(p, t), low=lo, high=hi, chance=0.5, n=len(t),
                 reader=reader, calls=calls, note=note, **counts)


def simulation_score(simulated: Sequence[Sequence[float]], true: Sequence[Sequence[float]], reader: str, *,
                     calls: int = 0, seed: int = BOOTSTRAP_SEED) -> Score:
    """Correlation of simulated with true per-token activations over all examples' tokens;
    the bootstrap resamples whole examples."""
    if not len(true):
        return Score(name="simulation", value=None, chance=0.0, n=0, reader=reader, calls=calls,
                     note="no examples to score on")
    stats = np.array([[len(t), np.sum(s), np.sum(t), np.dot(s, s), np.dot(t, t), np.dot(s, t)]
                      for s, t in ((np.asarray(s, np.float64), np.asarray(t, np.float64))
                                   for s, t in zip(simulated, true))])
    value = correlation([a for s in simulated for a in s], [a for t in true for a in t])
    lo, hi = percentile_interval(correlation_rows(stats, resample([0] * len(true), seed=seed)))
    return Score(name="simulation", value=value, low=lo, high=hi, chance=0.0, n=len(true),
                 reader=reader, calls=calls)
