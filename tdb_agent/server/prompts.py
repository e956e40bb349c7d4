"""MCP prompts from the investigation templates in `prompts/investigations/*.md`.

A template is markdown with a small header:

    ---
    name: why_prefers
    title: Why does the model prefer A over B?
    description: one line for the client's prompt picker
    arg prompt: the text the model reads
    arg corrupted_prompt?: optional arguments end with ?
    ---
    Body with {{prompt}} placeholders. A line starting with `?name:` is kept (without the
    marker) only when the optional argument `name` is given.

The files are read once when the server starts and checked then (every placeholder
declared, every argument used), so a broken template fails at start-up, not mid-chat.
"""

from __future__ import annotations

import re
from pathlib import Path

from mcp.server import MCPServer
from mcp.server.mcpserver.prompts.base import Prompt, PromptArgument
from mcp.shared.exceptions import MCPError
from mcp.types import INVALID_PARAMS
from pydantic import BaseModel

from tdb_agent import PROMPTS

PROMPTS_DIR = PROMPTS / "investigations"
MAX_ARGUMENT_CHARS = 20000

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_OPTIONAL_LINE = re.compile(r"^\?([A-Za-z_][A-Za-z0-9_]*):\s?(.*)$")


class TemplateArg(BaseModel):
    name: str
    description: str
    required: bool


class Template(BaseModel):
    name: str
    title: str | None = None
    description: str
    args: list[TemplateArg]
    body: str

    def render(self, values: dict[str, str | None]) -> str:
        known = {a.name for a in self.args}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown argument(s) {unknown} for prompt {self.name}; arguments: {sorted(known)}")
        for a in self.args:
            v = values.get(a.name)
            if a.required and not v:
                raise ValueError(f"prompt {self.name} needs the argument {a.name!r} ({a.description})")
            if v is not None and len(v) > MAX_ARGUMENT_CHARS:
                raise ValueError(f"argument {a.name!r} is {len(v)} characters; at most {MAX_ARGUMENT_CHARS}")
        lines = []
        for line in self.body.splitlines():
            m = _OPTIONAL_LINE.match(line)
            if m:
                if not values.get(m.group(1)):
                    continue
                line = m.group(2)
            lines.append(line)
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"  # a dropped line leaves no gap
        return _PLACEHOLDER.sub(lambda m: str(values.get(m.group(1)) or ""), text)


def parse_template(text: str, source: str = "<template>") -> Template:
    parts = text.split("---", 2)
    if not text.lstrip().startswith("---") or len(parts) < 3:
        raise ValueError(f"{source}: a prompt template starts with a '---' header block")
    fields: dict[str, str] = {}
    args: list[TemplateArg] = []
    for raw in parts[1].strip().splitlines():
        key, sep, value = raw.partition(":")
        if not sep:
            raise ValueError(f"{source}: header line {raw!r} is not 'key: value'")
        key, value = key.strip(), value.strip()
        if key.startswith("arg "):
            name = key[4:].strip()
            required = not name.endswith("?")
            args.append(TemplateArg(name=name.rstrip("?"), description=value, required=required))
        elif key in ("name", "title", "description"):
            fields[key] = value
        else:
            raise ValueError(f"{source}: unknown header key {key!r} (name, title, description, arg NAME)")
    if "name" not in fields or "description" not in fields:
        raise ValueError(f"{source}: the header needs name and description")
    body = parts[2].strip("\n")
    declared = {a.name for a in args}
    used = set(_PLACEHOLDER.findall(body)) | {m.group(1) for line in body.splitlines()
                                              if (m := _OPTIONAL_LINE.match(line))}
    if used - declared:
        raise ValueError(f"{source}: placeholders {sorted(used - declared)} are not declared as arguments")
    if declared - used:
        raise ValueError(f"{source}: arguments {sorted(declared - used)} are never used in the body")
    return Template(name=fields["name"], title=fields.get("title"), description=fields["description"], args=args,
                    body=body)


def load_templates(folder: Path = PROMPTS_DIR) -> list[Template]:
    templates = [parse_template(p.read_text(encoding="utf-8"), str(p)) for p in sorted(folder.glob("*.md"))]
    names = [t.name for t in templates]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ValueError(f"{folder}: duplicate prompt names {sorted(dupes)}")
    return templates


class TemplatePrompt(Prompt):
    """An SDK prompt whose missing-argument error reaches the client with its message (the
    SDK's own check surfaces only as "Internal server error")."""

    async def render(self, arguments, context):
        missing = [a.name for a in self.arguments or [] if a.required and not (arguments or {}).get(a.name)]
        if missing:
            raise MCPError(code=INVALID_PARAMS, message=f"prompt {self.name} needs the argument(s) {missing}; "
                           f"arguments: {[a.name for a in self.arguments or []]}")
        return await super().render(arguments, context)


def _renderer(t: Template):
    def render(**values: str) -> str:
        try:
            return t.render(values)
        except ValueError as e:  # the SDK would replace the message with "Error rendering prompt"
            raise MCPError(code=INVALID_PARAMS, message=str(e)) from e
    return render


def register_prompts(mcp: MCPServer, folder: Path = PROMPTS_DIR) -> list[str]:
    """Register every template in `folder` as an MCP prompt with its arguments."""
    if not folder.is_dir():
        return []
    templates = load_templates(folder)
    for t in templates:
        mcp.add_prompt(TemplatePrompt(name=t.name, title=t.title, description=t.description, fn=_renderer(t),
                              arguments=[PromptArgument(name=a.name, description=a.description, required=a.required)
                                         for a in t.args]))
    return [t.name for t in templates]
