"""Offline explanations from dataset examples, and the offline simulator that scores them.

An explanation reads "fires on <what>[ after <context>][; attends to ...][; boosts 'a', 'b']"
or, when no reading fits the examples above chance, "no reading fits above chance (...)"
(a refusal to claim). The offline simulator reads only the "fires on" clause: quoted tokens
and category names (names, places, years, ... of the synthetic world) and predicts 1 on a
matching token (0.5 when an "after" context is given and the previous token is not in it),
0 elsewhere. Score = correlation of that prediction with the true activations (Bills et al.).
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from tdb_agent.datasets.store import Example
from tdb_agent.explain.scoring import Score, classification_score, correlation, simulation_score  # noqa: F401  (correlation: re-exported)
from tdb_agent.tasks import vocab as V

CATEGORIES: dict[str, set[str]] = {
    "names": set(V.NAMES), "places": set(V.PLACES), "objects": set(V.OBJECTS), "animals": set(V.ANIMALS),
    "adjectives": set(V.ADJECTIVES), "past-tense verbs": set(V.VERBS_PAST), "giving verbs": set(V.GIVE_VERBS),
    "historical events": set(V.EVENTS), "colors": set(V.COLORS), "two-digit numbers (year parts)": set(V.TWO_DIGITS),
    "countries": set(V.COUNTRIES), "capitals": set(V.CAPITALS), "languages": set(V.LANGUAGES),
    "made-up filler words": set(V.NONSENSE), "punctuation": set(V.PUNCTUATION),
    "function words": set(V.FUNCTION_WORDS), "the start-of-text token": set(V.SPECIAL_TOKENS[:1]),
}


def category_of(token: str) -> str | None:
    t = token.strip()
    for name, words in CATEGORIES.items():
        if t in words:
            return name
    return None


def _q(tokens) -> str:
    return ", ".join(f"'{t.strip()}'" for t in tokens)


def _readings(top: list[Example], wide: list[Example]) -> list[str]:
    """Candidate 'fires on' clauses: the top token, its category over the top examples, a
    category over top and spread with at least three distinct tokens, else the top tokens;
    each after the most common previous token when most top examples share it."""
    n = len(top)
    tok = Counter(e.tokens[e.position].strip() for e in top)
    cats = Counter(category_of(e.tokens[e.position]) for e in top)
    wide_cats = Counter(category_of(e.tokens[e.position]) for e in wide)
    prev = Counter(e.tokens[e.position - 1].strip() for e in top if e.position > 0)
    (t1, c1), = tok.most_common(1)
    cat, cc = cats.most_common(1)[0]
    wcat, wc = wide_cats.most_common(1)[0]
    wide_tokens = {e.tokens[e.position].strip() for e in wide if category_of(e.tokens[e.position]) == wcat}
    what = []
    if c1 >= 0.6 * n:
        what.append(f"the token '{t1}'")
    if cat is not None and cc >= 0.6 * n:
        what.append(f"{cat} (e.g. {_q([t for t, _ in tok.most_common() if category_of(t) == cat][:3])})")
    if wcat is not None and not (wcat == cat and cc >= 0.6 * n) and wc >= 0.6 * len(wide) and len(wide_tokens) >= 3:
        what.append(f"{wcat} (e.g. {_q(sorted(wide_tokens)[:3])})")
    if not what:
        what.append(f"tokens such as {_q(t for t, _ in tok.most_common(4))}")
    suffix = ""
    if prev:
        (p1, pc), = prev.most_common(1)
        if pc >= 0.5 * n:
            suffix = f" after '{p1}'"
    return [w + suffix for w in what]


def _contextual_readings(top: list[Example], wide: list[Example]) -> list[str]:
    """Heads (whose write norm depends on context more than on the token): a single token,
    the top tokens, the token's category (over the top examples, or over top and spread),
    each alone or after the most common previous token or previous-token category, and any
    token after such a context."""
    n = len(top)
    tok = Counter(e.tokens[e.position].strip() for e in top)
    cats = Counter(category_of(e.tokens[e.position]) for e in top)
    wide_cats = Counter(category_of(e.tokens[e.position]) for e in wide)
    prev = Counter(e.tokens[e.position - 1].strip() for e in top if e.position > 0)
    prev_cats = Counter(category_of(e.tokens[e.position - 1]) for e in top if e.position > 0)
    what = []
    (t1, c1), = tok.most_common(1)
    if c1 >= 0.3 * n:
        what.append(f"the token '{t1}'")
    for cat, cc in cats.most_common(2):
        if cat is not None and cc >= 0.4 * n:
            eg = [t for t, _ in tok.most_common() if category_of(t) == cat][:3]
            what.append(f"{cat} (e.g. {_q(eg)})")
    wcat, wc = wide_cats.most_common(1)[0]
    wide_tokens = sorted({e.tokens[e.position].strip() for e in wide if category_of(e.tokens[e.position]) == wcat})
    if wcat is not None and wc >= 0.5 * len(wide) and len(wide_tokens) >= 3 and not any(w.startswith(wcat) for w in what):
        what.append(f"{wcat} (e.g. {_q(wide_tokens[:3])})")
    for k in (2, 4, 6):
        if len(tok) >= k:
            what.append(f"tokens such as {_q(t for t, _ in tok.most_common(k))}")
    if not what:
        what.append(f"the token '{t1}'")
    after = [""]
    if prev:
        (p1, pc), = prev.most_common(1)
        if pc >= 0.3 * n:
            after.append(f" after '{p1}'")
    if prev_cats:
        (pcat, pcc), = prev_cats.most_common(1)
        if pcat is not None and pcc >= 0.5 * n:
            after.append(f" after {pcat}")
    return [w + a for w in what for a in after] + [f"any token{a}" for a in after[1:]]


def _fit(reading: str, examples: list, threshold: float) -> tuple[Score, Score]:
    """How a reading fits the examples it is written from: its simulation score (tokens)
    and its detection score (windows: one fires when it reaches `threshold`)."""
    sims = [simulate_offline(f"fires on {reading}", e.tokens) for e in examples]
    sim = simulation_score(sims, [e.activations for e in examples], "offline")
    det = classification_score("detection", [max(s, default=0.0) >= 0.5 for s in sims],
                               [max(e.activations, default=0.0) >= threshold for e in examples], "offline")
    return sim, det


def _merit(fit: tuple[Score, Score]) -> float:
    """Both scores as gains over chance on a 0-1 scale, averaged: a reading must find the
    firing tokens (simulation) without claiming windows that do not fire (detection)."""
    sim, det = fit
    return ((sim.value or 0.0) + 2 * ((det.value if det.value is not None else 0.5) - 0.5)) / 2


def heuristic_explanation(top: list[Example], boosts: list[str] | None = None,
                          spread: list[Example] | None = None, background: list | None = None,
                          threshold: float | None = None) -> tuple[str, dict]:
    """A one-line description from top examples (and the tokens the component's output
    direction boosts, if given). `spread`: examples from across the activation range
    (quantile samples); `background`: windows of typical text (objects with tokens and
    activations); `threshold`: the activation at which a window fires (default 0.4 x the
    top activation). Of the candidate readings, the one that fits the examples it is
    written from best is kept (never the held-out ones that score it): for neurons and
    latents the best simulation of top and spread (`_readings`); for heads the best of
    simulation and window detection on top, spread and background (`_contextual_readings`,
    `_merit`). When neither the kept reading's simulation nor its detection interval on
    top, spread and background lies above chance, no claim is made.
    Returns (explanation, evidence)."""
    if not top or max(e.activation for e in top) <= 0:
        return "rarely or never active on the dataset", {"n_examples": len(top)}
    tok = Counter(e.tokens[e.position].strip() for e in top)
    cats = Counter(category_of(e.tokens[e.position]) for e in top)
    prev = Counter(e.tokens[e.position - 1].strip() for e in top if e.position > 0)
    wide = top + [e for e in spread or [] if e.activation > 0]
    thr = threshold if threshold is not None else 0.4 * max(e.activation for e in top)
    typical = wide + list(background or [])
    if any(e.attended_token is not None for e in top):  # a head: contextual readings, judged on typical text too
        fits = {r: _fit(r, typical, thr) for r in _contextual_readings(top, wide)}
        best = max(fits, key=lambda r: _merit(fits[r]))
    else:  # the reading that simulates the examples best; the verdict on it also reads typical text
        fits = {r: _fit(r, wide, thr) for r in _readings(top, wide)}
        best = max(fits, key=lambda r: fits[r][0].value or 0.0)
        fits[best] = _fit(best, typical, thr)
    fit, det = fits[best]
    evidence: dict = {"top_tokens": dict(tok.most_common(8)), "previous_tokens": dict(prev.most_common(5)),
                      "categories": {k or "other": v for k, v in cats.most_common(5)},
                      "fit": {"reading": best, "simulation": round(fit.value or 0.0, 4),
                              "simulation_low": None if fit.low is None else round(fit.low, 4),
                              "detection": None if det.value is None else round(det.value, 4), "n": fit.n}}
    if not (fit.above_chance or det.above_chance):
        text = f"no reading fits above chance (most active on {_q(t for t, _ in tok.most_common(4))})"
    else:
        text = f"fires on {best}"
    clause, att = attention_clause(top)
    evidence.update(att)
    if clause:
        text += f"; {clause}"
    if boosts:
        text += f"; boosts {_q(boosts[:3])}"
        evidence["boosts"] = boosts
    return text, evidence


MOST = 0.6  # an attention role must hold for this fraction of the top examples to be claimed


def role_of(e: Example) -> str | None:
    """The role of the key an example's query attended to most, read from its window."""
    off = e.attended_offset
    if off is None:
        return None
    k, cur = e.position + off, e.tokens[e.position].strip()
    if off == 0:
        return "the current token"
    if off == -1:
        return "the previous token"
    if e.attended_token is not None and e.attended_token.strip() in V.SPECIAL_TOKENS:
        return "the start-of-text token"
    if 0 <= k < len(e.tokens) and e.tokens[k].strip() == cur:
        return "an earlier copy of the current token"
    if 1 <= k < len(e.tokens) and e.tokens[k - 1].strip() == cur:
        return "the token after an earlier copy of the current token (induction)"
    return None


