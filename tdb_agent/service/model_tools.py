"""The model tools (Transformer Debugger's operations): one argument model and one function
each. The function's docstring is the tool's description for agents; the numbers come from
`tdb_agent.ops`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from tdb_agent import ops
from tdb_agent.ops.attribute import AttributionResult
from tdb_agent.ops.basic import PredictResult
from tdb_agent.service.annotations import READ_ONLY
from tdb_agent.service.fields import Corrupted, Distractor, Prompt, Target, TopK
from tdb_agent.service.tool import Job, Tool, ToolArgs
from tdb_agent.workbench import Workbench


class PredictArgs(ToolArgs):
    prompt: Prompt
    top_k: TopK(10, "how many top next tokens to list")
    target: Annotated[str | None, Field(max_length=200, description="a single token whose probability to "
                                        "report")] = None
    distractor: Distractor = None


def predict(bench: Workbench, args: PredictArgs, job: Job) -> PredictResult:
    """What does the model predict next? Top next tokens with probabilities and logits; with
    a target (and optional distractor), the metric the other tools explain (logit_diff, or
    log-prob without a distractor). Example: predict(prompt="When Mary and John went to the
    store , John gave a drink to", target="Mary", distractor="John")"""
    return ops.predict(bench.engine, args.prompt, top_k=args.top_k, target=args.target or None,
                       distractor=args.distractor or None)


class AttributeArgs(ToolArgs):
    prompt: Prompt
    target: Target
    distractor: Distractor = None
    method: Annotated[Literal["direct_effect", "act_times_grad"], Field(
        description="direct_effect: each component's write at the last position times the metric's gradient "
                    "there (exact, sums to the metric); act_times_grad: (activation - reference) x gradient, "
                    "includes indirect paths")] = "direct_effect"
    corrupted_prompt: Corrupted = None
    reference: Annotated[Literal["zero", "mean", "corrupted"] | None, Field(
        description="act_times_grad reference activation (default: corrupted if a corrupted_prompt is given, "
                    "else zero)")] = None
    kinds: Annotated[list[Literal["head", "neuron", "attn", "mlp", "emb", "sae"]] | None, Field(
        max_length=6, description="component kinds to rank (default head and neuron; sae = latents of the loaded "
                                  "SAEs)")] = None
    top_k: TopK(20)
    per_position: Annotated[bool, Field(description="split act_times_grad effects by token position")] = False


def attribute(bench: Workbench, args: AttributeArgs, job: Job) -> AttributionResult:
    """Why does the model prefer target over distractor? Ranks heads, neurons and blocks by
    their contribution to the metric. Rows carry id, kind, effect and share; the totals and
    the named remainder (biases) add up to the metric. Example: attribute(prompt="When Mary
    and John went to the store , John gave a drink to", target="Mary", distractor="John")"""
    return ops.attribute(bench.engine, args.prompt, args.target, args.distractor or None, method=args.method,
                         corrupted_prompt=args.corrupted_prompt or None, reference=args.reference, kinds=args.kinds,
                         top_k=args.top_k, per_position=args.per_position, cache=bench.cache)


TOOLS: list[Tool] = [
    Tool("predict", PredictArgs, predict, READ_ONLY),
    Tool("attribute", AttributeArgs, attribute, READ_ONLY),
]
