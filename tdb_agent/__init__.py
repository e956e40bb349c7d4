"""tdb-agent: an interpretability workbench for transformer language models, driven by LLM agents."""

__version__ = "0.1.0"
