"""The MCP server: tool wiring only. Every number comes from `tdb_agent.ops`.

Each tool validates its arguments (pydantic, via the SDK), runs the operation, and turns
a user error (`TdbError`) into a tool error whose message says what was wrong.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated, TypeVar

from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import Field

from tdb_agent import ops
from tdb_agent.errors import TdbError
from tdb_agent.ops.basic import ModelInfo, PredictResult, TaskList, TokenizeResult
from tdb_agent.workbench import Workbench

log = logging.getLogger(__name__)
T = TypeVar("T")

READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True,
                            open_world_hint=False)

INSTRUCTIONS = """Interpretability workbench for a transformer language model (Transformer
Debugger as tools). Start with model_info and list_tasks; use predict to see what the model
says. Components are named EMB, L{l}.H{h} (head), L{l}.ATTN, L{l}.MLP, L{l}.N{n} (neuron),
L{l}.{resid|mlp|attn}.F{i} (SAE latent), LOGITS; add @t to pin a token position."""


def _run(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except TdbError as e:
        raise ToolError(str(e)) from e


def build_server(bench: Workbench) -> MCPServer:
    mcp = MCPServer("tdb-agent", instructions=INSTRUCTIONS)
    engine = bench.engine
    limits = bench.limits

    def check_prompt(prompt: str) -> None:
        n = engine.to_tokens(prompt).shape[1]
        if n > limits.max_prompt_tokens:
            raise TdbError(f"the prompt is {n} tokens; the limit (max_prompt_tokens) is {limits.max_prompt_tokens}")

    @mcp.tool(annotations=READ_ONLY)
    def model_info() -> ModelInfo:
        """Describe the loaded model: architecture, sizes, device, dtype, how many heads and
        neurons there are, the component id grammar, and the SAEs and datasets attached.
        Call it first. Example: model_info()"""
        return _run(lambda: ops.model_info(engine))

    @mcp.tool(annotations=READ_ONLY)
    def tokenize(text: Annotated[str, Field(description="text to tokenize", max_length=20000)]) -> TokenizeResult:
        """Split text into the model's tokens, with positions (0-based, the BOS token first)
        and ids. Use it to find the position t for ids like L1.H3@t, and to check that a
        target is one token. Example: tokenize(text="The capital of Zorvia is")"""
        return _run(lambda: ops.tokenize(engine, text))

    @mcp.tool(annotations=READ_ONLY)
    def predict(
        prompt: Annotated[str, Field(description="the text the model continues", min_length=1, max_length=20000)],
        top_k: Annotated[int, Field(ge=1, le=200, description="how many top next tokens to list")] = 10,
        target: Annotated[str | None, Field(description="a single token whose probability to report")] = None,
        distractor: Annotated[str | None, Field(description="a single token to compare the target with "
                                                "(metric = logit[target] - logit[distractor])")] = None,
    ) -> PredictResult:
        """What does the model predict next? Top next tokens with probabilities and logits; with
        a target (and optional distractor), the metric the other tools explain (logit_diff, or
        log-prob without a distractor). Example: predict(prompt="When Mary and John went to the
        store , John gave a drink to", target="Mary", distractor="John")"""
        def go():
            check_prompt(prompt)
            if top_k > limits.max_top_k:
                raise TdbError(f"top_k {top_k} exceeds the limit max_top_k={limits.max_top_k}")
            return ops.predict(engine, prompt, top_k=top_k, target=target, distractor=distractor)
        return _run(go)

    @mcp.tool(annotations=READ_ONLY)
    def list_tasks() -> TaskList:
        """The built-in behaviour tasks (ioi, induction, greater_than, facts), each with a
        description and example prompt pairs (prompt, corrupted_prompt, target, distractor)
        ready to pass to predict/attribute/ablate/patch. Example: list_tasks()"""
        return _run(ops.list_tasks)

    return mcp
