"""A discovery run on disk: everything needed to read, audit or resume it.

    RUN_DIR/
      run.json          how the run was started (task or prompt, planner, model)
      transcript.jsonl  every LLM message and tool call with its result and timing, one JSON per line
      graph.json        the circuit hypothesis (networkx node-link JSON), rewritten after every step
      report.md         written at the end
      graph.svg / graph.html  the picture

Lines are flushed and fsynced as they are written and the graph is replaced atomically,
so a killed process loses at most the step in flight; `--resume DIR` reads both back.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel


class RunConfig(BaseModel):
    task: str | None = None
    prompt: str | None = None
    corrupted_prompt: str | None = None
    target: str | None = None
    distractor: str | None = None
    planner: str = "scripted"
    model: str | None = None
    max_steps: int = 40
    llm_model: str | None = None
    # scripted planner: the ablation(s) the circuit's faithfulness must hold under ("both": mean and resample)
    ablation: Literal["mean", "resample", "both"] = "mean"
    started: float = 0.0


class RunStore:
    def __init__(self, folder: Path):
        self.dir = Path(folder)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.transcript = self.dir / "transcript.jsonl"
        self._count = len(self.events())

    # ---- config -------------------------------------------------------------------
    def save_config(self, cfg: RunConfig) -> None:
        self._atomic_write(self.dir / "run.json", cfg.model_dump_json(indent=2))

    def load_config(self) -> RunConfig:
        path = self.dir / "run.json"
        if not path.exists():
            raise FileNotFoundError(f"{self.dir} is not a run folder (no run.json)")
        return RunConfig.model_validate_json(path.read_text())

    # ---- transcript ---------------------------------------------------------------
    def append(self, kind: str, **data: Any) -> dict:
        """Append one event; returns it. `kind` is e.g. 'message', 'tool_call', 'note'."""
        event = {"step": self._count, "time": time.time(), "kind": kind, **data}
        line = json.dumps(event, default=str)
        with open(self.transcript, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._count += 1
        return event

    def events(self) -> list[dict]:
        if not self.transcript.exists():
            return []
        out = []
        for line in self.transcript.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: the step in flight is lost
                break
        return out

    def n_events(self) -> int:
        return self._count

    # ---- graph and report -----------------------------------------------------------
    def save_graph(self, node_link: dict) -> None:
        self._atomic_write(self.dir / "graph.json", json.dumps(node_link, indent=1, default=str))

    def load_graph(self) -> dict | None:
        path = self.dir / "graph.json"
        return json.loads(path.read_text()) if path.exists() else None

    def write(self, name: str, text: str) -> Path:
        path = self.dir / name
        self._atomic_write(path, text)
        return path

    @staticmethod
    def _atomic_write(path: Path, text: str) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
