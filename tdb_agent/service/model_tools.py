"""The model tools that look (Transformer Debugger's read-outs): one argument model and one
function each. A tool's description is its op's docstring summary plus the function's
docstring (when to use it, an example); the numbers come from `tdb_agent.ops`. The causal
tools (ablate, sweep, patch, trace) are in `service.causal_tools`."""

from __future__ import annotations

import base64
import json
from typing import Annotated, Literal

from mcp.types import CallToolResult, ImageContent, TextContent
from pydantic import Field

from tdb_agent import ops
from tdb_agent.ops.attention import AttentionPatternResult, head_pattern, pattern_png
from tdb_agent.ops.attribute import AttributionResult, Reference
from tdb_agent.ops.basic import ModelInfo, PredictResult, TaskList, TokenizeResult
from tdb_agent.ops.steer import SteerResult
from tdb_agent.service.annotations import READ_ONLY
from tdb_agent.service.fields import Corrupted, Distractor, Prompt, Target, TopK
from tdb_agent.service.tool import AtMost, Job, NoArgs, Text, Tool, ToolArgs
from tdb_agent.workbench import Workbench


def model_info(bench: Workbench, args: NoArgs, job: Job) -> ModelInfo:
    """Architecture, sizes, device, dtype, how many heads and neurons there are, the component
    id grammar, and the SAEs and datasets attached. Call it first. Example: model_info()"""
    return ops.model_info(bench.engine, bench.dataset_names())


class TokenizeArgs(ToolArgs):
    text: Annotated[str, Field(description="text to tokenize"), Text()]


def tokenize(bench: Workbench, args: TokenizeArgs, job: Job) -> TokenizeResult:
    """Positions are 0-based (the BOS token first, where the tokenizer has one), with ids. Use it to find the position t for
    ids like L1.H3@t, and to check that a target is one token. Example:
    tokenize(text="The capital of Zorvia is")"""
    return ops.tokenize(bench.engine, args.text)


def list_tasks(bench: Workbench, args: NoArgs, job: Job) -> TaskList:
    """The tasks are ioi, induction, greater_than and facts, each with a description and
    example prompt pairs (prompt, corrupted_prompt, target, distractor) ready to pass to
    predict/attribute/ablate/patch. Example: list_tasks()"""
    return ops.list_tasks()


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
    reference: Annotated[Reference | None, Field(
        description="act_times_grad reference activation (default: corrupted if a corrupted_prompt is given, "
                    "else zero)")] = None
    kinds: Annotated[list[Literal["head", "neuron", "attn", "mlp", "emb", "sae", "transcoder"]] | None, Field(
        max_length=7, description="component kinds to rank (default head and neuron; sae = latents of the loaded "
                                  "SAEs, transcoder = features of the loaded transcoders)")] = None
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


class AttentionArgs(ToolArgs):
    prompt: Prompt
    component: Annotated[str, Field(min_length=1, max_length=64, description="a head, e.g. L1.H3")]
    top_k: Annotated[int, Field(ge=1, le=20, description="keys listed per query")] = 3


def attention_pattern(bench: Workbench, args: AttentionArgs, job: Job) -> AttentionPatternResult:
    """Where does this head look? For every query position, its most attended key positions
    with weights (and the full pattern for short prompts), plus a PNG heatmap (rows =
    queries, columns = keys). Example: attention_pattern(prompt="...", component="L1.H3")"""
    return ops.attention_pattern(bench.engine, args.prompt, args.component, top_k=args.top_k, cache=bench.cache)


def attention_content(bench: Workbench, args: AttentionArgs, result: AttentionPatternResult) -> CallToolResult:
    """The JSON beside a PNG heatmap, for clients that show images."""
    pattern = result._pattern
    if pattern is None:  # a result that did not come from ops.attention_pattern
        pattern, _, _ = head_pattern(bench.engine, args.prompt, args.component, bench.cache)
    png = base64.b64encode(pattern_png(pattern)).decode()
    data = result.model_dump(mode="json")
    return CallToolResult(content=[TextContent(type="text", text=json.dumps(data)),
                                   ImageContent(type="image", data=png, mime_type="image/png")],
                          structured_content=data)


class SteerArgs(ToolArgs):
    prompt: Prompt
    component: Annotated[str, Field(min_length=1, max_length=64, description="a neuron (its output weights) or a "
                                    "head (its mean write)")]
    scale: Annotated[float, Field(ge=-1000, le=1000, description="multiple of the direction to add")] = 5.0
    max_new_tokens: Annotated[int, Field(ge=1, description="tokens to generate"), AtMost("max_new_tokens")] = 12


def steer(bench: Workbench, args: SteerArgs, job: Job) -> SteerResult:
    """What does this component's direction do to the output? Adds scale x its direction to
    the residual stream at every position and generates greedily, with and without.
    Example: steer(prompt="The capital of Zorvia is", component="L2.N40", scale=8)"""
    return ops.steer(bench.engine, args.prompt, args.component, scale=args.scale,
                     max_new_tokens=args.max_new_tokens, cache=bench.cache)


TOOLS: list[Tool] = [
    Tool("model_info", NoArgs, model_info, READ_ONLY, op=ops.model_info),
    Tool("tokenize", TokenizeArgs, tokenize, READ_ONLY, op=ops.tokenize),
    Tool("predict", PredictArgs, predict, READ_ONLY, op=ops.predict),
    Tool("list_tasks", NoArgs, list_tasks, READ_ONLY, op=ops.list_tasks),
    Tool("attribute", AttributeArgs, attribute, READ_ONLY, op=ops.attribute),
    Tool("attention_pattern", AttentionArgs, attention_pattern, READ_ONLY, op=ops.attention_pattern,
         content=attention_content),
    Tool("steer", SteerArgs, steer, READ_ONLY, op=ops.steer),
]
