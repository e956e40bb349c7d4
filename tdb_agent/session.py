"""One way to open a session: what to load (an `EngineSpec`, plain data) and the functions
that turn it into a workbench or into an MCP client session over one.

This module is a composition root, like `cli`: it may import the engine, the server and
the datasets. Every command, the Ray workers, the evals and the tests open sessions here,
so "load the engine, attach SAEs, open the dataset, build the workbench" is written once.
The agent (`tdb_agent.agent`) is handed a client session; it never builds one itself.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from tdb_agent.engine import Engine
    from tdb_agent.workbench import Limits, Workbench

Transport = Literal["inprocess", "stdio"]


class EngineSpec(BaseModel):
    """Everything needed to load the same engine in another process (a Ray worker, a stdio
    server): the model, where it runs, its SAEs and its activation dataset."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="local HF folder or hub id; None: the bundled model")
    device: str = "auto"
    dtype: str = "float32"
    device_map: str | dict | None = None
    max_memory: str | dict | None = None
    offload_folder: str | None = None
    saes: list[str] = Field(default_factory=list, description="SAE folders to attach")
    bundled_saes: bool = Field(True, description="also attach the bundled model's shipped SAEs")
    transcoders: list[str] = Field(default_factory=list, description="transcoder folders (engine/transcoder.py)")
    bundled_transcoders: bool = Field(True, description="attach the bundled model's shipped transcoders when "
                                      "no transcoders are given")
    dataset: str | None = Field(None, description="activation dataset folder; None: the bundled model's, if any")
    allow_download: bool = False
    threads: int = Field(1, description="torch CPU threads per worker (also the CPUs Ray reserves for it)")

    @classmethod
    def from_args(cls, args: argparse.Namespace, **override) -> EngineSpec:
        """The spec of a command's flags (`--model`, `--device`, `--device-map`, `--sae`, ...);
        flags a command does not have keep their defaults."""
        get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
        values = dict(model=get("model"), device=get("device", "auto"), dtype=get("dtype", "float32"),
                      device_map=get("device_map"), max_memory=get("max_memory"), offload_folder=get("offload_folder"),
                      saes=list(get("sae", None) or []), bundled_saes=not get("no_bundled_saes", False),
                      transcoders=list(get("transcoders", None) or []),
                      bundled_transcoders=not get("no_bundled_transcoders", False),
                      dataset=get("dataset"), allow_download=bool(get("allow_download", False)),
                      threads=get("threads") or 1)
        values.update(override)
        return cls(**values)

    def load_kwargs(self) -> dict:
        """The `Engine.load` arguments of this spec."""
        return dict(device=self.device, dtype=self.dtype, allow_download=self.allow_download,
                    device_map=self.device_map, max_memory=self.max_memory, offload_folder=self.offload_folder)

    def load(self, *, set_threads: bool = False) -> Engine:
        """Load the engine and attach its SAEs. set_threads: also set torch's CPU threads
        (a Ray worker owns its process; a command keeps the user's setting)."""
        from tdb_agent.engine import Engine
        from tdb_agent.engine.sae import attach_saes
        from tdb_agent.engine.transcoder import attach_transcoders

        if set_threads:
            import torch
            torch.set_num_threads(self.threads)
        engine = Engine.load(self.model, **self.load_kwargs())
        attach_saes(engine, self.saes, bundled=self.bundled_saes, allow_download=self.allow_download)
        attach_transcoders(engine, self.transcoders, bundled=self.bundled_transcoders)
        return engine

    def serve_args(self) -> list[str]:
        """`tdb-agent serve` flags that load this spec in a subprocess."""
        out = ["--device", self.device, "--dtype", self.dtype]
        if self.model:
            out += ["--model", self.model]
        for name in ("device_map", "max_memory", "offload_folder", "dataset"):
            v = getattr(self, name)
            if v is not None:
                out += ["--" + name.replace("_", "-"), v if isinstance(v, str) else json.dumps(v)]
        for s in self.saes:
            out += ["--sae", s]
        if not self.bundled_saes:
            out.append("--no-bundled-saes")
        for t in self.transcoders:
            out += ["--transcoders", t]
        if not self.bundled_transcoders:
            out.append("--no-bundled-transcoders")
        if self.allow_download:
            out.append("--allow-download")
        return out

    def wants_gpu(self) -> bool:
        import torch

        if self.device_map is not None:
            return torch.cuda.is_available()
        return self.device.startswith("cuda") or (self.device == "auto" and torch.cuda.is_available())

    def actor_options(self) -> dict:
        """Resources Ray reserves for one worker holding this engine."""
        return {"num_cpus": self.threads, "num_gpus": 1 if self.wants_gpu() else 0}


def open_workbench(spec: EngineSpec | None = None, *, limits: Limits | None = None,
                   workspace: str | Path | None = None, engine: Engine | None = None) -> Workbench:
    """The workbench of a spec: its engine (or `engine`, already loaded with its SAEs), its
    activation dataset (the spec's, or the bundled model's shipped one) and workspace. An
    explicit dataset that does not match the model is a `TdbError`."""
    from tdb_agent.service.examples import attach_dataset
    from tdb_agent.workbench import Workbench

    spec = spec or EngineSpec()
    bench = Workbench(engine if engine is not None else spec.load(), limits, workspace=workspace)
    attach_dataset(bench, spec.dataset)
    return bench


@asynccontextmanager
async def open_session(spec: EngineSpec | None = None, transport: Transport = "inprocess", *,
                       workspace: str | Path, engine: Engine | None = None) -> AsyncIterator:
    """An MCP client session to the tools: to a server in this process (over `engine` when
    given: Ray actors keep one engine for many runs) or to `tdb-agent serve` started as a
    stdio subprocess (the code path of any MCP client)."""
    from mcp import Client, StdioServerParameters

    spec = spec or EngineSpec()
    if transport == "stdio":
        args = ["-m", "tdb_agent.cli", "serve", "--workspace", str(workspace), *spec.serve_args()]
        async with Client(StdioServerParameters(command=sys.executable, args=args), read_timeout_seconds=600) as c:
            yield c
        return
    from tdb_agent.server import build_server

    server = build_server(open_workbench(spec, workspace=workspace, engine=engine))
    async with Client(server) as client:
        yield client
