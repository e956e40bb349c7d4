"""Word lists of the synthetic world the bundled model is trained on.

Every word here is one token of the bundled word-level tokenizer, so names, years and
fact attributes are single tokens (the metrics of docs/DESIGN.md §4 need single-token targets).
Made-up words are generated from syllables with a fixed seed, so the lists are the same
on every machine.
"""

from __future__ import annotations

import random

NAMES = """Mary John Alice Bob Sarah James Emma David Laura Michael Anna Peter Julia Thomas
Kate Daniel Lisa Paul Rose Mark Helen George Clara Henry Grace Jack Emily Sam Lucy Tom
Sophie Adam Olivia Ben Chloe Oscar Ella Leo Mia Max Zoe Ryan Amy Luke Ruth Carl Nina
Victor Jane Hugo Iris Ivan Eva Noah Lily Owen Maya Felix Nora Simon Ava Martin Diana
Ethan Irene Frank Megan Karl Paula Steve Rachel Tony Wendy Alan Fiona Brian Gina Colin
Holly Dean Joan Eric Kelly Fred Linda Gary Molly Harry Nancy Ian Olga Jason Penny Kevin
Rita Lewis Sally Neil Tina Philip Una Roger Vera Scott Yara Walter Amber Xavier Bella
""".split()

PLACES = """store park school office beach garden station library market museum hospital
restaurant kitchen river forest church theater bakery hotel farm castle harbor bridge
village city cafe bank zoo gym lake""".split()

OBJECTS = """drink book ball letter gift key bag apple cake ring hat coin map pen lamp box
flower basket bottle cup coat shirt card photo ticket watch knife candle blanket clock
bowl toy chair painting phone guitar bicycle sandwich cookie necklace umbrella""".split()

ANIMALS = "dog cat bird horse rabbit fox owl mouse duck goat".split()

ADJECTIVES = """big small old new red blue green happy sad quiet loud bright dark warm cold
tall short young kind busy lucky clever brave calm tired hungry""".split()

VERBS_PAST = """walked ran went came looked smiled laughed waited slept sang danced
worked played read wrote cooked cleaned painted traveled rested""".split()

GIVE_VERBS = """gave handed passed brought offered sent showed threw sold lent""".split()

EVENTS = """war expedition reign drought project journey festival empire trial siege
voyage campaign construction treaty famine dynasty""".split()

COLORS = "red blue green yellow purple orange white black silver golden pink brown".split()

FUNCTION_WORDS = """the a an and to of in on at was were is it he she they then when
while after before that with for from by his her their this there had said saw
found day morning evening later afterwards yesterday long argument quiet arrived met
year lasted capital language flag color people speak visited letter very home back
up into near some all again also because so but not one two little every where
what who ate drank liked loved wanted took made gave knew thought felt began ended working
The In Later It Yesterday After Then Afterwards While When At""".split()

PUNCTUATION = list(".,!?:;")


def _made_up_words(n: int, seed: int, taken: set[str]) -> list[str]:
    """Pronounceable nonsense words (capitalised when `capital`), distinct from `taken`."""
    rng = random.Random(seed)
    onsets = "b c d f g h k l m n p r s t v z br dr gr kr pl st tr th sh".split()
    vowels = "a e i o u ai ea ou".split()
    codas = ["", "", "n", "r", "l", "s", "th", "nd", "x"]
    words: list[str] = []
    seen = set(w.lower() for w in taken)
    while len(words) < n:
        syll = rng.choice([2, 2, 3])
        w = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(syll)) + rng.choice(codas)
        if w not in seen and 4 <= len(w) <= 10:
            seen.add(w)
            words.append(w)
    return words


_BASE = set(NAMES + PLACES + OBJECTS + ANIMALS + ADJECTIVES + VERBS_PAST + GIVE_VERBS + EVENTS
            + COLORS + FUNCTION_WORDS)
_made = _made_up_words(60 + 60 + 20 + 900, seed=1234, taken=_BASE)

#: Synthetic countries, their capitals and languages: the facts the model memorises.
COUNTRIES = [w.capitalize() + "ia" for w in _made[:60]]
CAPITALS = [w.capitalize() for w in _made[60:120]]
LANGUAGES = [w.capitalize() + "ish" for w in _made[120:140]]
#: Filler words for induction segments and narrative noise.
NONSENSE = _made[140:]

#: Two-digit tokens: year endings ("1732" is tokenized as "17" "32").
TWO_DIGITS = [f"{i:02d}" for i in range(100)]

SPECIAL_TOKENS = ["<|endoftext|>", "[UNK]"]


def all_words() -> list[str]:
    """The full vocabulary in a fixed order (special tokens first)."""
    ordered: list[str] = []
    seen: set[str] = set()
    for group in (SPECIAL_TOKENS, PUNCTUATION, FUNCTION_WORDS, NAMES, PLACES, OBJECTS, ANIMALS,
                  ADJECTIVES, VERBS_PAST, GIVE_VERBS, EVENTS, COLORS, TWO_DIGITS, COUNTRIES,
                  CAPITALS, LANGUAGES, NONSENSE):
        for w in group:
            if w not in seen:
                seen.add(w)
                ordered.append(w)
    return ordered
