"""What a server (or an agent's in-process session) holds: the engine, the limits, the
activation cache, and the hooks later issues use to enrich component pages.

Later issues hang SAEs, datasets and circuits here; tools read everything through this
object, never through file paths given by a client.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from tdb_agent.components import Component, hook_site, parse_component
from tdb_agent.engine import Engine
from tdb_agent.limits import Limits  # re-exported: Workbench(engine, Limits(...))
from tdb_agent.ops import sae_ops
from tdb_agent.ops.edges.cache import EdgeScoreCache
from tdb_agent.ops.runs import RunCache
from tdb_agent.ops.weights import WeightStats, weight_stats


PageSection = Callable[[Component], Any]
"""Adds one section to a component page (`tdb://component/{id}`): returns a pydantic model
or JSON-able value, or None when it has nothing for this component."""


class Workbench:
    def __init__(self, engine: Engine, limits: Limits | None = None, workspace: str | Path | None = None):
        self.engine = engine
        self.limits = limits or Limits()
        self.cache = RunCache(engine, max_runs=self.limits.cached_runs)
        self.edge_scores = EdgeScoreCache(self.limits.cached_edge_scores)  # per behaviour and method
        # named circuit hypotheses (networkx DiGraphs, tdb_agent.circuits), saved under workspace/circuits
        self.circuits: dict[str, Any] = {}
        self.graphs: dict[str, Any] = {}  # attribution graphs by name (tdb_agent.ops.graph), kept in memory
        self.workspace: Path = Path(workspace if workspace is not None
                                    else os.environ.get("TDB_WORKSPACE", "tdb-workspace")).resolve()
        self.page_sections: dict[str, PageSection] = {}
        self.dataset = None  # activation dataset (tdb_agent.datasets), set by service.examples.attach_dataset

    @property
    def saes(self):
        """The SAEs attached to the engine (tdb_agent.engine.sae.SAESet)."""
        return self.engine.saes

    def dataset_names(self) -> list[str]:
        ds = getattr(self, "dataset", None)
        return [ds.folder.name] if ds is not None else []

    def add_page_section(self, name: str, fn: PageSection) -> None:
        """Register a section of component pages (e.g. "explanation", "top_examples"), so
        the datasets and explainer can extend pages without the server knowing them."""
        if name in ("id", "kind", "layer", "index", "position", "weights"):
            raise ValueError(f"page section name {name!r} is reserved")
        self.page_sections[name] = fn


# ---------------------------------------------------------------- component pages

RELATED_TOOLS = {
    "head": ["attention_pattern", "trace_upstream", "ablate", "patch", "steer"],
    "neuron": ["trace_upstream", "ablate", "patch", "steer"],
    "attn": ["ablate", "patch"],
    "mlp": ["ablate", "patch"],
    "emb": ["ablate", "patch"],
    "sae": ["ablate", "patch"],
    "transcoder": ["top_examples", "explain_component", "trace_upstream", "ablate", "steer", "attribution_graph"],
    "logits": ["predict", "attribute"],
}


class ComponentPage(BaseModel):
    id: str
    kind: str
    layer: int | None = None
    index: int | None = None
    position: int | None = Field(None, description="the @t suffix, if given (weights do not depend on it)")
    hook_site: str | None = None
    weights: list[WeightStats] = []
    related_tools: list[str] = []
    sections: dict[str, Any] = Field({}, description="explanation, top examples, ... as registered on the workbench")


def component_page(bench: Workbench, text: str) -> ComponentPage:
    """A component's page (`tdb://component/{id}`, the viewer's component page): the id's
    parts, the hook site it reads, its weight statistics and the registered sections."""
    engine = bench.engine
    c = parse_component(text, engine.spec, sae_sizes=sae_ops.sae_sizes(engine))
    site = None
    if c.kind != "logits":
        s, unit = hook_site(c)
        site = s if unit is None else f"{s}[{unit}]"
    sections: dict[str, Any] = {}
    for name, fn in bench.page_sections.items():
        value = fn(c)
        if value is not None:
            sections[name] = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    return ComponentPage(id=c.id, kind=c.kind, layer=c.layer, index=c.index, position=c.position, hook_site=site,
                         weights=weight_stats(engine, c), related_tools=RELATED_TOOLS.get(c.kind, []),
                         sections=sections)
