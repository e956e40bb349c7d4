"""Checks of the per-call limits (`Workbench.limits`). Every message names the limit and
the flag that sets it, so a model knows it hit a server limit rather than a bad argument."""

from __future__ import annotations

from tdb_agent.engine.tokens import with_bos
from tdb_agent.errors import TdbError
from tdb_agent.workbench import Limits, Workbench


class LimitExceeded(TdbError):
    pass


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _exceeded(what: str, name: str, value: int, limits: Limits) -> LimitExceeded:
    return LimitExceeded(f"{what} exceeds the limit {name}={getattr(limits, name)} "
                         f"(set by `tdb-agent serve {flag(name)}`)")


class LimitChecks:
    def __init__(self, bench: Workbench):
        self.engine = bench.engine
        self.limits = bench.limits

    def text(self, *texts: str | None, field: str = "prompt") -> None:
        """Each text within max_prompt_chars, then within max_prompt_tokens once tokenized."""
        lim = self.limits
        for text in texts:
            if text is None:
                continue
            if len(text) > lim.max_prompt_chars:
                raise _exceeded(f"the {field} ({len(text)} characters)", "max_prompt_chars", len(text), lim)
            ids = self.engine.tokenizer(text, add_special_tokens=False)["input_ids"]
            n = len(with_bos(self.engine.tokenizer, ids))  # as the engine will read it
            if n > lim.max_prompt_tokens:
                raise _exceeded(f"the {field} ({n} tokens)", "max_prompt_tokens", n, lim)

    def at_most(self, limit: str, value: int, field: str) -> None:
        """A number at most the named limit (what `service.tool.AtMost` marks)."""
        if value > getattr(self.limits, limit):
            raise _exceeded(f"{field}={value}", limit, value, self.limits)

    def items(self, limit: str, n: int, field: str) -> None:
        """A list of at most the named limit of items (what `service.tool.AtMostItems` marks)."""
        if n > getattr(self.limits, limit):
            raise _exceeded(f"{n} {field}", limit, n, self.limits)
