"""A `service.tool.Tool` as an MCP tool: its argument model becomes the tool's parameters
(same names, types, limits and descriptions on the wire), its function's docstring the
tool's description, and its body runs through `service.running` (engine lock, readable
errors; long tools in a worker thread with progress and cancellation)."""

# no `from __future__ import annotations`: the SDK evaluates the wrapper's signature
import inspect
from typing import Annotated, Any

from mcp.server import MCPServer
from mcp.server.mcpserver import Context

from tdb_agent.service.running import run_long_tool, run_tool
from tdb_agent.service.tool import Job, Tool, specialise
from tdb_agent.workbench import Workbench


def _signature(model: type, returns: Any, *, with_context: bool) -> inspect.Signature:
    params = []
    for name, info in model.model_fields.items():
        annotation = Annotated[info.annotation, info]
        default = inspect.Parameter.empty if info.is_required() else info.get_default(call_default_factory=True)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
    if with_context:
        params.append(inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Context | None))
    return inspect.Signature(params, return_annotation=returns)


def add_tool(mcp: MCPServer, bench: Workbench, tool: Tool) -> None:
    """Register `tool` on `mcp`, over `bench`, with the server's limits in its schema."""
    model = specialise(tool.args, bench.limits)
    returns = tool.result_type()

    if tool.long:
        async def wrapper(ctx: Context | None = None, **kwargs):
            args = model(**kwargs)
            return await run_long_tool(bench, ctx, tool.name,
                                       lambda progress, stop: tool.call(bench, args, Job(progress, stop)))
    else:
        def wrapper(**kwargs):
            args = model(**kwargs)
            return run_tool(bench, tool.name, lambda: tool.call(bench, args))

    wrapper.__name__ = tool.name
    wrapper.__doc__ = tool.description
    wrapper.__signature__ = _signature(model, returns, with_context=tool.long)
    wrapper.__annotations__ = {p.name: p.annotation for p in wrapper.__signature__.parameters.values()}
    wrapper.__annotations__["return"] = returns
    mcp.add_tool(wrapper, name=tool.name, description=tool.description, annotations=tool.annotations)


def add_tools(mcp: MCPServer, bench: Workbench, tools: list[Tool]) -> None:
    for tool in tools:
        add_tool(mcp, bench, tool)
