"""tdb-agent: an interpretability workbench for transformer language models, driven by LLM agents."""

from pathlib import Path

__version__ = "0.1.0"

#: system prompts of the agent and the explainer, and the MCP investigation templates
#: (inside the package, so that a non-editable install has them too)
PROMPTS = Path(__file__).resolve().parent / "prompts"
