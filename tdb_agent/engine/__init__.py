"""Model engine: load an HF causal LM on CPU/GPU, name its hook sites, capture, intervene."""

from tdb_agent.engine.engine import DEFAULT_MODEL, Engine, ForwardOutput, HookFn, StopForward
from tdb_agent.engine.spec import ModelSpec

__all__ = ["DEFAULT_MODEL", "Engine", "ForwardOutput", "HookFn", "ModelSpec", "StopForward"]
