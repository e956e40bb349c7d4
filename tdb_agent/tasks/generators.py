"""Seeded generators of behaviour tasks and of the training corpus of the bundled model.

One module produces both, so the behaviours the model is evaluated on are exactly the
ones planted in its training text. Each task gives prompt pairs (clean, corrupted) with a
single-token target and distractor; `document` gives one training document.

Held-out splits: IOI holds out one name pair in ten (`_heldout_pair`), induction draws
fresh random segments, greater-than and facts are evaluated on prompt templates the
training text also uses (the model must generalise over years / recall memorised facts).
"""

from __future__ import annotations

import random
from typing import Callable, Literal

from pydantic import BaseModel

from tdb_agent.tasks import vocab as V

Split = Literal["train", "test"]


class TaskExample(BaseModel):
    """One prompt pair: the model should prefer `target` over `distractor` on `prompt`;
    `corrupted_prompt` removes the information that makes `target` right."""

    prompt: str
    corrupted_prompt: str
    target: str
    distractor: str


class TaskInfo(BaseModel):
    name: str
    description: str
    metric: Literal["logit_diff", "logprob"] = "logit_diff"


# --------------------------------------------------------------------------- IOI

IOI_TEMPLATES = [
    "When {A} and {B} went to the {place} , {S} gave a {obj} to",
    "Then , {A} and {B} had a long argument . Afterwards {S} said to",
    "{A} and {B} went to the {place} . {S} gave the {obj} to",
    "After {A} and {B} found a {obj} at the {place} , {S} handed it to",
    "While {A} and {B} were working at the {place} , {S} passed a {obj} to",
    "At the {place} , {A} met {B} . Later that day {S} brought a {obj} to",
    "The {place} was quiet when {A} and {B} arrived . {S} offered a {obj} to",
    "Yesterday {A} and {B} visited the {place} , and then {S} sent a letter to",
    "{A} and {B} were very busy at the {place} . In the evening the {obj} was sold by {S} to",
    "It was a warm day . {A} met {B} near the {place} and {S} showed the {obj} to",
]


def _heldout_pair(a: str, b: str) -> bool:
    """One unordered name pair in ten is never seen together in training."""
    i, j = sorted((V.NAMES.index(a), V.NAMES.index(b)))
    return (i * 7 + j * 13) % 10 == 0


def _name_pair(rng: random.Random, split: Split) -> tuple[str, str]:
    while True:
        a, b = rng.sample(V.NAMES, 2)
        if _heldout_pair(a, b) == (split == "test"):
            return a, b


def ioi_example(rng: random.Random, split: Split = "test") -> TaskExample:
    io, s = _name_pair(rng, split)
    template = rng.choice(IOI_TEMPLATES)
    first, second = (io, s) if rng.random() < 0.5 else (s, io)  # ABBA or BABA
    fill = dict(A=first, B=second, place=rng.choice(V.PLACES), obj=rng.choice(V.OBJECTS))
    c = rng.choice([n for n in V.NAMES if n not in (io, s)])
    return TaskExample(
        prompt=template.format(S=s, **fill),
        corrupted_prompt=template.format(S=c, **fill),  # "ABC": no repeated name
        target=io,
        distractor=s,
    )


def ioi_document(rng: random.Random) -> str:
    ex = ioi_example(rng, "train")
    return f"{ex.prompt} {ex.target} ."


# --------------------------------------------------------------------------- induction

def _segment(rng: random.Random, length: int) -> list[str]:
    return rng.sample(V.NONSENSE + V.OBJECTS + V.ANIMALS + V.ADJECTIVES, length)


def induction_sequence(rng: random.Random) -> tuple[list[str], list[str], int]:
    """A random prefix, then a random segment tiled with a variable period.

    Returns (prefix, tiled tokens, period). The period varies (5-16) and so does the
    prefix length, so the position of the repeat is no cue: only copying works.
    """
    period = rng.randint(5, 16)
    prefix = _segment(rng, rng.randint(0, 8))
    seg = _segment(rng, period)
    reps = rng.randint(2, 4)
    tiled = (seg * reps)[: period * reps - rng.randint(0, period - 2)]
    return prefix, tiled, period


