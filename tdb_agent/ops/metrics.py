"""Metrics (docs/DESIGN.md §4): what a logit difference or a log-probability is, in one place.

`logit_diff` = logit[target] - logit[distractor] at the last position (default when a
distractor is given); `logprob` = log p(target) at the last position (default otherwise).
Both target and distractor must be single tokens.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel

from tdb_agent.engine import Engine
from tdb_agent.errors import TdbError

MetricName = Literal["logit_diff", "logprob"]


class Metric(BaseModel):
    """A resolved metric: token ids checked, name chosen."""

    name: MetricName
    target: str
    target_id: int
    distractor: str | None = None
    distractor_id: int | None = None

    def logit_ids(self) -> list[int] | None:
        """The vocabulary entries the metric reads (None: it needs them all)."""
        if self.name == "logit_diff":
            return [self.target_id, self.distractor_id]
        return None

    def from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Metric per batch row from last-position logits [b, n] (n = len(logit_ids()) or vocab)."""
        if self.name == "logit_diff":
            if logits.shape[-1] == 2:
                return logits[..., 0] - logits[..., 1]
            return logits[..., self.target_id] - logits[..., self.distractor_id]
        return torch.log_softmax(logits.float(), dim=-1)[..., self.target_id]

    def unembed_direction(self, engine: Engine) -> torch.Tensor:
        """u such that logit_diff = normed_final_resid · u (+ unembedding bias): [d_model]."""
        W_U = engine.adapter.W_U()
        if self.name != "logit_diff":
            raise TdbError("only logit_diff is linear in the logits")
        return W_U[:, self.target_id] - W_U[:, self.distractor_id]


def make_metric(engine: Engine, target: str | None, distractor: str | None = None,
                metric: MetricName | None = None) -> Metric:
    """Resolve a metric on the next token: logit_diff or logprob at the last position.

    Args:
        target: the single token whose logit or probability is explained (required).
        distractor: optional single token, different from the target.
        metric: "logit_diff" (logit[target] - logit[distractor], needs a distractor) or
            "logprob" (log p(target), no distractor); default logit_diff when a distractor is
            given, logprob otherwise.

    Returns:
        Metric: the chosen name with the target's (and distractor's) token ids checked.
    """
    if not target:
        raise TdbError("a target token is required (the token whose logit or probability to explain)")
    name = metric or ("logit_diff" if distractor else "logprob")
    if name == "logit_diff" and not distractor:
        raise TdbError("metric logit_diff needs a distractor token")
    t = engine.token_id(target)
    d = engine.token_id(distractor) if distractor else None
    if d is not None and d == t:
        raise TdbError(f"target and distractor are the same token ({target!r})")
    return Metric(name=name, target=target, target_id=t, distractor=distractor, distractor_id=d)
