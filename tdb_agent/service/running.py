"""How a tool body runs: behind the engine lock, with every failure turned into a tool
error the model can read. User errors (`TdbError`) keep their message; out-of-memory
frees the caches so the server keeps serving; anything else is reported as an internal
error (and logged with its traceback) instead of the SDK's opaque "Error executing tool"."""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import torch
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult
from pydantic import ValidationError

from tdb_agent import jsonsafe
from tdb_agent.errors import TdbError
from tdb_agent.explain.llm import AnswersPending
from tdb_agent.workbench import Workbench

log = logging.getLogger(__name__)
T = TypeVar("T")

INTERNAL = "internal error"


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA OOM, Python's MemoryError, or a torch CPU allocation failure (a RuntimeError)."""
    if isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def free_memory(bench: Workbench) -> None:
    """Drop the activation and edge score caches and return cached CUDA blocks to the driver."""
    bench.cache.clear()
    bench.edge_scores.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def non_finite(value: Any, path: str = "") -> list[str]:
    """Paths of NaN/inf floats in a result (JSON has no NaN: it would arrive as null and break
    the output schema, which the SDK's client rejects)."""
    if isinstance(value, CallToolResult):
        value = value.structured_content
    return jsonsafe.non_finite(value, path or "")


def readable(e: ValidationError) -> str:
    """A pydantic validation error in one line: `where: what` for each problem."""
    return "; ".join(f"{'.'.join(map(str, x['loc'])) or 'value'}: {x['msg']}" for x in e.errors())


def run_tool(bench: Workbench, what: str, fn: Callable[[], T]) -> T:
    """Run one tool body under the engine lock (tools are atomic: no other call's hooks or
    cache writes interleave with it; a body that waits for a language model lets go of it
    meanwhile through `WaitsUnlocked`) and map failures to tool errors."""
    try:
        with bench.engine.lock:
            result = fn()
        bad = non_finite(result)
        if bad:
            raise ToolError(f"{what} has no defined answer for these inputs: {jsonsafe.shown(bad)} came out NaN "
                            "or infinite (usually a ratio whose denominator is zero, e.g. identical clean and "
                            "corrupted prompts, or a metric of exactly 0)")
        return result
    except (ToolError, AnswersPending):  # AnswersPending: the caller asks them and calls again
        raise
    except TdbError as e:
        raise ToolError(str(e)) from e
    except ValidationError as e:  # e.g. a circuit's behaviour pairs, checked in the body
        raise ToolError(readable(e)) from e
    except BaseException as e:
        if not is_out_of_memory(e):
            if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit, cancellation
                raise
            log.exception("%s failed unexpectedly", what)
            raise ToolError(f"{INTERNAL} in {what} ({type(e).__name__}: {str(e)[:300]}); this is a bug in "
                            "tdb-agent, not in your arguments; the server keeps serving") from e
        free_memory(bench)
        log.warning("%s ran out of memory (%s); caches freed", what, e)
        raise ToolError(f"out of memory in {what} ({type(e).__name__}); the activation cache was freed and the "
                        "server keeps serving: try a shorter prompt, fewer components or a smaller top_k "
                        "(or restart the server with a smaller --batch-size)") from e


class WaitsUnlocked:
    """A language model (explain.llm.TextModel) that lets go of the engine lock while it
    waits for an answer: a tool body that asks the MCP client's model or an LLM endpoint
    holds the lock only for its engine work (examples, contexts, activations), so other
    calls run meanwhile. Called from inside `run_tool` (the lock held once, by this thread);
    everything else (name, settle) is the wrapped model's."""

    def __init__(self, model: Any, lock: Any):
        self._model = model
        self._lock = lock

    @property
    def name(self) -> str:
        return self._model.name

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._model, attr)

    def __call__(self, prompt: str) -> str:
        self._lock.release()
        try:
            return self._model(prompt)
        finally:
            self._lock.acquire()


DISCONNECT_POLL_S = 0.25  # how often a long call over HTTP checks that its client is still there


def _http_request(ctx: Context | None) -> Any:
    """The HTTP request that carried this call (streamable HTTP), or None (stdio, in-process)."""
    try:
        request = ctx.request_context.request if ctx is not None else None
    except (AttributeError, ValueError):
        return None
    return request if hasattr(request, "is_disconnected") else None


async def _stop_when_gone(request: Any, stop: threading.Event, what: str) -> None:
    """Set the stop flag once the caller's HTTP connection has closed: nobody can receive the
    answer, so the work must not keep the engine lock (as if the call had been cancelled)."""
    while not stop.is_set():
        await anyio.sleep(DISCONNECT_POLL_S)
        if await request.is_disconnected():
            log.warning("%s: the client disconnected; stopping at the next batch", what)
            stop.set()


async def run_long_tool(bench: Workbench, ctx: Context | None, what: str,
                        fn: Callable[[Callable[[int, int], None], Callable[[], bool]], T]) -> T:
    """Run fn(progress, should_stop) in a worker thread: progress goes to the client as
    notifications; a cancelled call, or one whose HTTP client disconnected, sets the stop flag
    and the work ends at its next batch (releasing the engine lock), so the event loop and
    other clients are never blocked."""
    stop = threading.Event()

    def progress(done: int, total: int) -> None:
        if ctx is None or stop.is_set():
            return
        try:
            anyio.from_thread.run(ctx.report_progress, done, total, f"{what}: {done}/{total}")
        except Exception:  # a client that went away must not break the work
            pass

    request = _http_request(ctx)
    error: Exception | None = None
    try:
        async with anyio.create_task_group() as tg:
            if request is not None:
                tg.start_soon(_stop_when_gone, request, stop, what)
            try:
                result = await anyio.to_thread.run_sync(
                    lambda: run_tool(bench, what, lambda: fn(progress, stop.is_set)), abandon_on_cancel=True)
            except Exception as e:  # raised below, not wrapped in the task group's ExceptionGroup
                error = e
            finally:
                tg.cancel_scope.cancel()
    finally:
        stop.set()
    if error is not None:
        raise error
    return result
