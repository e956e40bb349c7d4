"""The model tools that intervene or trace: ablate, ablation_sweep (long: progress and
cancellation), patch and trace_upstream. Same shape as `service.model_tools`: one argument
model and one function each, the numbers from `tdb_agent.ops`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from tdb_agent import ops
from tdb_agent.ops.ablate import AblateResult, Mode, PatchResult, SweepResult
from tdb_agent.ops.trace import TraceResult
from tdb_agent.service.annotations import READ_ONLY
from tdb_agent.service.fields import Components, Corrupted, Distractor, Prompt, Target, TopK
from tdb_agent.service.tool import AtMostItems, Job, Text, Tool, ToolArgs
from tdb_agent.workbench import Workbench


class AblateArgs(ToolArgs):
    prompt: Prompt
    components: Components
    target: Target
    distractor: Distractor = None
    mode: Annotated[Mode, Field(description="zero; mean (over a reference corpus); resample (from "
                                "corrupted_prompt)")] = "zero"
    corrupted_prompt: Corrupted = None


def ablate(bench: Workbench, args: AblateArgs, job: Job) -> AblateResult:
    """Does the behaviour need these components? Runs the prompt with them ablated together
    and reports the metric before and after, the delta, and the new top tokens. Example:
    ablate(prompt="...", components=["L3.H1", "L2.N40@12"], target="Mary", distractor="John",
    mode="mean")"""
    return ops.ablate(bench.engine, args.prompt, args.components, args.target, args.distractor or None,
                      mode=args.mode, corrupted_prompt=args.corrupted_prompt or None, cache=bench.cache)


class SweepArgs(ToolArgs):
    prompt: Prompt
    kind: Annotated[Literal["head", "neuron", "attn", "mlp", "sae"], Field(
        description="which components to sweep (sae: every latent of the loaded SAEs)")]
    target: Target
    distractor: Distractor = None
    mode: Mode = "zero"
    corrupted_prompt: Corrupted = None
    positions: Annotated[Literal["all", "last"] | list[Annotated[int, Field(ge=0)]], Field(
        description="where each component is ablated: all positions, the last one (Transformer Debugger's "
                    "default), or a list of positions"), AtMostItems("max_prompt_tokens")] = "all"
    top_k: TopK(20)


def ablation_sweep(bench: Workbench, args: SweepArgs, job: Job) -> SweepResult:
    """Which single components matter? Ablates every component of a kind alone (batched) and
    ranks them by the metric change. Reports progress; cancellable. Single ablations miss
    redundant circuits: test groups with ablate. Example: ablation_sweep(prompt="...",
    kind="head", target="Mary", distractor="John", positions="last")"""
    return ops.ablation_sweep(bench.engine, args.prompt, args.kind, args.target, args.distractor or None,
                              mode=args.mode, corrupted_prompt=args.corrupted_prompt or None,
                              positions=args.positions, top_k=args.top_k, batch_size=bench.limits.batch_size,
                              cache=bench.cache, progress=job.progress, should_stop=job.should_stop)


class PatchArgs(ToolArgs):
    clean_prompt: Prompt
    corrupted_prompt: Annotated[str, Field(min_length=1, description="same length as clean_prompt"), Text()]
    components: Components
    target: Target
    distractor: Distractor = None
    direction: Annotated[Literal["denoise", "noise"], Field(
        description="denoise: clean activations into the corrupted run; noise: corrupted into clean")] = "denoise"


def patch(bench: Workbench, args: PatchArgs, job: Job) -> PatchResult:
    """Do these components carry the information that separates the clean prompt from the
    corrupted one? Reports the metric on both, with the patch, and the fraction restored.
    Example: patch(clean_prompt="...", corrupted_prompt="...", components=["L3.H1"],
    target="Mary", distractor="John")"""
    return ops.patch(bench.engine, args.clean_prompt, args.corrupted_prompt, args.components, args.target,
                     args.distractor or None, direction=args.direction, cache=bench.cache)


class TraceArgs(ToolArgs):
    prompt: Prompt
    component: Annotated[str, Field(min_length=1, max_length=64, description="a head with its query position "
                                    "(L2.H5@14), a neuron (L1.N7@9), an SAE latent or a transcoder feature "
                                    "(L1.tc.F3@9); without @t the last position")]
    via: Annotated[Literal["q", "k", "qk", "v", "all"], Field(
        description="for heads: q / k trace the attention score through the query / key side; qk = both "
                    "(query and key sides); v traces the head's effect on the metric through its values; "
                    "all = the old name of qk (q and k only, not v)")] = "qk"
    key_position: Annotated[int | None, Field(ge=0, description="key position of the attention score "
                                              "(default: the most attended one)")] = None
    target: Annotated[str | None, Field(max_length=200, description="for via=v: the metric's target token")] = None
    distractor: Distractor = None
    top_k: TopK(20)


def trace_upstream(bench: Workbench, args: TraceArgs, job: Job) -> TraceResult:
    """Why did this head attend to that token, or why did this neuron fire? Edges are
    (source, target, weight, via) from heads, neurons and the embedding at specific
    positions. For heads, via=q / k / qk (both) traces the attention score, via=v the effect
    on the metric through the values. Example: trace_upstream(prompt="...",
    component="L2.H5@14", via="q")"""
    return ops.trace_upstream(bench.engine, args.prompt, args.component, via=args.via,
                              key_position=args.key_position, target=args.target or None,
                              distractor=args.distractor or None, top_k=args.top_k, cache=bench.cache)


TOOLS: list[Tool] = [
    Tool("ablate", AblateArgs, ablate, READ_ONLY, op=ops.ablate),
    Tool("ablation_sweep", SweepArgs, ablation_sweep, READ_ONLY, long=True, op=ops.ablation_sweep),
    Tool("patch", PatchArgs, patch, READ_ONLY, op=ops.patch),
    Tool("trace_upstream", TraceArgs, trace_upstream, READ_ONLY, op=ops.trace_upstream),
]
