"""MCP tools over activation datasets and explanations: `top_examples` and
`explain_component` (docs/DESIGN.md §5), plus component-page sections (examples, stats,
explanation). Wiring only: the numbers come from tdb_agent.datasets and tdb_agent.explain."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Literal

import anyio
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from tdb_agent.datasets.store import ActivationDataset
from tdb_agent.errors import TdbError
from tdb_agent.explain import Explainer, ExplainerLLM, Explanation
from tdb_agent.service.annotations import READ_ONLY
from tdb_agent.service.examples import (
    TopExamplesResult,
    attach_dataset,
    top_examples_of,
)
from tdb_agent.server.sampling import SamplingModel, sampling_unavailable
from tdb_agent.service.running import run_tool

log = logging.getLogger(__name__)

CACHE_DIR = Path(os.environ.get("TDB_CACHE_DIR", Path.home() / ".cache" / "tdb-agent"))


def register_sae_tools(mcp: MCPServer, bench, *, dataset: str | Path | None = None,
                       llm: ExplainerLLM | None = None, cache_dir: str | Path | None = None,
                       sampling_timeout_s: float = 120.0) -> None:
    if getattr(bench, "dataset", None) is None:
        try:
            attach_dataset(bench, dataset)
        except TdbError:
            if dataset is not None:
                raise
            bench.dataset = None
    state: dict = {}

    def ds() -> ActivationDataset:
        d = getattr(bench, "dataset", None)
        if d is None:
            raise TdbError("no activation dataset is loaded for this model; build one with `tdb-agent build-dataset "
                           "--out DIR` and serve with it")
        return d

    def explainer() -> Explainer:
        if "x" not in state or state["x"].dataset is not ds():
            state["x"] = Explainer(bench.engine, ds(), llm=llm or ExplainerLLM.from_env(),
                                   cache_dir=cache_dir or CACHE_DIR)
        return state["x"]

    def run(fn):
        if hasattr(bench, "cache"):  # a full Workbench: the server's lock and error handling
            return run_tool(bench, "dataset tool", fn)
        try:
            return fn()
        except TdbError as e:
            raise ToolError(str(e)) from e

    @mcp.tool(annotations=READ_ONLY)
    def top_examples(
        component: Annotated[str, Field(description="a neuron (L1.N7), head (L2.H3) or SAE latent (L1.resid.F9)",
                                        min_length=1, max_length=64)],
        k: Annotated[int, Field(ge=1, le=50, description="examples to return")] = 10,
        random: Annotated[bool, Field(description="a random sample of the corpus instead of the top "
                                      "activating examples (what the component does on typical text)")] = False,
        group: Annotated[Literal["top", "random", "quantile"] | None, Field(
            description="overrides `random`: quantile = examples drawn across the activation range")] = None,
    ) -> TopExamplesResult:
        """Where does this component fire? Dataset examples (text windows) with per-token
        activations, sorted by their maximum, plus the component's stats (mean, max,
        fraction active). Heads: activation = norm of the head's write; each example names
        the token it attended to most. Example: top_examples(component="L1.N7", k=5)"""
        return run(lambda: top_examples_of(ds(), component, k, group or ("random" if random else "top")))

    @mcp.tool(annotations=READ_ONLY)
    async def explain_component(
        component: Annotated[str, Field(description="a neuron, head or SAE latent id", min_length=1,
                                        max_length=64)],
        method: Annotated[Literal["auto", "llm", "heuristic"], Field(
            description="heuristic: offline, from the top examples; llm: a language model writes and reads it "
                        "(the configured OpenAI-compatible endpoint, else your own model through MCP sampling); "
                        "auto: llm when one is available, else heuristic")] = "auto",
        refresh: Annotated[bool, Field(description="recompute instead of using the cache")] = False,
        ctx: Context | None = None,
    ) -> Explanation:
        """What does this component do? A short explanation from its top dataset examples,
        with three scores, each with its number of examples and a 95% interval: detection
        (can a reader tell contexts where it fires from ones where it does not, hard
        negatives included; balanced accuracy, 0.5 = chance), fuzzing (are the tokens it
        fires on the ones the explanation points at; 0.5 = chance) and simulation
        (`score`: correlation of predicted with true activations; 0 = none). `writer` and
        `simulator` say which model wrote and which scored it; `note` says when the scores
        are at chance or a fallback was taken. Example: explain_component(component="L2.resid.F17")"""
        model, no_model = None, None
        x_llm = llm or ExplainerLLM.from_env()
        if method != "heuristic" and not x_llm.configured:  # no endpoint: the client's own model, if offered
            no_model = sampling_unavailable(ctx)
            if no_model is None:
                model = SamplingModel(ctx, timeout_s=sampling_timeout_s)
            else:
                no_model += " and no explainer endpoint is configured (TDB_EXPLAINER_BASE_URL)"

        def work() -> Explanation:
            if method == "llm" and no_model:
                raise TdbError(f"method 'llm' needs a language model, but {no_model}; use method 'heuristic'")
            return explainer().explain(component, method, refresh=refresh, model=model, no_model=no_model)

        return await anyio.to_thread.run_sync(lambda: run(work))

    if hasattr(bench, "add_page_section"):
        def page_examples(c):
            d = getattr(bench, "dataset", None)
            if d is None or c.kind not in ("neuron", "head", "sae"):
                return None
            try:
                return top_examples_of(d, c.id.split("@")[0], 5)
            except TdbError:
                return None

        def page_explanation(c):
            d = getattr(bench, "dataset", None)
            if d is None or c.kind not in ("neuron", "head", "sae"):
                return None
            try:
                e = explainer().explain(c.id.split("@")[0], "heuristic")
            except TdbError:
                return None
            return {"explanation": e.explanation, "score": e.score, "method": e.method}

        bench.add_page_section("top_examples", page_examples)
        bench.add_page_section("explanation", page_explanation)
