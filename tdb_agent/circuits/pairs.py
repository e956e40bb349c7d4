"""The behaviour a circuit explains: a built-in task (regenerated from its seed) or explicit
prompt pairs. Stored in the graph so that a saved circuit can be re-validated anywhere."""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

from tdb_agent.errors import TdbError
from tdb_agent.tasks import task_examples, task_names


class PromptPair(BaseModel):
    prompt: str = Field(min_length=1)
    corrupted_prompt: str | None = Field(None, description="same length as prompt; needed for resample ablation")
    target: str = Field(min_length=1)
    distractor: str | None = Field(None, description="without it the metric is log p(target)")


class Behaviour(BaseModel):
    """Either `task` (with n pairs from `seed`) or explicit `pairs`."""

    task: str | None = None
    n: int = Field(16, ge=1, le=512, description="pairs drawn from the task")
    seed: int = 0
    pairs: list[PromptPair] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_source(self) -> "Behaviour":
        if (self.task is None) == (not self.pairs):
            raise TdbError("a behaviour is either a task name or a list of prompt pairs (exactly one of them)")
        if self.task is not None and self.task not in task_names():
            raise TdbError(f"unknown task {self.task!r}; tasks: {', '.join(task_names())}")
        return self

    def resolve(self) -> list[PromptPair]:
        if self.task is None:
            return list(self.pairs)
        return [PromptPair(**ex.model_dump()) for ex in task_examples(self.task, self.n, seed=self.seed)]

    def describe(self) -> str:
        return f"task {self.task} (n={self.n}, seed={self.seed})" if self.task else f"{len(self.pairs)} prompt pairs"
