"""tdb-agent: an interpretability workbench for transformer language models, driven by LLM agents."""

from pathlib import Path

__version__ = "0.1.0"

#: system prompts of the agent and the explainer, and the MCP investigation templates: the
#: top-level `prompts/` folder of a checkout (editable install), which the wheel carries
#: inside the package (setup.py copies it there)
_PACKAGED = Path(__file__).resolve().parent / "prompts"
PROMPTS = _PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parent.parent / "prompts"
