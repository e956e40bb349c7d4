"""The service layer's contract (docs/DESIGN.md §5) checked over every tool: argument models
refuse NaN and infinity everywhere (also nested, also over a real MCP client), and a tool's
MCP description opens with the summary `help(ops.x)` shows for the op it wraps."""

import asyncio
import inspect
import math
import typing

import pytest
from mcp import Client
from pydantic import BaseModel

from tdb_agent import ops
from tdb_agent.server import build_server
from tdb_agent.service.catalog import MODEL_TOOLS, TOOLS
from tdb_agent.service.tool import ToolArgs, summary
from tdb_agent.workbench import Workbench

P = "When Mary and John went to the store , John gave a drink to"


def _models(tp) -> list[type[BaseModel]]:
    """The pydantic models inside a type (list[NodeIn] -> NodeIn, ...)."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return [m for a in typing.get_args(tp) for m in _models(a)]


def _all_models() -> list[type[BaseModel]]:
    seen, todo = [], [t.args for t in TOOLS]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.append(m)
        todo += [n for f in m.model_fields.values() for n in _models(f.annotation)]
    return seen


def _has_float(m: type[BaseModel]) -> bool:
    def floats(tp):
        return tp is float or any(floats(a) for a in typing.get_args(tp))
    return any(floats(f.annotation) for f in m.model_fields.values())


def test_every_argument_model_with_a_float_refuses_non_finite_numbers():
    with_floats = [m for m in _all_models() if _has_float(m)]
    assert {"SteerArgs", "PruneArgs", "NodeIn", "EdgeIn"} <= {m.__name__ for m in with_floats}
    for m in with_floats:
        assert m.model_config.get("allow_inf_nan") is False, m.__name__


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_nested_and_free_form_non_finite_numbers_are_refused(bad):
    add = next(t for t in TOOLS if t.name == "circuit_add").args
    for nodes, edges in [([{"id": "L0.H1", "effect": bad}], []),
                         ([], [{"source": "L0.H1", "target": "LOGITS", "weight": bad}]),
                         ([{"id": "L0.H1", "evidence": [{"tool": "attribute", "value": bad}]}], []),
                         ([{"id": "L0.H1", "evidence": [{"tool": "attribute", "args": {"x": [1.0, bad]}}]}], [])]:
        with pytest.raises(ValueError, match="finite|NaN"):
            add.model_validate({"name": "c", "nodes": nodes, "edges": edges})
    assert issubclass(add, ToolArgs)


def test_non_finite_numbers_at_the_server_change_nothing(gpt2_tiny, tmp_path):
    """Arguments as the server sees them once a client's JSON is parsed (NaN, Infinity and
    1e999 are valid tokens for Python's parser; the Python client would send null instead,
    so the server's own call path is used): refused with an error, the circuit and its file
    unchanged."""
    bench = Workbench(gpt2_tiny, workspace=tmp_path)
    server = build_server(bench)

    async def call(name, args):
        try:
            r = await server.call_tool(name, args)
        except Exception as e:  # the SDK raises a ToolError for a failed call here
            return str(e)
        assert r.is_error, (name, args, r)
        return r.content[0].text

    async def go():
        r = await server.call_tool("circuit_create", {"name": "nf", "task": "ioi", "n_pairs": 2})
        assert not r.is_error, r.content
        before = (tmp_path / "circuits" / "nf.json").read_text()
        calls = [("circuit_add", {"name": "nf", "nodes": [{"id": "L0.H1", "effect": math.inf}]}),
                 ("circuit_add", {"name": "nf", "edges": [{"source": "L0.H1", "target": "LOGITS",
                                                           "weight": math.nan}]}),
                 ("circuit_add", {"name": "nf", "nodes": [{"id": "L0.H1", "evidence": [
                     {"tool": "attribute", "value": float("1e999")}]}]}),
                 ("steer", {"prompt": P, "component": "L0.N5", "scale": math.inf}),
                 ("circuit_prune", {"name": "nf", "threshold": math.nan})]
        for name, args in calls:
            text = await call(name, args)
            field = {"circuit_add": "nodes" if "nodes" in args else "edges", "steer": "scale",
                     "circuit_prune": "threshold"}[name]
            assert field in text and ("finite" in text or "NaN" in text or "than" in text), (name, text)
        assert (tmp_path / "circuits" / "nf.json").read_text() == before
        assert bench.circuits["nf"].number_of_nodes() == 1  # the LOGITS sink only
    asyncio.run(go())


def test_tool_descriptions_open_with_the_ops_summary(gpt2_tiny):
    """The MCP description of a tool that wraps one op starts with that op's docstring
    summary, the first thing `help(ops.x)` shows."""
    wraps = {t.name: t.op for t in TOOLS if t.op is not None}
    assert {t.name for t in MODEL_TOOLS} == set(wraps)  # every model tool wraps one op

    async def go():
        async with Client(build_server(Workbench(gpt2_tiny))) as c:
            return {t.name: t.description for t in (await c.list_tools()).tools}
    described = asyncio.run(go())
    for name, op in wraps.items():
        assert op is getattr(ops, name), name
        first = inspect.getdoc(op).split("\n\n")[0]
        assert described[name].startswith(first), name
        assert summary(op) == first


def test_resume_replays_exactly_the_circuit_edits(gpt2_tiny):
    """The tools a resumed run replays come from the annotations the server publishes, not a
    hand-written list: the three edits, not the idempotent writers or any read-only tool."""
    from tdb_agent.agent.toolbox import replays_on_resume

    async def go():
        async with Client(build_server(Workbench(gpt2_tiny))) as c:
            return (await c.list_tools()).tools
    tools = asyncio.run(go())
    assert {t.name for t in tools if replays_on_resume(t)} == {"circuit_create", "circuit_add", "circuit_remove"}
    assert not replays_on_resume(None)
