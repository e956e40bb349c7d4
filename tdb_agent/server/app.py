"""The MCP server: tool wiring only. Every number comes from `tdb_agent.ops`.

Each tool validates its arguments (pydantic, via the SDK; unknown argument names are
refused by `guard`), checks the per-call limits, runs the operation in a worker thread
behind the engine lock, and turns every failure into a tool error whose message says what
was wrong (`running`). Long tools report progress and stop at the next batch when the call
is cancelled. Resources and prompts live in `resources` and `prompts`.
"""

# no `from __future__ import annotations`: the SDK reads these signatures, and some of their
# types are built per server (they carry its limits), so they must be evaluated eagerly
import base64
import json
import logging
from pathlib import Path
from typing import Annotated, Literal

from mcp.server import MCPServer
from mcp.server.auth.provider import TokenVerifier
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Context
from mcp.types import CallToolResult, ImageContent, TextContent
from pydantic import Field

from tdb_agent import ops
from tdb_agent.ops.ablate import AblateResult, Mode, PatchResult, SweepResult
from tdb_agent.ops.attention import AttentionPatternResult, head_pattern, pattern_png
from tdb_agent.ops.attribute import AttributionResult
from tdb_agent.ops.basic import ModelInfo, PredictResult, TaskList, TokenizeResult
from tdb_agent.ops.steer import SteerResult
from tdb_agent.ops.trace import TraceResult
from tdb_agent.service.annotations import READ_ONLY
from tdb_agent.server.circuit_tools import register_circuit_tools
from tdb_agent.server.guard import UnknownArgumentGuard
from tdb_agent.server.prompts import PROMPTS_DIR, register_prompts
from tdb_agent.server.resources import register_resources
from tdb_agent.server.sae_tools import register_sae_tools
from tdb_agent.server.tools import add_tools
from tdb_agent.service.edge_tools import TOOLS as EDGE_TOOLS
from tdb_agent.service.model_tools import TOOLS as MODEL_TOOLS
from tdb_agent.service.examples import attach_dataset
from tdb_agent.service.limits import LimitChecks
from tdb_agent.service.running import run_long_tool, run_tool
from tdb_agent.workbench import Workbench

log = logging.getLogger(__name__)


INSTRUCTIONS = """Interpretability workbench for a transformer language model (Transformer
Debugger as tools). Start with model_info and list_tasks; use predict to see what the model
says, attribute to rank the components behind a logit difference, ablate / ablation_sweep /
patch to test them causally, trace_upstream and attention_pattern to see why a head attends
where it does. Components are named EMB, L{l}.H{h} (head), L{l}.ATTN, L{l}.MLP, L{l}.N{n}
(neuron), L{l}.{resid|mlp|attn}.F{i} (SAE latent), LOGITS; add @t to pin a token position
(tokenize shows positions). Resources: tdb://model, tdb://component/{id} (a component's
page), tdb://circuit/{name}. Prompts: investigation recipes (why_prefers, why_attends, ...)."""

Target = Annotated[str, Field(description="a single token the metric is about, e.g. 'Mary'", min_length=1,
                              max_length=200)]
Distractor = Annotated[str | None, Field(description="a single token to compare with: metric = "
                                         "logit[target] - logit[distractor]; without it, log p(target)",
                                         max_length=200)]
ComponentId = Annotated[str, Field(description="component id, e.g. L1.H3, L0.N17, L2.MLP, EMB, with optional "
                                   "@t", min_length=1, max_length=64)]


