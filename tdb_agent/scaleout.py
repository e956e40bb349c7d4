"""What Ray workers share: how to load the engine they hold, and how to reach the cluster.

Ray is an optional extra (`pip install tdb-agent[ray]`). A worker is a Ray actor that
loads its own engine once (from an `EngineSpec`: the same model, SAEs and settings as the
driver) and then serves many dataset chunks or discovery runs. One actor per GPU where the
engine goes to CUDA, otherwise one per `threads` CPUs.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from tdb_agent.errors import TdbError
from tdb_agent.session import EngineSpec

log = logging.getLogger(__name__)

__all__ = ["EngineSpec", "check_fits", "connect", "default_workers", "map_on_actors", "read_batch_lines",
           "require_ray", "run_jobs", "unique_names"]


def require_ray():
    try:
        import ray
    except ImportError:
        raise TdbError("Ray is not installed: pip install 'tdb-agent[ray]'") from None
    return ray


def connect(address: str | None = None, num_cpus: int | None = None):
    """Join the cluster at `address` ("auto": the one this machine belongs to), or start a
    local one (address None or "local"); a session already connected is reused."""
    ray = require_ray()
    if not ray.is_initialized():
        if address in (None, "", "local"):
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    return ray


def default_workers(spec: EngineSpec) -> int:
    """One worker per GPU (engines on CUDA) or per `threads` CPUs of the cluster."""
    ray = require_ray()
    res = ray.cluster_resources()
    if spec.wants_gpu():
        return max(1, int(res.get("GPU", 0)))
    return max(1, int(res.get("CPU", 1)) // max(spec.threads, 1))


def check_fits(spec: EngineSpec, workers: int) -> None:
    """Warn when the cluster cannot hold `workers` engines at once (Ray would wait, silently,
    for resources that may never come, unless an autoscaler adds them)."""
    ray = require_ray()
    res = ray.cluster_resources()
    opts = spec.actor_options()
    for key, name in (("num_cpus", "CPU"), ("num_gpus", "GPU")):
        need = workers * opts[key]
        if need > res.get(name, 0):
            log.warning("%d workers need %s %s but the cluster has %s: some will wait for resources",
                        workers, need, name, res.get(name, 0))


def map_on_actors(worker_cls, spec: EngineSpec, jobs: list[tuple], method: str, ray_address: str | None,
                  workers: int | None, on_result=None) -> tuple[list, int]:
    """Run job i as `actor.<method>(i, *job)`, which returns (i, result), on engine actors of
    `worker_cls` (built from `spec.model_dump()`), in any order; `on_result` sees each
    result as it comes. Returns the results in job order and the number of actors; the
    actors are ended afterwards."""
    ray = connect(ray_address)
    n_workers = min(workers or default_workers(spec), max(len(jobs), 1))
    check_fits(spec, n_workers)
    cls = ray.remote(worker_cls).options(**spec.actor_options())
    actors = [cls.remote(spec.model_dump()) for _ in range(n_workers)]
    try:
        from ray.util import ActorPool

        pool = ActorPool(actors)
        tagged = list(enumerate(jobs))
        out: list = [None] * len(jobs)
        for i, r in pool.map_unordered(lambda a, j: getattr(a, method).remote(j[0], *j[1]), tagged):
            out[i] = r
            if on_result is not None:
                on_result(r)
        return out, n_workers
    finally:
        for a in actors:
            ray.kill(a)


def run_jobs(spec: EngineSpec, jobs: list[tuple], run, worker_cls, method: str, ray_address: str | None,
             workers: int | None, on_result) -> tuple[list, int]:
    """Every job: one after another on one engine here (`run(engine, *job)`), or, with
    `ray_address`, on Ray actors (`map_on_actors`). Returns (results in job order, workers)."""
    if ray_address is not None:
        return map_on_actors(worker_cls, spec, jobs, method, ray_address, workers, on_result)
    engine = spec.load()
    out = []
    for job in jobs:
        out.append(run(engine, *job))
        on_result(out[-1])
    return out, 1


def read_batch_lines(path: str | Path, model) -> list:
    """The items of a batch file: JSON lines, each validated as `model` (a pydantic model);
    blank lines and lines starting with # are skipped."""
    items = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                items.append(model.model_validate_json(line))
            except ValueError as e:
                raise ValueError(f"{path}:{i}: not a batch item ({e})") from None
    return items


def unique_names(bases: list[str]) -> list[str]:
    """File-safe names, numbered from the second use of a name on (a, a-2, a-3, ...)."""
    seen: dict[str, int] = {}
    out = []
    for b in bases:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "-", b)
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return out
