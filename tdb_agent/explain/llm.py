"""LLM explainer and simulator through any OpenAI-compatible endpoint (`openai` client).

Settings come from arguments or the environment: TDB_EXPLAINER_BASE_URL (else
OPENAI_BASE_URL), TDB_EXPLAINER_MODEL (else TDB_AGENT_LLM_MODEL, else gpt-4o-mini) and
TDB_EXPLAINER_API_KEY (else OPENAI_API_KEY). Prompt templates: prompts/explain_component.md
and prompts/simulate_activations.md (Bills et al. 2023: activations shown on a 0-10 scale).
"""

from __future__ import annotations

import json
import os
import re

from pydantic import BaseModel, Field

from tdb_agent import PROMPTS
from tdb_agent.datasets.store import Example
from tdb_agent.errors import TdbError



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


def _template(name: str) -> str:
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

    def _chat(self, prompt: str) -> str:
        import openai

        try:
            r = self.client.chat.completions.create(model=self.settings.model, temperature=0,
                                                    messages=[{"role": "user", "content": prompt}])
        except openai.OpenAIError as e:
            raise TdbError(f"the explainer LLM at {self.settings.base_url or 'api.openai.com'} failed: {e}") from e
        return (r.choices[0].message.content or "").strip()

    def explain(self, component: str, examples: list[Example], top: float) -> str:
        prompt = _template("explain_component.md").format(component=component,
                                                          examples=format_examples(examples, top))
        text = self._chat(prompt).splitlines()
        text = next((t for t in text if t.strip()), "")
        return text.strip().strip('"').removeprefix("Explanation:").strip()

    def simulate(self, explanation: str, tokens: list[str]) -> list[float]:
        listing = "\n".join(f"{i}\t{t.strip() or repr(t)}" for i, t in enumerate(tokens))
        prompt = _template("simulate_activations.md").format(explanation=explanation, n=len(tokens), tokens=listing)
        return parse_activations(self._chat(prompt), len(tokens))


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
