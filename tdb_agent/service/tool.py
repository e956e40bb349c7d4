"""What a tool is, protocol-free: one pydantic argument model (the single place its fields,
limits and descriptions live) and one function `fn(bench, args, job) -> result` whose
docstring is the text agents read. `server` turns each `Tool` into an MCP tool and
`viewer` into a JSON route; neither restates an argument.

Limits are marked on the fields (`Text`, `AtMost`, `AtMostItems`), so one generic check
(`check_limits`) enforces them and `specialise` writes the server's numbers into the
descriptions and caps the defaults (a server started with `--max-top-k 7` advertises
"at most max_top_k=7" and defaults to 7, not 20).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from mcp.types import ToolAnnotations
from pydantic import BaseModel, ConfigDict, create_model, model_validator
from pydantic.fields import FieldInfo

from tdb_agent.service.limits import LimitChecks
from tdb_agent.service.running import non_finite, run_tool
from tdb_agent.workbench import Limits, Workbench

A = TypeVar("A", bound="ToolArgs")
R = TypeVar("R")


class InputModel(BaseModel):
    """Base of the models nested in tool arguments (a circuit node, an edge): NaN and
    infinity are refused (JSON has no such numbers; stored, they would poison a circuit)."""

    model_config = ConfigDict(allow_inf_nan=False)


class ToolArgs(BaseModel):
    """Base of every tool's argument model: unknown argument names are refused, and so are
    NaN and infinity anywhere in the arguments (float fields by pydantic, free-form values
    such as evidence `args` by the check below)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="after")
    def _finite(self):
        bad = non_finite(self)
        if bad:
            raise ValueError(f"NaN and infinite numbers are not accepted ({', '.join(bad[:5])})")
        return self


class NoArgs(ToolArgs):
    """The arguments of a tool that takes none."""


# ------------------------------------------------------------------ limit markers (field metadata)
@dataclass(frozen=True)
class Text:
    """A text checked against max_prompt_chars, then max_prompt_tokens once tokenized."""

    def describe(self, lim: Limits) -> str:
        return f"at most {lim.max_prompt_tokens} tokens, limit max_prompt_tokens"

    def check(self, checks: LimitChecks, name: str, value: Any) -> None:
        checks.text(value, field=name)


@dataclass(frozen=True)
class AtMost:
    """A number at most the named limit (max_top_k, max_new_tokens)."""

    limit: str

    def describe(self, lim: Limits) -> str:
        return f"at most {self.limit}={getattr(lim, self.limit)}"

    def cap(self, lim: Limits, default: Any) -> Any:
        return min(default, getattr(lim, self.limit)) if isinstance(default, int) else default

    def check(self, checks: LimitChecks, name: str, value: Any) -> None:
        if isinstance(value, int):
            checks.at_most(self.limit, value, field=name)


@dataclass(frozen=True)
class AtMostItems:
    """A list with at most the named limit of items (max_components; positions: max_prompt_tokens)."""

    limit: str

    def describe(self, lim: Limits) -> str:
        return f"at most {self.limit}={getattr(lim, self.limit)} items"

    def check(self, checks: LimitChecks, name: str, value: Any) -> None:
        if isinstance(value, (list, tuple)):
            checks.items(self.limit, len(value), field=name)


LIMIT_MARKERS = (Text, AtMost, AtMostItems)


def _markers(info: FieldInfo) -> list:
    return [m for m in info.metadata if isinstance(m, LIMIT_MARKERS)]


def check_limits(bench: Workbench, args: ToolArgs) -> None:
    """Enforce every limit marked on the argument model's fields (errors name the limit
    and the `tdb-agent serve` flag that sets it)."""
    checks = None
    for name, info in type(args).model_fields.items():
        value = getattr(args, name)
        if value is None:
            continue
        for marker in _markers(info):
            checks = checks or LimitChecks(bench)
            marker.check(checks, name, value)


_specialised: dict[tuple[type, str], type] = {}


def specialise(model: type[A], lim: Limits) -> type[A]:
    """The argument model as one server shows it: descriptions name its limits, defaults
    never exceed them. Cached per (model, limits)."""
    key = (model, lim.model_dump_json())
    if key in _specialised:
        return _specialised[key]
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        markers = _markers(info)
        if not markers:
            continue
        new = FieldInfo.merge_field_infos(info)
        notes = "; ".join(m.describe(lim) for m in markers)
        new.description = f"{info.description} ({notes})" if info.description else notes
        for m in markers:
            if isinstance(m, AtMost) and not info.is_required():
                new.default = m.cap(lim, info.default)
        fields[name] = (info.annotation, new)
    out = create_model(model.__name__, __base__=model, __doc__=model.__doc__, __module__=model.__module__,
                       **fields) if fields else model
    _specialised[key] = out
    return out


# ------------------------------------------------------------------ jobs and tools
@dataclass
class Job:
    """What a running tool may use besides its arguments: progress reports (done, total),
    a stop flag that a cancelled call sets (long tools stop at their next batch), and for
    tools that ask a language model (`Tool.samples`) the caller's model, if it offers one
    (`model`: a prompt -> reply callable with a `name`, e.g. the MCP client's model through
    sampling; `no_model`: why there is none)."""

    progress: Callable[[int, int], None] = lambda done, total: None
    should_stop: Callable[[], bool] = lambda: False
    model: Any = None
    no_model: str | None = None


def summary(fn: Callable) -> str:
    """The first paragraph of a docstring (an op's summary, what `help(ops.x)` opens with)."""
    return inspect.cleandoc(fn.__doc__ or "").split("\n\n")[0]


@dataclass(frozen=True)
class Tool(Generic[A, R]):
    """One tool. Its description for agents (MCP) is, where it wraps one op, that op's
    docstring summary (so the tool text and `help(ops.x)` say the same thing) followed by
    `fn`'s docstring (when to use it, an example)."""

    name: str
    args: type[A]
    fn: Callable[[Workbench, A, Job], R]
    annotations: ToolAnnotations
    long: bool = False  # reports progress and can be cancelled: runs in a worker thread
    tags: frozenset[str] = field(default_factory=frozenset)  # e.g. {"dataset"}: registered only where one is loaded
    samples: bool = False  # may ask the caller's language model (Job.model): runs in a worker thread
    op: Callable | None = None  # the op it wraps: its summary opens the description
    #: builds the MCP content from the result (e.g. a picture beside the JSON); the
    #: structured result stays `fn`'s, and the viewer's routes use that
    content: Callable[[Workbench, A, R], Any] | None = None

    @property
    def description(self) -> str:
        own = inspect.cleandoc(self.fn.__doc__ or "")
        return f"{summary(self.op)}\n\n{own}" if self.op is not None else own

    def result_type(self) -> Any:
        return typing.get_type_hints(self.fn).get("return")

    def call(self, bench: Workbench, args: A, job: Job | None = None) -> R:
        """Check the limits and run (the caller holds the engine lock: `service.running`)."""
        check_limits(bench, args)
        return self.fn(bench, args, job or Job())

    def run(self, bench: Workbench, args: A, job: Job | None = None) -> R:
        """Call it as every front end does (MCP, viewer): behind the engine lock, every
        failure a readable tool error (`service.running.run_tool`)."""
        return run_tool(bench, self.name, lambda: self.call(bench, args, job))
