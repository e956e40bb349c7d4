"""Offline explanations from dataset examples, and the offline simulator that scores them.

An explanation reads "fires on <what>[ after '<prev>'][; attends to ...][; boosts 'a', 'b']".
The offline simulator reads only the "fires on" clause: quoted tokens and category names
(names, places, years, ... of the synthetic world; words in general otherwise) and predicts
1 on a matching token (0.5 when an "after" context is given and the previous token differs),
0 elsewhere. Score = correlation of that prediction with the true activations (Bills et al.).
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from tdb_agent.datasets.store import Example
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


def heuristic_explanation(top: list[Example], boosts: list[str] | None = None,
                          spread: list[Example] | None = None) -> tuple[str, dict]:
    """A one-line description from top examples (and the tokens the component's output
    direction boosts, if given). `spread`: examples from across the activation range
    (quantile samples); a category that covers them and the top examples with at least
    three distinct tokens wins over a single top token. Returns (explanation, evidence)."""
    if not top or max(e.activation for e in top) <= 0:
        return "rarely or never active on the dataset", {"n_examples": len(top)}
    tok = Counter(e.tokens[e.position].strip() for e in top)
    cats = Counter(category_of(e.tokens[e.position]) for e in top)
    prev = Counter(e.tokens[e.position - 1].strip() for e in top if e.position > 0)
    n = len(top)
    (t1, c1), = tok.most_common(1)
    cat, cc = cats.most_common(1)[0]
    wide = top + [e for e in spread or [] if e.activation > 0]
    wide_cats = Counter(category_of(e.tokens[e.position]) for e in wide)
    wcat, wc = wide_cats.most_common(1)[0]
    wide_tokens = {e.tokens[e.position].strip() for e in wide if category_of(e.tokens[e.position]) == wcat}
    options = []
    if c1 >= 0.6 * n:
        options.append(f"the token '{t1}'")
    if cat is not None and cc >= 0.6 * n:
        eg = [t for t, _ in tok.most_common() if category_of(t) == cat][:3]
        options.append(f"{cat} (e.g. {_q(eg)})")
    if wcat is not None and not (wcat == cat and cc >= 0.6 * n) and wc >= 0.6 * len(wide) and len(wide_tokens) >= 3:
        options.append(f"{wcat} (e.g. {_q(sorted(wide_tokens)[:3])})")
    if not options:
        options.append(f"tokens such as {_q(t for t, _ in tok.most_common(4))}")
    suffix = ""
    if prev:
        (p1, pc), = prev.most_common(1)
        if pc >= 0.5 * n:
            suffix = f" after '{p1}'"
    # several readings fit: keep the one that simulates best on the examples it was written
    # from (top and spread; the held-out examples that score it are not looked at)
    acts = [a for e in wide for a in e.activations]

    def fit(what: str) -> float:
        return correlation([a for e in wide for a in simulate_offline(f"fires on {what}{suffix}", e.tokens)], acts)

    what = max(options, key=fit) if len(options) > 1 else options[0]
    text = f"fires on {what}{suffix}"
    evidence: dict = {"top_tokens": dict(tok.most_common(8)), "previous_tokens": dict(prev.most_common(5)),
                      "categories": {k or "other": v for k, v in cats.most_common(5)}}
    keys = [e for e in top if e.attended_token is not None]
    if keys:
        offs = Counter(e.attended_offset for e in keys)
        att = Counter(e.attended_token.strip() for e in keys)
        (o1, oc), = offs.most_common(1)
        (a1, ac), = att.most_common(1)
        acat = Counter(category_of(e.attended_token) for e in keys).most_common(1)[0]
        if oc >= 0.6 * len(keys) and o1 == 0:
            text += "; attends to the current token"
        elif oc >= 0.6 * len(keys) and o1 == -1:
            text += "; attends to the previous token"
        elif ac >= 0.6 * len(keys):
            text += f"; attends to '{a1}'"
        elif acat[0] is not None and acat[1] >= 0.6 * len(keys):
            text += f"; attends to {acat[0]}"
        evidence["attended_tokens"] = dict(att.most_common(5))
        evidence["attended_offsets"] = {str(k): v for k, v in offs.most_common(5)}
    if boosts:
        text += f"; boosts {_q(boosts[:3])}"
        evidence["boosts"] = boosts
    return text, evidence


_QUOTED = re.compile(r"'([^']+)'")


def simulate_offline(explanation: str, tokens: list[str]) -> list[float]:
    """Predicted activation per token from the explanation's 'fires on' clause."""
    clause = explanation.split(";")[0]
    if not clause.startswith("fires on"):
        return [0.0] * len(tokens)
    main, _, after = clause.partition(" after ")
    words = set(_QUOTED.findall(main))
    cats = [c for c in CATEGORIES if c in main and not main.startswith("fires on the token")]
    if cats:  # "names (e.g. ...)": the whole category, not only the examples
        words = set()
        for c in cats:
            words |= CATEGORIES[c]
    ctx = _QUOTED.findall(after)
    out = []
    for i, t in enumerate(tokens):
        hit = t.strip() in words
        if hit and ctx and (i == 0 or tokens[i - 1].strip() != ctx[0]):
            out.append(0.5)
        else:
            out.append(1.0 if hit else 0.0)
    return out


def correlation(a: list[float], b: list[float]) -> float:
    """Pearson correlation; 0 when either side is constant."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])
