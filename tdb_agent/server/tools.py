"""A `service.tool.Tool` as an MCP tool: its argument model becomes the tool's parameters
(same names, types, limits and descriptions on the wire), its description the tool's, and
its body runs through `service.running` (engine lock, readable errors; long tools in a worker
thread with progress and cancellation; tools that sample get the client's model, where it
offers sampling, as `Job.model`). A tool with a `content` hook returns that content
(e.g. a PNG beside the JSON) with its result as the structured output."""

# no `from __future__ import annotations`: the SDK evaluates the wrapper's signature
import inspect
from typing import Annotated, Any

import anyio
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult
from pydantic import ValidationError

from tdb_agent.explain.llm import AnswersPending
from tdb_agent.server.sampling import SamplingModel, in_rounds, input_required, replay_model, sampling_unavailable
from tdb_agent.service.running import readable, run_long_tool, run_tool
from tdb_agent.service.tool import Job, Tool, specialise, strict_annotation
from tdb_agent.workbench import Limits, Workbench


def _signature(model: type, returns: Any, *, with_context: bool) -> inspect.Signature:
    params = []
    for name, info in model.model_fields.items():
        annotation = strict_annotation(name, info)
        default = inspect.Parameter.empty if info.is_required() else info.get_default(call_default_factory=True)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
    if with_context:
        params.append(inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Context | None))
    return inspect.Signature(params, return_annotation=returns)


def add_tool(mcp: MCPServer, bench: Workbench, tool: Tool) -> None:
    """Register `tool` on `mcp`, over `bench`, with the server's limits in its schema."""
    model = specialise(tool.args, getattr(bench, "limits", None) or Limits())
    result = tool.result_type()
    returns = Annotated[CallToolResult, result] if tool.content is not None else result

    def parse(kwargs):
        try:
            return model(**kwargs)
        except ValidationError as e:  # what the SDK's own check lets through (NaN, infinity)
            raise ToolError(f"invalid arguments: {readable(e)}") from e

    def body(args, job=None):
        out = tool.call(bench, args, job)
        return tool.content(bench, args, out) if tool.content is not None else out

    if tool.long:
        async def wrapper(ctx: Context | None = None, **kwargs):
            args = parse(kwargs)
            return await run_long_tool(bench, ctx, tool.name, lambda progress, stop: body(args, Job(progress, stop)))
    elif tool.samples:  # the client's own model through MCP sampling, asked from a worker thread
        async def wrapper(ctx: Context | None = None, **kwargs):
            args = parse(kwargs)
            why = sampling_unavailable(ctx)
            rounds = why is None and in_rounds(ctx)  # 2026-07-28: asked through InputRequiredResult
            model = None if why else replay_model(ctx) if rounds else \
                SamplingModel(ctx, timeout_s=getattr(bench, "sampling_timeout_s", 120.0))
            job = Job(model=model, no_model=why)
            try:
                return await anyio.to_thread.run_sync(lambda: run_tool(bench, tool.name, lambda: body(args, job)))
            except AnswersPending as e:
                return input_required(e.prompts, model)
    else:
        def wrapper(**kwargs):
            args = parse(kwargs)
            return run_tool(bench, tool.name, lambda: body(args))

    wrapper.__name__ = tool.name
    wrapper.__doc__ = tool.description
    wrapper.__signature__ = _signature(model, returns, with_context=tool.long or tool.samples)
    wrapper.__annotations__ = {p.name: p.annotation for p in wrapper.__signature__.parameters.values()}
    wrapper.__annotations__["return"] = returns
    mcp.add_tool(wrapper, name=tool.name, description=tool.description, annotations=tool.annotations)


def add_tools(mcp: MCPServer, bench: Workbench, tools: list[Tool]) -> None:
    for tool in tools:
        add_tool(mcp, bench, tool)