def attention_clause(examples: list[Example]) -> tuple[str | None, dict]:
    """Heads: 'attends to <role>' when one role (or one token, or one category) covers most
    top examples, with the typical offset when it varies; plus the evidence counted."""
    keys = [e for e in examples if e.attended_token is not None]
    if not keys:
        return None, {}
    n = len(keys)
    roles = Counter(role_of(e) for e in keys)
    att = Counter(e.attended_token.strip() for e in keys)
    cats = Counter(category_of(e.attended_token) for e in keys)
    offs = [e.attended_offset for e in keys]
    evidence = {"attended_tokens": dict(att.most_common(5)),
                "attended_roles": {k or "other": v for k, v in roles.most_common(4)},
                "attended_offsets": {str(k): v for k, v in Counter(offs).most_common(5)}}
    (role, rc), = roles.most_common(1)
    (a1, ac), = att.most_common(1)
    (cat, cc), = cats.most_common(1)
    back = f" (typically {-int(np.median(offs))} tokens back)" if np.median(offs) < -1 else ""
    if role is not None and rc >= MOST * n:
        return f"attends to {role}", evidence
    if ac >= MOST * n:
        return f"attends to '{a1}'{back}", evidence
    if cat is not None and cc >= MOST * n:
        return f"attends to {cat}{back}", evidence
    return None, evidence


