"""A discovery run in one record: what `discover.run` returns (and `tdb-agent discover`
prints), and what the viewer lists for each run folder it reads back from disk. Here, in
`agent/`, because the agent writes runs and the viewer may import the agent's files (not
the other way round: docs/DESIGN.md §2)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, computed_field


class RunSummary(BaseModel):
    run_dir: str = Field(description="the run folder")
    task: str | None = None
    planner: str | None = None
    circuit: str | None = Field(None, description="the circuit's name")
    nodes: list[str] = Field([], description="the circuit's nodes, without the LOGITS sink")
    faithfulness: float | None = None
    faithfulness_heldout: float | None = None  # scripted planner, task behaviours: on pairs pruning never saw
    faithfulness_other: dict[str, float] = {}  # scripted planner: under the other ablation mode
    tool_calls: int = 0
    seconds: float | None = None
    stopped_because: str | None = None

    @computed_field
    @property
    def name(self) -> str:
        """The run folder's name (how the viewer addresses the run)."""
        return Path(self.run_dir).name

    @computed_field
    @property
    def n_nodes(self) -> int:
        return len(self.nodes)
