"""A discovery run on disk: everything needed to read, audit or resume it.

    RUN_DIR/
      run.json          how the run was started (task or prompt, planner, model)
      transcript.jsonl  every LLM message and tool call with its result and timing, one JSON per line
      graph.json        the circuit hypothesis (networkx node-link JSON), rewritten after every step
      report.md         written at the end
      graph.svg / graph.html  the picture

Lines are flushed and fsynced as they are written and the graph is replaced atomically,
so a killed process loses at most the step in flight; `--resume DIR` reads both back.
A line torn by a kill or a full disk is skipped by the reader (and counted in `bad_lines`),
and the first append of a resumed run drops a torn last line so it starts on a fresh one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

log = logging.getLogger(__name__)

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
    # scripted planner: also a feature-level circuit from an attribution graph, checked by intervention
    graph: bool = False
    started: float = 0.0


class RunStore:
    def __init__(self, folder: Path):
        self.dir = Path(folder)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.transcript = self.dir / "transcript.jsonl"
        self.bad_lines: list[int] = []  # 1-based numbers of the lines the last events() skipped
        self._repaired = False
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
        if not self._repaired:
            self._drop_torn_tail()
            self._repaired = True
        event = {"step": self._count, "time": time.time(), "kind": kind, **data}
        line = json.dumps(event, default=str)
        with open(self.transcript, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._count += 1
        return event

    def _drop_torn_tail(self) -> None:
        """Make the transcript end on a complete line before this writer appends: a last line
        without its newline is the step a kill cut short; it is dropped (or, if it happens to
        be whole JSON, ended), so the next event never lands on it. Only writers call this: a
        reader must not cut a line another process is still writing."""
        if not self.transcript.exists():
            return
        with open(self.transcript, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            start = size
            while start > 0:  # find the start of the last line, a block at a time
                block = min(65536, start)
                f.seek(start - block)
                nl = f.read(block).rfind(b"\n")
                if nl >= 0:
                    start = start - block + nl + 1
                    break
                start -= block
            f.seek(start)
            tail = f.read()
            try:
                json.loads(tail.decode("utf-8"))
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
            except ValueError:
                log.warning("%s: dropped a torn last line (%d bytes) before resuming", self.transcript, len(tail))
                f.truncate(start)
            f.flush()
            os.fsync(f.fileno())

    def events(self) -> list[dict]:
        """Every readable event, in order; lines that are not a JSON object (torn by a kill, a
        full disk, invalid UTF-8) are skipped and their numbers kept in `bad_lines`."""
        self.bad_lines = []
        if not self.transcript.exists():
            return []
        out = []
        text = self.transcript.read_bytes().decode("utf-8", errors="replace")
        for i, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if isinstance(event, dict):
                out.append(event)
            else:
                self.bad_lines.append(i)
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
