"""Readouts of the residual stream in vocabulary space: the logit lens at every layer and
position, and a component's direct logit attribution per position (numbers from
`tdb_agent.ops.lens`)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from tdb_agent.ops.lens import DirectLogitAttribution, LogitLensResult, direct_logit_attribution, logit_lens
from tdb_agent.service.annotations import READ_ONLY
from tdb_agent.service.fields import ComponentId, Distractor, Prompt, Target, TopK
from tdb_agent.service.tool import AtMostItems, Job, Tool, ToolArgs
from tdb_agent.workbench import Workbench


class LogitLensArgs(ToolArgs):
    prompt: Prompt
    top_k: TopK(5, "top next tokens per layer and position")
    target: Annotated[str | None, Field(max_length=200, description="a single token whose probability and rank "
                                        "to follow through the layers")] = None
    positions: Annotated[list[int] | None, Field(description="token positions to read (negative counts from the "
                                                 "end; default all)"), AtMostItems("max_components")] = None


def logit_lens_tool(bench: Workbench, args: LogitLensArgs, job: Job) -> LogitLensResult:
    """What does the model predict at each layer? The residual stream before every block
    (layer 0 = embeddings) and the final one, read as next-token predictions through the
    final norm and unembedding (logit lens, no tuned lens): top tokens per layer and
    position, and a target's probability and rank. The last layer is the model's output.
    Example: logit_lens(prompt="The capital of Zorvia is", target="Vexa", positions=[-1])"""
    return logit_lens(bench.engine, args.prompt, top_k=args.top_k, target=args.target or None,
                      positions=args.positions, cache=bench.cache)


class DirectLogitArgs(ToolArgs):
    prompt: Prompt
    component: ComponentId
    target: Target
    distractor: Distractor = None


def direct_logit_attribution_tool(bench: Workbench, args: DirectLogitArgs, job: Job) -> DirectLogitAttribution:
    """Where does this component push the prediction directly? Per token position, its
    write to the residual stream through the final norm (scale frozen at its clean value)
    and the unembedding, on logit[target] - logit[distractor] (or logit[target]); heads,
    neurons, L{l}.ATTN / L{l}.MLP, EMB and SAE latents; `@t` picks one position. At the
    last position this is the `direct_effect` of `attribute`. Example:
    direct_logit_attribution(prompt="When Mary and John went to the store , John gave a
    drink to", component="L3.H1", target="Mary", distractor="John")"""
    return direct_logit_attribution(bench.engine, args.prompt, args.component, args.target,
                                    args.distractor or None, cache=bench.cache)


TOOLS: list[Tool] = [
    Tool("logit_lens", LogitLensArgs, logit_lens_tool, READ_ONLY, op=logit_lens),
    Tool("direct_logit_attribution", DirectLogitArgs, direct_logit_attribution_tool, READ_ONLY,
         op=direct_logit_attribution),
]
