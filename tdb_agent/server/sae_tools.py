"""The dataset tools (`top_examples`, `explain_component`) and the component-page sections
they feed, on an MCP server: wiring only (the tools are `service.dataset_tools`)."""

from __future__ import annotations

from pathlib import Path

from mcp.server import MCPServer

from tdb_agent.errors import TdbError
from tdb_agent.explain import ExplainerLLM
from tdb_agent.server.tools import add_tools
from tdb_agent.service.catalog import DATASET_TOOLS
from tdb_agent.service.dataset_tools import Explainers, add_page_sections
from tdb_agent.service.examples import attach_dataset


def register_sae_tools(mcp: MCPServer, bench, *, dataset: str | Path | None = None,
                       llm: ExplainerLLM | None = None, cache_dir: str | Path | None = None,
                       sampling_timeout_s: float = 120.0) -> None:
    """Open `dataset` (default: the bundled one, if it fits the model) on `bench`, then add
    the dataset tools and page sections; the explainer uses `llm` and `cache_dir`, else the
    client's model through sampling (each request waits at most `sampling_timeout_s`)."""
    if getattr(bench, "dataset", None) is None:
        try:
            attach_dataset(bench, dataset)
        except TdbError:
            if dataset is not None:
                raise
            bench.dataset = None
    bench.explainers = Explainers(llm, cache_dir)
    bench.sampling_timeout_s = sampling_timeout_s
    add_tools(mcp, bench, DATASET_TOOLS)
    add_page_sections(bench)
