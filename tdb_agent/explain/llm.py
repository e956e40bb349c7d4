"""LLM explainer and simulator. The model is any `TextModel` (a prompt in, a reply out):
an OpenAI-compatible endpoint (`LLMClient`, `openai` client) here, or the MCP client's own
model through sampling (supplied by the server wiring). The prompts are the same for both.

Settings come from arguments or the environment: TDB_EXPLAINER_BASE_URL (else
OPENAI_BASE_URL), TDB_EXPLAINER_MODEL (else TDB_AGENT_LLM_MODEL, else gpt-4o-mini) and
TDB_EXPLAINER_API_KEY (else OPENAI_API_KEY). Prompt templates: prompts/explain_component.md
and prompts/simulate_activations.md (Bills et al. 2023: activations shown on a 0-10 scale).
"""

from __future__ import annotations

import hashlib
import json
import os
import re

from typing import Protocol

from pydantic import BaseModel, Field

from tdb_agent import PROMPTS
from tdb_agent.datasets.store import Example
from tdb_agent.errors import TdbError


class TextModel(Protocol):
    """A language model as the explainer needs it: one prompt in, the reply's text out.
    `name` says which model answered (it may change after the first reply, e.g. when the
    MCP client reports the model it chose). Failures raise TdbError."""
    name: str

    def __call__(self, prompt: str) -> str: ...


class ExplainerLLM(BaseModel):
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint")
    model: str = "gpt-4o-mini"
    api_key: str | None = None
    timeout_s: float = 60.0
    max_retries: int = 2

    @classmethod
    def from_env(cls, **overrides) -> "ExplainerLLM":
        env = os.environ.get
        values = {"base_url": env("TDB_EXPLAINER_BASE_URL") or env("OPENAI_BASE_URL"),
                  "model": env("TDB_EXPLAINER_MODEL") or env("TDB_AGENT_LLM_MODEL") or "gpt-4o-mini",
                  "api_key": env("TDB_EXPLAINER_API_KEY") or env("OPENAI_API_KEY")}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def configured(self) -> bool:
        return bool(self.base_url or self.api_key)


def template(name: str) -> str:
    path = PROMPTS / name
    if not path.exists():
        raise TdbError(f"prompt template {path} is missing")
    return path.read_text()


def scaled(acts: list[float], top: float) -> list[int]:
    """Activations on Bills et al.'s 0-10 integer scale (negative -> 0)."""
    if top <= 0:
        return [0] * len(acts)
    return [max(0, min(10, round(10 * a / top))) for a in acts]


def format_examples(examples: list[Example], top: float) -> str:
    blocks = []
    for n, e in enumerate(examples, 1):
        rows = "\n".join(f"{t.strip() or repr(t)}\t{s}" for t, s in zip(e.tokens, scaled(e.activations, top)))
        blocks.append(f"Example {n}:\n{rows}")
    return "\n\n".join(blocks)


class LLMClient:
    def __init__(self, settings: ExplainerLLM):
        from openai import OpenAI

        if not settings.configured:
            raise TdbError("no LLM is configured for explanations: set TDB_EXPLAINER_BASE_URL / OPENAI_BASE_URL "
                           "(and a key), or use method 'heuristic'")
        self.settings = settings
        self.client = OpenAI(base_url=settings.base_url, api_key=settings.api_key or "none",
                             timeout=settings.timeout_s, max_retries=settings.max_retries)

    @property
    def name(self) -> str:
        return self.settings.model

    def __call__(self, prompt: str) -> str:
        return self._chat(prompt)

    def _chat(self, prompt: str) -> str:
        import openai

        try:
            r = self.client.chat.completions.create(model=self.settings.model, temperature=0,
                                                    messages=[{"role": "user", "content": prompt}])
        except openai.OpenAIError as e:
            raise TdbError(f"the explainer LLM at {self.settings.base_url or 'api.openai.com'} failed: {e}") from e
        return (r.choices[0].message.content or "").strip()

    def explain(self, component: str, examples: list[Example], top: float) -> str:
        return explain_with(self, component, examples, top)

    def simulate(self, explanation: str, tokens: list[str]) -> list[float]:
        return simulate_with(self, explanation, tokens)


