"""What a server (or an agent's in-process session) holds: the engine and the limits.

Later issues hang the activation cache, SAEs, datasets and circuits here; tools read
everything through this object, never through file paths given by a client.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from tdb_agent.engine import Engine
from tdb_agent.ops.runs import RunCache


class Limits(BaseModel):
    max_prompt_tokens: int = Field(512, description="longest prompt a tool accepts")
    max_top_k: int = Field(200, description="largest top_k")
    max_components: int = Field(256, description="most components in one call")
    max_new_tokens: int = Field(64, description="longest generation")
    batch_size: int = Field(64, description="rows per forward pass in batched sweeps")
    cached_runs: int = Field(8, description="clean runs kept in the LRU activation cache")


class Workbench:
    def __init__(self, engine: Engine, limits: Limits | None = None):
        self.engine = engine
        self.limits = limits or Limits()
        self.cache = RunCache(engine, max_runs=self.limits.cached_runs)