def induction_example(rng: random.Random, split: Split = "test") -> TaskExample:
    prefix, tiled, period = induction_sequence(rng)
    cut = rng.randint(period + 1, len(tiled) - 1)  # predict a token of the repeated part
    prompt_toks = prefix + tiled[:cut]
    target = tiled[cut]
    # distractor: another token of the segment (plausible, but not the copy)
    seg = tiled[:period]
    distractor = rng.choice([t for t in seg if t != target and t != prompt_toks[-1]])
    # every earlier occurrence of the segment is replaced by words outside it, only the
    # last (partial) repeat is kept: nothing is left to copy (replacing the first occurrence
    # alone left a copy in 39% of pairs, where the corrupted prompt still predicted the target)
    current = ((cut - 1) // period) * period  # where the repeat holding the last prompt word begins
    pool = [t for t in V.NONSENSE + V.OBJECTS + V.ANIMALS + V.ADJECTIVES if t not in seg]
    corrupted = prefix + [rng.choice(pool) for _ in range(current)] + tiled[current:cut]
    return TaskExample(prompt=" ".join(prompt_toks), corrupted_prompt=" ".join(corrupted),
                       target=target, distractor=distractor)


def induction_document(rng: random.Random) -> str:
    prefix, tiled, _ = induction_sequence(rng)
    return " ".join(prefix + tiled)


# --------------------------------------------------------------------------- greater-than

GT_TEMPLATES = [
    "The {event} lasted from the year {c}{yy} to the year {c}",
    "The {event} began in the year {c}{yy} and ended in the year {c}",
]
CENTURIES = ["11", "12", "13", "14", "15", "16", "17", "18", "19"]


def greater_than_example(rng: random.Random, split: Split = "test") -> TaskExample:
    yy = rng.randint(2, 97)
    c = rng.choice(CENTURIES)
    template = rng.choice(GT_TEMPLATES)
    event = rng.choice(V.EVENTS)
    return TaskExample(
        prompt=template.format(event=event, c=c, yy=f"{yy:02d}"),
        corrupted_prompt=template.format(event=event, c=c, yy="01"),
        target=f"{yy + 1:02d}",
        distractor=f"{yy - 1:02d}",
    )


def greater_than_document(rng: random.Random) -> str:
    yy = rng.randint(2, 97)
    end = rng.randint(yy + 1, 99)
    c = rng.choice(CENTURIES)
    text = rng.choice(GT_TEMPLATES).format(event=rng.choice(V.EVENTS), c=c, yy=f"{yy:02d}")
    return f"{text}{end:02d} ."


# --------------------------------------------------------------------------- facts

def _capital(country: str) -> str:
    return V.CAPITALS[V.COUNTRIES.index(country)]


def _language(country: str) -> str:
    return V.LANGUAGES[V.COUNTRIES.index(country) % len(V.LANGUAGES)]


FACT_PROMPTS: list[tuple[str, Callable[[str], str]]] = [
    ("The capital of {E} is", _capital),
    ("The people of {E} speak", _language),
]
FACT_TRAIN_TEXTS = FACT_PROMPTS + [
    ("In {E} , the capital is", _capital),
    ("The language of {E} is", _language),
]


def facts_example(rng: random.Random, split: Split = "test") -> TaskExample:
    country, other = rng.sample(V.COUNTRIES, 2)
    template, attr = rng.choice(FACT_PROMPTS)
    target, distractor = attr(country), attr(other)
    while distractor == target:  # languages are shared between countries
        other = rng.choice(V.COUNTRIES)
        distractor = attr(other)
    return TaskExample(prompt=template.format(E=country), corrupted_prompt=template.format(E=other),
                       target=target, distractor=distractor)


def facts_document(rng: random.Random) -> str:
    country = rng.choice(V.COUNTRIES)
    template, attr = rng.choice(FACT_TRAIN_TEXTS)
    return f"{template.format(E=country)} {attr(country)} ."


# --------------------------------------------------------------------------- narrative

NARRATIVE_SENTENCES = [
    "{A} {verb} to the {place} .",
    "{A} saw a {adj} {animal} near the {place} .",
    "The {animal} was {adj} and {adj2} .",
    "{A} {give} a {obj} to {B} .",
    "{A} liked the {adj} {obj} .",
    "In the morning {A} {verb} at the {place} .",
    "{A} and {B} ate a {obj} at the {place} .",
    "It was a {adj} day at the {place} .",
    "{A} found a {obj} and took it home .",
    "Later {B} {verb} with {A} .",
]


def narrative_document(rng: random.Random) -> str:
    a, b = rng.sample(V.NAMES, 2)
    sentences = []
    for _ in range(rng.randint(2, 6)):
        adj, adj2 = rng.sample(V.ADJECTIVES, 2)
        sentences.append(rng.choice(NARRATIVE_SENTENCES).format(
            A=a, B=b, verb=rng.choice(V.VERBS_PAST), place=rng.choice(V.PLACES), adj=adj, adj2=adj2,
            animal=rng.choice(V.ANIMALS), give=rng.choice(V.GIVE_VERBS), obj=rng.choice(V.OBJECTS)))
        if rng.random() < 0.3:
            a, b = b, a
    return " ".join(sentences)


# --------------------------------------------------------------------------- registry

TASKS: dict[str, tuple[TaskInfo, Callable[[random.Random, Split], TaskExample]]] = {
    "ioi": (TaskInfo(name="ioi", description="Indirect object identification: after 'A and B ... "
                     "B gave X to', predict the indirect object A rather than the repeated name B."),
            ioi_example),
    "induction": (TaskInfo(name="induction", description="Induction: a random token segment repeats "
                           "with a variable period; predict the token that followed the current "
                           "token last time."), induction_example),
    "greater_than": (TaskInfo(name="greater_than", description="Greater-than: 'from the year 1732 to "
                              "the year 17' -> a two-digit year ending above 32 (target: one above, "
                              "distractor: one below)."), greater_than_example),
    "facts": (TaskInfo(name="facts", description="Recall of synthetic facts: 'The capital of Zorvia "
                       "is' -> its capital."), facts_example),
}

#: Training mix (fractions of documents), from REFERENCES: induction is learned last.
CORPUS_MIX: list[tuple[float, Callable[[random.Random], str]]] = [
    (0.31, induction_document),
    (0.25, ioi_document),
    (0.18, greater_than_document),
    (0.07, facts_document),
    (0.19, narrative_document),
]


def task_names() -> list[str]:
    return list(TASKS)


def task_info(name: str) -> TaskInfo:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return TASKS[name][0]


def task_examples(name: str, n: int, seed: int = 0, split: Split = "test") -> list[TaskExample]:
    """`n` seeded prompt pairs of a task (the same `seed` gives the same pairs)."""
    task_info(name)
    rng = random.Random(f"{name}-{split}-{seed}")
    return [TASKS[name][1](rng, split) for _ in range(n)]


def corpus_documents(n: int, seed: int) -> list[str]:
    """`n` training documents drawn from the task mix."""
    rng = random.Random(seed)
    weights = [w for w, _ in CORPUS_MIX]
    makers = [m for _, m in CORPUS_MIX]
    return [rng.choices(makers, weights)[0](rng) for _ in range(n)]
