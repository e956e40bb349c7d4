"""A workbench's activation dataset (the bundled one by default) and the dataset examples
of a component, as `top_examples` and the viewer's component page show them: sorted by
their largest activation, with the component's statistics."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from tdb_agent.components import parse_component
from tdb_agent.datasets.store import (
    BUNDLED_DATASET,
    ActivationDataset,
    ComponentStats,
    DatasetMismatch,
    Example,
)

log = logging.getLogger(__name__)


class TopExamplesResult(BaseModel):
    component: str
    group: Literal["top", "random", "quantile"]
    examples: list[Example] = Field(description="sorted by their maximum activation, largest first")
    stats: ComponentStats
    dataset: str


def top_examples_of(ds: ActivationDataset, component: str, k: int = 10, group: str = "top") -> TopExamplesResult:
    ex = ds.examples(component, group, k=None)
    ex.sort(key=lambda e: -max(e.activations, default=0.0))
    return TopExamplesResult(component=parse_component(component).model_copy(update={"position": None}).id,
                             group=group, examples=ex[:k], stats=ds.stats(component), dataset=ds.info())


def attach_dataset(bench, path: str | Path | None = None) -> ActivationDataset | None:
    """Open `path` (or, for the bundled model, its shipped dataset) as `bench.dataset`.
    A dataset built from another model or other SAEs is refused with a clear error (for an
    explicit path) or skipped with a warning (the bundled default)."""
    engine = bench.engine
    if path is None:
        if engine.name != "tdb-tiny" or not (BUNDLED_DATASET / "manifest.json").exists():
            return None
        try:
            ds = ActivationDataset.open(BUNDLED_DATASET, engine)
        except DatasetMismatch as e:
            log.warning("bundled dataset not used: %s", e)
            return None
    else:
        ds = ActivationDataset.open(path, engine)
    bench.dataset = ds
    return ds