_QUOTED = re.compile(r"'([^']+)'")


def simulate_offline(explanation: str, tokens: list[str]) -> list[float]:
    """Predicted activation per token from the explanation's 'fires on' clause: 1 on a
    named token (quoted, or a member of a named category; 'any token' names all), 0.5 when
    an 'after' context (quoted tokens or a category) is given and the previous token is not
    in it (0 for 'any token'), 0 elsewhere."""
    clause = explanation.split(";")[0]
    if not clause.startswith("fires on"):
        return [0.0] * len(tokens)
    main, _, after = clause.partition(" after ")
    words = _named(main)
    anything = main.startswith("fires on any token")
    ctx = _named(after) if after else set()
    out = []
    for i, t in enumerate(tokens):
        hit = anything or t.strip() in words
        if hit and after and (i == 0 or tokens[i - 1].strip() not in ctx):
            out.append(0.0 if anything else 0.5)
        else:
            out.append(1.0 if hit else 0.0)
    return out


def _named(text: str) -> set[str]:
    """The tokens a phrase names: a named category's members ("names (e.g. ...)": the whole
    category, not only the examples), else its quoted tokens."""
    cats = [c for c in CATEGORIES if c in text and "the token" not in text and "such as" not in text]
    if cats:
        return set().union(*(CATEGORIES[c] for c in cats))
    return set(_QUOTED.findall(text))