def build_server(bench: Workbench, *, token_verifier: TokenVerifier | None = None,
                 auth: AuthSettings | None = None, prompts_dir: Path = PROMPTS_DIR) -> MCPServer:
    """The server over one workbench. `token_verifier`/`auth` protect the HTTP transport
    (see `tdb_agent.server.http`); models, SAEs and datasets are fixed by `bench`, so no
    tool ever takes a path."""
    guard = UnknownArgumentGuard()
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    mcp = MCPServer("tdb-agent", instructions=INSTRUCTIONS, token_verifier=token_verifier, auth=auth,
                    middleware=[guard], log_level=level if level in ("DEBUG", "INFO", "ERROR") else "WARNING")
    guard.server = mcp
    engine = bench.engine
    lim = bench.limits
    check = LimitChecks(bench)
    cache = bench.cache

    # argument types whose descriptions carry this server's limits (checked in code, so the
    # error names the limit rather than a bare schema bound)
    Prompt = Annotated[str, Field(description=f"the text the model reads (at most {lim.max_prompt_tokens} "
                                  "tokens, limit max_prompt_tokens)", min_length=1)]
    Corrupted = Annotated[str | None, Field(description="a prompt of the same length that removes the "
                                            "information (for resample/patching references)")]
    TopK = Annotated[int, Field(ge=1, description=f"rows to return (at most max_top_k={lim.max_top_k})")]
    k10, k20 = min(10, lim.max_top_k), min(20, lim.max_top_k)  # defaults never exceed the limits
    Components = Annotated[list[ComponentId], Field(min_length=1, description="components, at most "
                                                    f"max_components={lim.max_components}")]

    @mcp.tool(annotations=READ_ONLY)
    def model_info() -> ModelInfo:
        """Describe the loaded model: architecture, sizes, device, dtype, how many heads and
        neurons there are, the component id grammar, and the SAEs and datasets attached.
        Call it first. Example: model_info()"""
        return run_tool(bench, "model_info", lambda: ops.model_info(engine, bench.dataset_names()))

    @mcp.tool(annotations=READ_ONLY)
    def tokenize(text: Annotated[str, Field(description="text to tokenize")]) -> TokenizeResult:
        """Split text into the model's tokens, with positions (0-based, the BOS token first)
        and ids. Use it to find the position t for ids like L1.H3@t, and to check that a
        target is one token. Example: tokenize(text="The capital of Zorvia is")"""
        def go():
            check.text(text, field="text")
            return ops.tokenize(engine, text)
        return run_tool(bench, "tokenize", go)

    @mcp.tool(annotations=READ_ONLY)
    def list_tasks() -> TaskList:
        """The built-in behaviour tasks (ioi, induction, greater_than, facts), each with a
        description and example prompt pairs (prompt, corrupted_prompt, target, distractor)
        ready to pass to predict/attribute/ablate/patch. Example: list_tasks()"""
        return run_tool(bench, "list_tasks", ops.list_tasks)

    @mcp.tool(annotations=READ_ONLY)
    def ablate(
        prompt: Prompt,
        components: Components,
        target: Target,
        distractor: Distractor = None,
        mode: Annotated[Mode, Field(description="zero; mean (over a reference corpus); resample (from "
                                    "corrupted_prompt)")] = "zero",
        corrupted_prompt: Corrupted = None,
    ) -> AblateResult:
        """Does the behaviour need these components? Runs the prompt with them ablated together
        and reports the metric before and after, the delta, and the new top tokens. Example:
        ablate(prompt="...", components=["L3.H1", "L2.N40@12"], target="Mary", distractor="John",
        mode="mean")"""
        def go():
            check.text(prompt)
            check.text(corrupted_prompt, field="corrupted_prompt")
            check.components(components)
            return ops.ablate(engine, prompt, components, target, distractor, mode=mode,
                              corrupted_prompt=corrupted_prompt, cache=cache)
        return run_tool(bench, "ablate", go)

    @mcp.tool(annotations=READ_ONLY)
    async def ablation_sweep(
        prompt: Prompt,
        kind: Annotated[Literal["head", "neuron", "attn", "mlp", "sae"], Field(
            description="which components to sweep (sae: every latent of the loaded SAEs)")],
        target: Target,
        distractor: Distractor = None,
        mode: Mode = "zero",
        corrupted_prompt: Corrupted = None,
        positions: Annotated[Literal["all", "last"] | list[Annotated[int, Field(ge=0)]], Field(
            description="where each component is ablated: all positions, the last one (Transformer "
                        "Debugger's default), or a list of positions")] = "all",
        top_k: TopK = k20,
        ctx: Context | None = None,
    ) -> SweepResult:
        """Which single components matter? Ablates every component of a kind alone (batched) and
        ranks them by the metric change. Reports progress; cancellable. Single ablations miss
        redundant circuits: test groups with ablate. Example: ablation_sweep(prompt="...",
        kind="head", target="Mary", distractor="John", positions="last")"""
        def work(progress, should_stop):
            check.text(prompt)
            check.text(corrupted_prompt, field="corrupted_prompt")
            check.top_k(top_k)
            if isinstance(positions, list):
                check.positions(positions)
            return ops.ablation_sweep(engine, prompt, kind, target, distractor, mode=mode,
                                      corrupted_prompt=corrupted_prompt, positions=positions, top_k=top_k,
                                      batch_size=lim.batch_size, cache=cache, progress=progress,
                                      should_stop=should_stop)
        return await run_long_tool(bench, ctx, "ablation_sweep", work)

    @mcp.tool(annotations=READ_ONLY)
    def patch(
        clean_prompt: Prompt,
        corrupted_prompt: Annotated[str, Field(min_length=1, description="same length as clean_prompt")],
        components: Components,
        target: Target,
        distractor: Distractor = None,
        direction: Annotated[Literal["denoise", "noise"], Field(
            description="denoise: clean activations into the corrupted run; noise: corrupted into clean")] = "denoise",
    ) -> PatchResult:
        """Activation patching: do these components carry the information that separates the
        clean prompt from the corrupted one? Reports the metric on both, with the patch, and the
        fraction restored. Example: patch(clean_prompt="...", corrupted_prompt="...",
        components=["L3.H1"], target="Mary", distractor="John")"""
        def go():
            check.text(clean_prompt, field="clean_prompt")
            check.text(corrupted_prompt, field="corrupted_prompt")
            check.components(components)
            return ops.patch(engine, clean_prompt, corrupted_prompt, components, target, distractor,
                             direction=direction, cache=cache)
        return run_tool(bench, "patch", go)

    @mcp.tool(annotations=READ_ONLY)
    def trace_upstream(
        prompt: Prompt,
        component: Annotated[str, Field(description="a head with its query position (L2.H5@14) or a neuron "
                                        "(L1.N7@9); without @t the last position", min_length=1, max_length=64)],
        via: Annotated[Literal["q", "k", "qk", "v", "all"], Field(
            description="for heads: q / k trace the attention score through the query / key side; qk = both "
                        "(query and key sides); v traces the head's effect on the metric through its values; "
                        "all = the old name of qk (q and k only, not v)")] = "qk",
        key_position: Annotated[int | None, Field(ge=0, description="key position of the attention score "
                                                  "(default: the most attended one)")] = None,
        target: Annotated[str | None, Field(description="for via=v: the metric's target token",
                                            max_length=200)] = None,
        distractor: Distractor = None,
        top_k: TopK = k20,
    ) -> TraceResult:
        """Why did this head attend to that token, or why did this neuron fire? Attributes the
        node to upstream components (heads, neurons, embedding at specific positions) as weighted
        edges (source, target, weight, via). For heads, via=q / k / qk (both) traces the
        attention score, via=v the effect on the metric through the values. Example:
        trace_upstream(prompt="...", component="L2.H5@14", via="q")"""
        def go():
            check.text(prompt)
            check.top_k(top_k)
            return ops.trace_upstream(engine, prompt, component, via=via, key_position=key_position, target=target,
                                      distractor=distractor, top_k=top_k, cache=cache)
        return run_tool(bench, "trace_upstream", go)

    @mcp.tool(annotations=READ_ONLY)
    def attention_pattern(
        prompt: Prompt,
        component: Annotated[str, Field(description="a head, e.g. L1.H3", min_length=1, max_length=64)],
        top_k: Annotated[int, Field(ge=1, le=20, description="keys listed per query")] = 3,
    ) -> Annotated[CallToolResult, AttentionPatternResult]:
        """Where does this head look? For every query position, its most attended key positions
        with weights (and the full pattern for short prompts), plus a PNG heatmap (rows =
        queries, columns = keys). Example: attention_pattern(prompt="...", component="L1.H3")"""
        def go():
            check.text(prompt)
            result = ops.attention_pattern(engine, prompt, component, top_k=top_k, cache=cache)
            pattern, _, _ = head_pattern(engine, prompt, component, cache)
            png = base64.b64encode(pattern_png(pattern)).decode()
            data = result.model_dump(mode="json")
            return CallToolResult(content=[TextContent(type="text", text=json.dumps(data)),
                                           ImageContent(type="image", data=png, mime_type="image/png")],
                                  structured_content=data)
        return run_tool(bench, "attention_pattern", go)

    @mcp.tool(annotations=READ_ONLY)
    def steer(
        prompt: Prompt,
        component: Annotated[str, Field(description="a neuron (its output weights) or a head (its mean write)",
                                        min_length=1, max_length=64)],
        scale: Annotated[float, Field(ge=-1000, le=1000, description="multiple of the direction to add")] = 5.0,
        max_new_tokens: Annotated[int, Field(ge=1, description="tokens to generate (at most "
                                             f"max_new_tokens={lim.max_new_tokens})")] = min(12, lim.max_new_tokens),
    ) -> SteerResult:
        """What does this component's direction do to the output? Adds scale x its direction to
        the residual stream at every position and generates greedily, with and without.
        Example: steer(prompt="The capital of Zorvia is", component="L2.N40", scale=8)"""
        def go():
            check.text(prompt)
            check.new_tokens(max_new_tokens)
            return ops.steer(engine, prompt, component, scale=scale, max_new_tokens=max_new_tokens, cache=cache)
        return run_tool(bench, "steer", go)

    add_tools(mcp, bench, MODEL_TOOLS)
    add_tools(mcp, bench, EDGE_TOOLS)
    register_circuit_tools(mcp, bench)
    if attach_dataset(bench) if getattr(bench, "dataset", None) is None else bench.dataset:
        # top_examples / explain_component: only where there is a dataset to answer from
        register_sae_tools(mcp, bench)
    register_resources(mcp, bench)
    register_prompts(mcp, prompts_dir)
    return mcp
