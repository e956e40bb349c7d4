"""Dataset builds sharded over Ray workers: `build(..., runner=RayRunner(spec))`.

The driver cuts the corpus into chunks (`corpus.plan_chunks`) and merges their states in
chunk order; workers (actors, each holding an engine) build chunks alone and return their
state: kept examples per component and the statistics, a few MB each. Chunk states merge
exactly (see builder.py and kept.py), so the dataset is the single-process one, bit for bit, for the
same settings and the same torch thread count per worker.

A chunk whose worker dies (killed, out of memory, node lost) or raises is sent again to a
fresh worker, up to `max_retries` times; the driver checkpoints after every merged chunk, so
a killed driver resumes where it stopped (`build(..., resume=True)`).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterable, Iterator

from tdb_agent.datasets.config import BuildConfig
from tdb_agent.datasets.corpus import Chunk
from tdb_agent.datasets.pipeline import run_chunk
from tdb_agent.errors import TdbError
from tdb_agent.scaleout import EngineSpec, check_fits, connect, default_workers

log = logging.getLogger(__name__)


class BuildWorker:
    """A Ray actor: one engine, many chunks. `fault` (tests only): {"chunk": i, "marker":
    path, "how": "exit" | "raise"} makes the first attempt at chunk i fail."""

    def __init__(self, spec: dict):
        self.engine = EngineSpec(**spec).load(set_threads=True)

    def run(self, cfg: dict, chunk: Chunk, edges, fault: dict | None = None):
        f = fault
        if f and f["chunk"] == chunk.index and not os.path.exists(f["marker"]):
            open(f["marker"], "w").close()
            if f.get("how", "exit") == "exit":
                os._exit(1)  # the worker process dies, as a killed or crashed one does
            raise RuntimeError(f"injected failure on chunk {chunk.index}")
        return run_chunk(self.engine, BuildConfig(**cfg), chunk, edges)

    def pid(self) -> int:
        return os.getpid()

    def cpu_seconds(self) -> float:
        """CPU time this worker process used (benchmarks: how much CPU it really got)."""
        import time
        return time.process_time()


class RayRunner:
    """Runs chunks on `workers` Ray actors (default: one per GPU, or per `spec.threads` CPUs),
    at most `in_flight` chunks queued per worker. `fault`: see BuildWorker (tests)."""

    def __init__(self, spec: EngineSpec, workers: int | None = None, address: str | None = None,
                 max_retries: int = 3, in_flight: int = 2, fault: dict | None = None):
        self.ray = connect(address)
        self.spec = spec
        self.n_workers = workers or default_workers(spec)
        check_fits(spec, self.n_workers)
        self.max_retries = max_retries
        self.in_flight = in_flight
        self.fault = fault
        self._cls = self.ray.remote(BuildWorker).options(**spec.actor_options())
        self.actors = [self._new() for _ in range(self.n_workers)]
        self.retries = 0  # chunks sent again after a failure (for the log and tests)

    def _new(self):
        return self._cls.remote(self.spec.model_dump())

    def run(self, chunks: Iterable[Chunk], cfg: BuildConfig, edges) -> Iterator[tuple[int, dict]]:
        ray = self.ray
        from ray.exceptions import RayActorError, RayTaskError

        source = iter(chunks)
        again: deque[Chunk] = deque()
        attempts: dict[int, int] = {}
        pending: dict = {}  # ref -> (chunk, actor index, actor handle)
        load = [0] * len(self.actors)
        cfg_d, edges_ref = cfg.__dict__, ray.put(edges)

        def fill() -> None:
            while len(pending) < self.in_flight * len(self.actors):
                chunk = again.popleft() if again else next(source, None)
                if chunk is None:
                    return
                i = min(range(len(self.actors)), key=load.__getitem__)
                pending[self.actors[i].run.remote(cfg_d, chunk, edges_ref, self.fault)] = (chunk, i, self.actors[i])
                load[i] += 1

        fill()
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            chunk, i, actor = pending.pop(ref)
            load[i] -= 1
            try:
                state = ray.get(ref)
            except (RayActorError, RayTaskError) as e:
                attempts[chunk.index] = attempts.get(chunk.index, 0) + 1
                if attempts[chunk.index] > self.max_retries:
                    raise TdbError(f"chunk {chunk.index} failed {attempts[chunk.index]} times; last: {e}") from e
                if isinstance(e, RayActorError) and self.actors[i] is actor:  # not replaced yet
                    log.warning("worker %d died on chunk %d; starting a new one", i, chunk.index)
                    self.actors[i] = self._new()
                self.retries += 1
                log.warning("chunk %d failed (%s); sending it again", chunk.index, type(e).__name__)
                again.append(chunk)
                fill()
                continue
            yield chunk.index, state
            fill()

    def close(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:  # already gone
                pass
        self.actors = []
