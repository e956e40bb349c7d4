"""The MCP client's own model as a `TextModel` (explain/llm.py), through sampling
(`sampling/createMessage`), in the two ways the protocol versions allow:

* up to 2025-11-25 (`SamplingModel`): the explainer runs in a worker thread and each prompt
  is sent to the client mid-call on the event loop, which shows it to the user where the
  client asks for consent. Refusals, timeouts and non-text answers become TdbError with a
  message that says which.
* from 2026-07-28 (multi-round-trip requests): a server cannot send requests mid-call; the
  tool returns an `InputRequiredResult` whose input requests are the prompts, and the client
  calls again with the answers. `replay_model` answers a run from the answers so far
  (`explain.llm.ReplayModel`); `input_required` asks the prompts it could not answer, all at
  once, with the answers so far in `requestState` (sealed by the SDK's RequestStateBoundary:
  the server reads back only what it minted). The explanation is round 1, every scorer
  prompt round 2. A refusal ends the call on the client's side (the SDK's client raises
  MCPError and never calls again)."""

from __future__ import annotations

import json
import warnings

import anyio
import anyio.from_thread
from mcp import types
from mcp.server.mcpserver import Context
from mcp.shared.exceptions import MCPError, NoBackChannelError
from mcp_types.version import is_version_at_least

from tdb_agent.errors import TdbError
from tdb_agent.explain.llm import ReplayModel, prompt_digest

SYSTEM = ("You help interpret a small language model's internal components. Answer exactly in the format the "
          "request asks for, with nothing else.")


def sampling_unavailable(ctx: Context | None) -> str | None:
    """Why the client's model cannot be asked on this connection, or None when it can."""
    if ctx is None:
        return "no MCP client session"
    caps = ctx.client_capabilities
    if caps is None or caps.sampling is None:
        return "the connected MCP client does not offer sampling"
    if not ctx.session.can_send_request and not in_rounds(ctx):
        return (f"this connection (protocol {ctx.protocol_version}) cannot carry requests from the server to the "
                "client, so the client's model cannot be asked")
    return None


INPUT_REQUIRED_VERSION = "2026-07-28"  # the first protocol whose tools ask through InputRequiredResult
STATE_VERSION = 1


def in_rounds(ctx: Context) -> bool:
    """The connection's protocol asks the client through input-required rounds."""
    v = ctx.protocol_version
    return v is not None and is_version_at_least(v, INPUT_REQUIRED_VERSION)


def _request(prompt: str, max_tokens: int) -> types.CreateMessageRequest:
    return types.CreateMessageRequest(params=types.CreateMessageRequestParams(
        messages=[types.SamplingMessage(role="user", content=types.TextContent(type="text", text=prompt))],
        max_tokens=max_tokens, system_prompt=SYSTEM, temperature=0.0,
        model_preferences=types.ModelPreferences(intelligence_priority=0.8, speed_priority=0.5)))


def replay_model(ctx: Context) -> ReplayModel:
    """The answers so far: those carried in the (verified) request state, plus the client's
    responses to the prompts that state says were asked (any other key is ignored). A
    non-text answer counts as an empty (malformed) one."""
    state = json.loads(ctx.request_state) if ctx.request_state else {}
    if state and state.get("v") != STATE_VERSION:
        raise TdbError("the request state comes from another version of this server; call the tool again")
    answers: dict[str, str] = dict(state.get("answers", {}))
    name = state.get("model") or "MCP client's model"
    asked = set(state.get("asked", []))
    for key, r in (ctx.input_responses or {}).items():
        if key in asked and isinstance(r, types.CreateMessageResult):
            answers[key] = r.content.text if isinstance(r.content, types.TextContent) else ""
            name = f"{r.model} (MCP client)"
    return ReplayModel(answers, name=name)


def input_required(prompts: list[str], model: ReplayModel, max_tokens: int = 1024) -> types.InputRequiredResult:
    """Ask every pending prompt at once (keyed by its digest); the answers so far ride in
    the request state."""
    requests = {prompt_digest(p): _request(p, max_tokens) for p in prompts}
    state = {"v": STATE_VERSION, "answers": model.answers, "model": model.name, "asked": sorted(requests)}
    return types.InputRequiredResult(input_requests=requests, request_state=json.dumps(state))


class SamplingModel:
    """Prompts answered by the MCP client's model. `name` becomes the model the client
    reports after its first answer."""

    def __init__(self, ctx: Context, *, timeout_s: float = 120.0, max_tokens: int = 1024):
        self.ctx = ctx
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens
        self.name = "MCP client's model"

    async def _ask(self, prompt: str) -> types.CreateMessageResult:
        message = types.SamplingMessage(role="user", content=types.TextContent(type="text", text=prompt))
        with anyio.fail_after(self.timeout_s), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sampling is deprecated in the 2026-07-28 protocol, used on older ones
            return await self.ctx.session.create_message(
                [message], max_tokens=self.max_tokens, system_prompt=SYSTEM, temperature=0.0,
                model_preferences=types.ModelPreferences(intelligence_priority=0.8, speed_priority=0.5),
                related_request_id=self.ctx.request_id)

    def __call__(self, prompt: str) -> str:
        """Called from a worker thread (anyio.to_thread)."""
        try:
            r = anyio.from_thread.run(self._ask, prompt)
        except TimeoutError as e:
            raise TdbError(f"the MCP client's model did not answer within {self.timeout_s:g} s") from e
        except NoBackChannelError as e:
            raise TdbError("this connection cannot carry sampling requests to the client") from e
        except MCPError as e:
            raise TdbError(f"the MCP client declined the sampling request: {e.error.message}") from e
        if not isinstance(r.content, types.TextContent):
            raise TdbError(f"the MCP client's model answered with {type(r.content).__name__}, not text")
        self.name = f"{r.model} (MCP client)"
        return r.content.text
