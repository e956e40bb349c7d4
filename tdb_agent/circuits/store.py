"""Named circuits kept in memory and saved as node-link JSON in a workspace folder.

Edits are atomic: `edit` hands out a copy and commits it (and writes the file) only when
the block ends without an error and the result is within the limits, so a bad node in a
batch of additions changes nothing, in memory or on disk.

Several servers may share one workspace (docs/DESIGN.md §6). Every read-modify-write holds
an advisory lock on `circuits/.lock` (fcntl, across processes) and first re-reads the file
when another writer changed it since this store last saw it; files are replaced atomically
through temporary names unique to each writer, so no reader sees a partial or empty file.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import networkx as nx

from tdb_agent.circuits.io import load, save
from tdb_agent.circuits.model import SINK, get_edge, get_node, merge_evidence
from tdb_agent.errors import TdbError
from tdb_agent.service.limits import LimitExceeded, flag
from tdb_agent.workbench import Limits

try:
    import fcntl
except ImportError:  # not POSIX: one process per workspace
    fcntl = None

log = logging.getLogger(__name__)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise TdbError(f"bad circuit name {name!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a "
                       "letter or digit (it is also the file name)")
    return name


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """What identifies one version of a file (a replace makes a new inode)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def check_limits(g: nx.DiGraph, limits: Limits) -> None:
    """Refuse a circuit over the size limits; trim each node's and edge's evidence to the newest
    `max_evidence` (repeats dropped)."""
    n_nodes = sum(1 for n in g.nodes if n != SINK)
    for name, n, what in (("max_circuit_nodes", n_nodes, "nodes"),
                          ("max_circuit_edges", g.number_of_edges(), "edges")):
        if n > getattr(limits, name):
            raise LimitExceeded(f"the circuit would have {n} {what}, over the limit {name}={getattr(limits, name)} "
                                f"(set by `tdb-agent serve {flag(name)}`); nothing was changed")
    cap = limits.max_evidence
    for n, attrs in g.nodes(data=True):
        if len(attrs.get("evidence") or []) > cap:
            attrs["evidence"] = [e.model_dump(mode="json") for e in merge_evidence(get_node(g, n).evidence, [], cap)]
    for s, t, attrs in g.edges(data=True):
        if len(attrs.get("evidence") or []) > cap:
            kept = merge_evidence(get_edge(g, s, t).evidence, [], cap)
            attrs["evidence"] = [e.model_dump(mode="json") for e in kept]


class CircuitStore:
    def __init__(self, circuits: dict[str, nx.DiGraph], workspace: Path, limits: Limits | None = None):
        self.circuits = circuits
        self.folder = Path(workspace) / "circuits"
        self.limits = limits or Limits()
        self.lock = threading.RLock()
        self.unreadable: dict[str, str] = {}  # file name -> why it was skipped
        self._seen: dict[str, tuple[int, int, int] | None] = {}  # name -> stamp of the file version in memory
        self._lock_fd: int | None = None
        self._lock_depth = 0

    def path(self, name: str) -> Path:
        return self.folder / f"{check_name(name)}.json"

    @contextmanager
    def _workspace_lock(self) -> Iterator[None]:
        """The in-process lock and the cross-process advisory file lock (reentrant)."""
        with self.lock:
            if self._lock_depth == 0 and fcntl is not None:
                self.folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
                self._lock_fd = fd
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0 and self._lock_fd is not None:
                    fd, self._lock_fd = self._lock_fd, None
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    os.close(fd)

    def _refresh(self, name: str) -> None:
        """Re-read a circuit whose file another writer changed (or created) since we last saw it."""
        path = self.folder / f"{name}.json"
        if name in self.circuits and name not in self._seen:
            return  # put in memory by its owner, not through this store: that version stands
        stamp = _stamp(path)
        if stamp is None or stamp == self._seen.get(name):
            return
        try:
            g = load(path)
        except TdbError as e:
            if self.unreadable.get(path.name) != str(e):
                log.warning("skipped unreadable circuit file %s: %s", path.name, e)
            self.unreadable[path.name] = str(e)
            self._seen[name] = stamp
            return
        self.unreadable.pop(path.name, None)
        self.circuits[name] = g
        self._seen[name] = stamp

    def names(self) -> list[str]:
        with self.lock:
            self.load_saved()
            return sorted(self.circuits)

    def get(self, name: str) -> nx.DiGraph:
        with self.lock:
            if NAME.fullmatch(name or ""):
                self._refresh(name)
            if name not in self.circuits:
                why = self.unreadable.get(f"{name}.json")
                if why:
                    raise TdbError(f"the file of circuit {name!r} is unreadable ({why}); fix or remove it, or "
                                   "replace it with circuit_create(overwrite=true)")
                have = ", ".join(sorted(self.circuits)) or "none yet (create one with circuit_create)"
                raise TdbError(f"no circuit named {name!r}; circuits: {have}")
            return self.circuits[name]

    def put(self, name: str, g: nx.DiGraph, overwrite: bool = True) -> Path:
        """Save and commit `g` (checked against the limits first: refused, nothing changes)."""
        check_name(name)
        with self._workspace_lock():
            self._refresh(name)
            path = self.path(name)
            if not overwrite and (name in self.circuits or path.exists()):
                raise TdbError(f"a circuit named {name!r} exists; pick another name or pass overwrite=true")
            g.graph["name"] = name
            check_limits(g, self.limits)
            save(g, path)
            self.circuits[name] = g
            self._seen[name] = _stamp(path)
            self.unreadable.pop(path.name, None)
            return path

    @contextmanager
    def edit(self, name: str) -> Iterator[nx.DiGraph]:
        """A copy of the circuit (as saved now, by any writer) to change; committed at the end."""
        with self._workspace_lock():
            g = copy.deepcopy(self.get(name))
            yield g
            self.put(name, g)

    def load_saved(self) -> list[str]:
        """Load the workspace's saved circuits that are not in memory yet (a restarted
        server continues where it stopped, another server's new circuits appear); an
        unreadable file is skipped with a warning naming it, and listed in `unreadable`."""
        loaded = []
        if not self.folder.is_dir():
            return loaded
        with self.lock:
            for path in sorted(self.folder.glob("*.json")):
                name = path.stem
                if name in self.circuits or not NAME.fullmatch(name):
                    continue
                self._refresh(name)
                if name in self.circuits:
                    loaded.append(name)
        return loaded