def explain_with(model: TextModel, component: str, examples: list[Example], top: float) -> str:
    """The model's one-line explanation from examples (prompts/explain_component.md); a
    reply with no usable line is an error, not an empty explanation."""
    prompt = template("explain_component.md").format(component=component, examples=format_examples(examples, top))
    lines = model(prompt).splitlines()
    text = next((t for t in lines if t.strip()), "").strip().strip('"').removeprefix("Explanation:").strip()
    if not text or len(text) > 300:
        raise TdbError(f"the explainer model ({model.name}) gave no usable explanation (reply {text[:80]!r}); "
                       "try again or use method 'heuristic'")
    return text


def simulate_with(model: TextModel, explanation: str, tokens: list[str]) -> list[float]:
    listing = "\n".join(f"{i}\t{t.strip() or repr(t)}" for i, t in enumerate(tokens))
    prompt = template("simulate_activations.md").format(explanation=explanation, n=len(tokens), tokens=listing)
    return parse_activations(model(prompt), len(tokens))


def parse_activations(text: str, n: int) -> list[float]:
    """The first JSON list of numbers in the reply, clipped to 0-10 and fitted to n tokens
    (missing entries are 0)."""
    m = re.search(r"\[[^\[\]]*\]", text)
    values: list[float] = []
    if m:
        try:
            values = [float(v) for v in json.loads(m.group(0))]
        except (ValueError, TypeError):
            values = []
    values = [min(10.0, max(0.0, v)) for v in values[:n]]
    return values + [0.0] * (n - len(values))


def parse_labels(text: str, n: int) -> list[bool] | None:
    """The first JSON list of n 0/1 answers in the reply, or None when there is none of that
    length (a malformed answer is not read as a row of 'no')."""
    m = re.search(r"\[[^\[\]]*\]", text)
    if not m:
        return None
    try:
        values = json.loads(m.group(0))
    except ValueError:
        return None
    if len(values) != n or not all(isinstance(v, (int, float, bool)) and v in (0, 1) for v in values):
        return None
    return [bool(v) for v in values]


class AnswersPending(Exception):
    """The prompts a `ReplayModel` could not answer yet (not a TdbError: nothing failed; the
    caller asks them all at once, e.g. in one MCP input-required round, and runs again)."""

    def __init__(self, prompts: list[str]):
        super().__init__(f"{len(prompts)} prompts await answers")
        self.prompts = prompts


def prompt_digest(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:24]


class ReplayModel:
    """A model whose answers arrive in rounds (MCP's multi-round-trip requests): it answers
    the prompts it has answers for (by digest), and collects the others. The first prompt of
    a run that has no answer stops the run (AnswersPending): what follows depends on it (the
    explanation the readers read). Later unanswered prompts are collected and answered with
    an empty placeholder, so one run gathers every prompt that does not depend on another
    answer; `settle()` then raises AnswersPending with them, and the result of that run is
    discarded."""

    collects = True  # readers ask every independent prompt of a run (explain/readers.py)

    def __init__(self, answers: dict[str, str] | None = None, name: str = "MCP client's model"):
        self.answers = dict(answers or {})
        self.name = name
        self.pending: list[str] = []
        self._answered = 0

    def __call__(self, prompt: str) -> str:
        known = self.answers.get(prompt_digest(prompt))
        if known is not None:
            self._answered += 1
            return known
        if not self._answered:
            raise AnswersPending([prompt])
        if prompt not in self.pending:
            self.pending.append(prompt)
        return ""

    def settle(self) -> None:
        if self.pending:
            raise AnswersPending(list(self.pending))
