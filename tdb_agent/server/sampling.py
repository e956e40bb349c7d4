"""The MCP client's own model as a `TextModel` (explain/llm.py), through sampling
(`sampling/createMessage`): the explainer runs in a worker thread and each prompt is sent
to the client on the event loop, which shows it to the user where the client asks for
consent. Refusals, timeouts and non-text answers become TdbError with a message that says
which."""

from __future__ import annotations

import warnings

import anyio
import anyio.from_thread
from mcp import types
from mcp.server.mcpserver import Context
from mcp.shared.exceptions import MCPError, NoBackChannelError

from tdb_agent.errors import TdbError

SYSTEM = ("You help interpret a small language model's internal components. Answer exactly in the format the "
          "request asks for, with nothing else.")


def sampling_unavailable(ctx: Context | None) -> str | None:
    """Why the client's model cannot be asked on this connection, or None when it can."""
    if ctx is None:
        return "no MCP client session"
    caps = ctx.client_capabilities
    if caps is None or caps.sampling is None:
        return "the connected MCP client does not offer sampling"
    if not ctx.session.can_send_request:
        return (f"this connection (protocol {ctx.protocol_version}) cannot carry requests from the server to the "
                "client, so the client's model cannot be asked")
    return None


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
