"""The server's per-call limits, as settings: one `tdb-agent serve` flag each. Kept apart from
the workbench (which loads torch and the engine) so that the command line builds its flags,
`--help` included, without loading a model library; the checks are service/limits.py's."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Limits(BaseModel):
    """Per-call limits of the server. Each is a `tdb-agent serve` flag (`--max-top-k` ...);
    exceeding one is a tool error that names it."""

    model_config = ConfigDict(extra="forbid")

    max_prompt_tokens: int = Field(512, ge=1, description="longest prompt a tool accepts, in tokens")
    max_prompt_chars: int = Field(20000, ge=1, description="longest prompt a tool accepts, in characters "
                                  "(checked before tokenizing)")
    max_top_k: int = Field(200, ge=1, description="largest top_k of any tool")
    max_components: int = Field(256, ge=1, description="most components in one call")
    max_new_tokens: int = Field(64, ge=1, description="longest generation (steer)")
    batch_size: int = Field(64, ge=1, description="rows per forward pass in batched sweeps")
    cached_runs: int = Field(8, ge=1, description="clean runs kept in the LRU activation cache")
    cached_edge_scores: int = Field(8, ge=0, description="edge score sets (EAP, EAP-IG) kept in their LRU cache")
    max_circuit_nodes: int = Field(512, ge=1, description="most nodes (components) in one circuit")
    max_circuit_edges: int = Field(2048, ge=1, description="most edges in one circuit")
    max_evidence: int = Field(16, ge=1, description="evidence items kept per circuit node or edge (repeats "
                              "dropped, the newest kept)")
    max_prune_rows: int = Field(100_000, ge=1, description="most prompt forward rows one circuit_prune may run, "
                                "estimated before it starts as modes x pairs x (3 + n(n+1)/2) for n prunable nodes")
