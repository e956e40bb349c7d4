"""Files the tools write for the user: `<workspace>/exports/<kind>/<name>/<file>`.

One folder per kind (circuits, graphs) and per name: names may hold dots and dashes, so in a
flat folder circuit `a.circuit_tracer` as json and circuit `a` as circuit_tracer, or graph
`a-full` and graph `a` unpruned, would share a file. Files are replaced atomically, and
results name them relative to the workspace, never by the server's absolute paths.
"""

from __future__ import annotations

from pathlib import Path

from tdb_agent.circuits.io import write_atomic
from tdb_agent.workbench import Workbench


def in_workspace(bench: Workbench, path: Path) -> str:
    """A path as results show it: relative to the workspace."""
    return path.relative_to(bench.workspace).as_posix()


def write_export(bench: Workbench, kind: str, name: str, filename: str, text: str) -> str:
    """Write an export atomically; its path relative to the workspace."""
    return in_workspace(bench, write_atomic(bench.workspace / "exports" / kind / name / filename, text))
