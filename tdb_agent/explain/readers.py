"""Readers of an explanation: given only the explanation, they simulate activations, detect
which contexts fire and judge whether highlighted tokens are the firing ones. The offline
reader is the heuristic simulator (no LLM); the LLM reader asks any `TextModel` with the
prompts in prompts/ (simulate_activations, detect_activation, fuzz_highlights)."""

from __future__ import annotations

from pydantic import BaseModel

from tdb_agent.explain.heuristic import simulate_offline
from tdb_agent.explain.llm import TextModel, parse_labels, simulate_with, template

BATCH = 10  # contexts per detection / fuzzing request


class Highlighted(BaseModel):
    tokens: list[str]
    marked: list[int]
    correct: bool  # the marks are the firing tokens (else random non-firing ones)


def _listing(tokens: list[str], marked: set[int] = frozenset()) -> str:
    return "\n".join(f"<<{t.strip() or repr(t)}>>" if i in marked else (t.strip() or repr(t))
                     for i, t in enumerate(tokens))


class OfflineReader:
    """The heuristic reader: a context fires where the offline simulator predicts at least
    0.5 somewhere; marks fit when most marked tokens are predicted at least 0.5."""
    name = "offline"
    calls = 0

    def simulate(self, explanation: str, tokens: list[str]) -> list[float]:
        return simulate_offline(explanation, tokens)

    def detect(self, explanation: str, contexts: list[list[str]]) -> list[bool] | None:
        return [max(simulate_offline(explanation, t), default=0.0) >= 0.5 for t in contexts]

    def fuzz(self, explanation: str, items: list[Highlighted]) -> list[bool] | None:
        out = []
        for it in items:
            sim = simulate_offline(explanation, it.tokens)
            out.append(sum(sim[i] >= 0.5 for i in it.marked) * 2 > len(it.marked))
        return out


class LLMReader:
    """A language model reads the explanation (Bills et al. simulation one example per
    request; detection and fuzzing BATCH contexts per request, answered as a JSON list)."""

    def __init__(self, model: TextModel):
        self.model = model
        self.calls = 0

    @property
    def name(self) -> str:
        return f"llm:{self.model.name}"

    def _ask(self, prompt: str) -> str:
        self.calls += 1
        return self.model(prompt)

    def simulate(self, explanation: str, tokens: list[str]) -> list[float]:
        self.calls += 1
        return simulate_with(self.model, explanation, tokens)

    def _batched(self, name: str, explanation: str, blocks: list[str]) -> list[bool] | None:
        """None when any answer is malformed: a model that answers one prompt at a time is
        not asked further; one that collects prompts to answer them in rounds
        (`ReplayModel.collects`) is asked every batch, as none depends on another's answer."""
        out: list[bool] | None = []
        for i in range(0, len(blocks), BATCH):
            part = blocks[i: i + BATCH]
            listing = "\n\n".join(f"Context {j + 1}:\n{b}" for j, b in enumerate(part))
            labels = parse_labels(self._ask(template(name).format(explanation=explanation, n=len(part),
                                                                  contexts=listing)), len(part))
            out = None if labels is None or out is None else out + labels
            if out is None and not getattr(self.model, "collects", False):
                return None
        return out

    def detect(self, explanation: str, contexts: list[list[str]]) -> list[bool] | None:
        return self._batched("detect_activation.md", explanation, [_listing(t) for t in contexts])

    def fuzz(self, explanation: str, items: list[Highlighted]) -> list[bool] | None:
        return self._batched("fuzz_highlights.md", explanation, [_listing(it.tokens, set(it.marked)) for it in items])
