"""Named circuits kept in memory and saved as node-link JSON in a workspace folder.

Edits are atomic: `edit` hands out a copy and commits it (and writes the file) only when
the block ends without an error, so a bad node in a batch of additions changes nothing.
"""

from __future__ import annotations

import copy
import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import networkx as nx

from tdb_agent.circuits.io import load, save
from tdb_agent.errors import TdbError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise TdbError(f"bad circuit name {name!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a "
                       "letter or digit (it is also the file name)")
    return name


class CircuitStore:
    def __init__(self, circuits: dict[str, nx.DiGraph], workspace: Path):
        self.circuits = circuits
        self.folder = Path(workspace) / "circuits"
        self.lock = threading.RLock()

    def path(self, name: str) -> Path:
        return self.folder / f"{check_name(name)}.json"

    def names(self) -> list[str]:
        with self.lock:
            return sorted(self.circuits)

    def get(self, name: str) -> nx.DiGraph:
        with self.lock:
            if name not in self.circuits:
                have = ", ".join(sorted(self.circuits)) or "none yet (create one with circuit_create)"
                raise TdbError(f"no circuit named {name!r}; circuits: {have}")
            return self.circuits[name]

    def put(self, name: str, g: nx.DiGraph, overwrite: bool = True) -> Path:
        check_name(name)
        with self.lock:
            if not overwrite and name in self.circuits:
                raise TdbError(f"a circuit named {name!r} exists; pick another name or pass overwrite=true")
            g.graph["name"] = name
            path = save(g, self.path(name))
            self.circuits[name] = g
            return path

    @contextmanager
    def edit(self, name: str) -> Iterator[nx.DiGraph]:
        with self.lock:
            g = copy.deepcopy(self.get(name))
            yield g
            self.put(name, g)

    def load_saved(self) -> list[str]:
        """Load the workspace's saved circuits that are not in memory yet (a restarted
        server continues where it stopped); unreadable files are skipped and named."""
        loaded, bad = [], []
        if not self.folder.is_dir():
            return loaded
        for path in sorted(self.folder.glob("*.json")):
            name = path.stem
            with self.lock:
                if name in self.circuits or not NAME.fullmatch(name):
                    continue
                try:
                    self.circuits[name] = load(path)
                    loaded.append(name)
                except TdbError:
                    bad.append(path.name)
        if bad:
            logging.getLogger(__name__).warning("skipped unreadable circuit files: %s", ", ".join(bad))
        return loaded
