"""Scores of a found circuit against a ground truth: pure functions, tested on hand cases.

* precision / recall / F1 of a found set against the true set (nodes or edges);
* ROC AUC of a method's ranking: the probability that a true node outranks a false one
  (ties count one half), the Mann-Whitney form, so no library is needed;
* CPR and CMD (MIB): with f(k) the faithfulness of the method's top-k components for
  k = 0..N (N = the universe size), CPR = area under f over x = k/N in [0, 1] (higher is
  better) and CMD = area under |1 - f| (0 is best); trapezoid rule over every k.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from pydantic import BaseModel


class SetScores(BaseModel):
    precision: float | None  # None when nothing was found (0 / 0)
    recall: float | None  # None when there is nothing to find
    f1: float
    tp: int
    fp: int
    fn: int


def set_scores(found: Iterable, truth: Iterable) -> SetScores:
    found, truth = set(found), set(truth)
    tp, fp, fn = len(found & truth), len(found - truth), len(truth - found)
    p = tp / (tp + fp) if found else None
    r = tp / (tp + fn) if truth else None
    f1 = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0
    return SetScores(precision=p, recall=r, f1=f1, tp=tp, fp=fp, fn=fn)


def roc_auc(scores: dict[str, float], truth: Iterable[str], universe: Sequence[str]) -> float | None:
    """AUC of `scores` (higher = more likely in the circuit) over `universe`; components the
    method did not score rank below every scored one, tied with each other. None when the
    universe has no positives or no negatives."""
    truth = set(truth)
    pos = [scores.get(u, -math.inf) for u in universe if u in truth]
    neg = [scores.get(u, -math.inf) for u in universe if u not in truth]
    if not pos or not neg:
        return None
    wins = 0.0
    for p in pos:
        for n in neg:
            wins += 1.0 if p > n else 0.5 if p == n else 0.0
    return wins / (len(pos) * len(neg))


def ranking(scores: dict[str, float], universe: Sequence[str]) -> list[str]:
    """The universe ordered by score, highest first; unscored last, in universe order (stable)."""
    return sorted(universe, key=lambda u: -scores.get(u, -math.inf))


def area(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Trapezoid area under (xs, ys), xs ascending."""
    return sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(xs) - 1))


def cpr_cmd(curve: Sequence[float]) -> tuple[float, float]:
    """CPR and CMD of a faithfulness curve f(0..N) at x = k/N.

    |1 - f| is integrated exactly on each segment (f is linear between points, so a segment
    crossing 1 splits into two triangles)."""
    n = len(curve) - 1
    if n < 1:
        raise ValueError("a faithfulness curve needs at least two points (k = 0 and k = N)")
    xs = [k / n for k in range(n + 1)]
    cpr = area(xs, curve)
    cmd = 0.0
    for i in range(n):
        a, b, w = 1 - curve[i], 1 - curve[i + 1], xs[i + 1] - xs[i]
        if a * b >= 0:
            cmd += w * (abs(a) + abs(b)) / 2
        else:  # crosses zero at t = a / (a - b)
            t = a / (a - b)
            cmd += w * (t * abs(a) + (1 - t) * abs(b)) / 2
    return cpr, cmd


def first_reaching(curve: Sequence[float], threshold: float) -> int | None:
    """Smallest k with f(k) >= threshold (None if none)."""
    for k, f in enumerate(curve):
        if f >= threshold:
            return k
    return None
