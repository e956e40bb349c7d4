"""Argument types shared by many tools, written once: their descriptions are what agents
read, their limit markers what `service.tool.check_limits` enforces."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from tdb_agent.service.tool import AtMost, AtMostItems, Text

Prompt = Annotated[str, Field(min_length=1, description="the text the model reads"), Text()]
Corrupted = Annotated[str | None, Field(description="a prompt of the same length that removes the information "
                                        "(for resample/patching references)"), Text()]
Target = Annotated[str, Field(min_length=1, max_length=200,
                              description="a single token the metric is about, e.g. 'Mary'")]
Distractor = Annotated[str | None, Field(max_length=200, description="a single token to compare with: metric = "
                                         "logit[target] - logit[distractor]; without it, log p(target)")]
ComponentId = Annotated[str, Field(min_length=1, max_length=64, description="component id, e.g. L1.H3, L0.N17, "
                                   "L2.MLP, EMB, with optional @t")]
Components = Annotated[list[ComponentId], Field(min_length=1, description="components"), AtMostItems("max_components")]


def TopK(default: int, what: str = "rows to return"):
    """A top_k argument: at least 1, at most the server's max_top_k (its default capped to it)."""
    return Annotated[int, Field(default, ge=1, description=what), AtMost("max_top_k")]
