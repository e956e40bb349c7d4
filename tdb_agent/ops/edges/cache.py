"""A small LRU of edge scores that lives on the workbench, so that tools asked about the same
behaviour (edge_circuit, then edge_faithfulness, or edge_attribution again) score the edges
once: EAP-IG is several forward and backward passes.

An entry is keyed by everything its numbers depend on: the resolved prompt pairs, method,
steps, reference, metric, per_position, norm and batch size. Beside the key, the cache keeps
the model's identity: the engine object, every parameter's storage and in-place version
counter (editing a weight in place bumps it) and the attached SAEs. When that identity
changes the cache empties itself before it answers.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

from tdb_agent.engine import Engine
from tdb_agent.ops.edges.eap import EdgeScores
from tdb_agent.ops.edges.grads import weights_identity


def model_identity(engine: Engine) -> tuple:
    """What the scores of this engine depend on beyond their arguments (cheap: no weight is read)."""
    saes = tuple((key, id(sae)) for key, sae in engine.saes.items()) if getattr(engine, "saes", None) else ()
    return id(engine), engine.name, weights_identity(engine), saes


def pairs_key(pairs: Sequence) -> str:
    """The prompt pairs as canonical JSON (pydantic models or anything with these fields)."""
    rows = [[p.prompt, p.corrupted_prompt, p.target, p.distractor] for p in pairs]
    return json.dumps(rows)


class EdgeScoreCache:
    """Bounded LRU of EdgeScores (max_entries 0: no caching)."""

    def __init__(self, max_entries: int = 8):
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, EdgeScores] = OrderedDict()
        self._identity: tuple | None = None
        self._lock = threading.Lock()
        self.hits = 0

    def get(self, engine: Engine, key: Hashable, compute: Callable[[], EdgeScores]) -> EdgeScores:
        """The scores under `key`, computed by `compute()` on a miss. A hit is a copy with no
        passes counted (none were run) and `cached` set."""
        identity = model_identity(engine)
        with self._lock:
            if identity != self._identity:
                self._entries.clear()
                self._identity = identity
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return dataclasses.replace(hit, scores=hit.scores.clone(), forward_passes=0, backward_passes=0,
                                           cached=True)
        res = compute()
        if self.max_entries > 0:
            with self._lock:
                if model_identity(engine) == self._identity:
                    self._entries[key] = dataclasses.replace(res, scores=res.scores.clone())
                    while len(self._entries) > self.max_entries:
                        self._entries.popitem(last=False)
        return res

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
