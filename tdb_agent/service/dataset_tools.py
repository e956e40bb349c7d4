"""The tools over an activation dataset and explanations: `top_examples` and
`explain_component` (tagged "dataset": registered only where a dataset is loaded), and the
component-page sections they feed (top examples, explanation). The numbers come from
`tdb_agent.datasets` and `tdb_agent.explain`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from tdb_agent.datasets.store import ActivationDataset
from tdb_agent.components import parse_component
from tdb_agent.errors import TdbError, UnknownComponent
from tdb_agent.explain import Explainer, ExplainerLLM, Explanation
from tdb_agent.service.annotations import READ_ONLY
from tdb_agent.service.examples import TopExamplesResult, top_examples_of
from tdb_agent.service.running import WaitsUnlocked
from tdb_agent.service.tool import Job, Tool, ToolArgs

CACHE_DIR = Path(os.environ.get("TDB_CACHE_DIR", Path.home() / ".cache" / "tdb-agent"))
DATASET = frozenset({"dataset"})


def covered(ds: ActivationDataset, component: str) -> str:
    """The component, or a TdbError saying why the dataset cannot answer for it (a
    transcoder feature of a dataset built without transcoders: rebuild it with them loaded)."""
    try:
        ds.column(component)
    except UnknownComponent as e:
        if parse_component(component).kind == "transcoder":
            raise TdbError(f"{component}: this activation dataset was built without transcoders, so it has no top "
                           "examples or explanations for their features; rebuild it with `tdb-agent build-dataset` "
                           "with the transcoders loaded, or see the feature's role in a graph with graph_node") from e
        raise
    return component


def dataset(bench) -> ActivationDataset:
    d = getattr(bench, "dataset", None)
    if d is None:
        raise TdbError("no activation dataset is loaded for this model; build one with `tdb-agent build-dataset "
                       "--out DIR` and serve with it")
    return d


class Explainers:
    """A workbench's explainer: its LLM and cache folder, rebuilt when the dataset changes."""

    def __init__(self, llm: ExplainerLLM | None = None, cache_dir: str | Path | None = None):
        self.llm, self.cache_dir, self.current = llm, cache_dir, None

    def get(self, bench) -> Explainer:
        ds = dataset(bench)
        if self.current is None or self.current.dataset is not ds:
            self.current = Explainer(bench.engine, ds, llm=self.llm or ExplainerLLM.from_env(),
                                     cache_dir=self.cache_dir or CACHE_DIR)
        return self.current


def explainer(bench) -> Explainer:
    if getattr(bench, "explainers", None) is None:
        bench.explainers = Explainers()
    return bench.explainers.get(bench)


class TopExamplesArgs(ToolArgs):
    component: Annotated[str, Field(min_length=1, max_length=64, description="a neuron (L1.N7), head (L2.H3), "
                                    "SAE latent (L1.resid.F9) or transcoder feature (L1.tc.F4)")]
    k: Annotated[int, Field(ge=1, le=50, description="examples to return")] = 10
    random: Annotated[bool, Field(description="a random sample of the corpus instead of the top activating "
                                  "examples (what the component does on typical text)")] = False
    group: Annotated[Literal["top", "random", "quantile"] | None, Field(
        description="overrides `random`: quantile = examples drawn across the activation range")] = None


def top_examples(bench, args: TopExamplesArgs, job: Job) -> TopExamplesResult:
    """Where does this component fire? Dataset examples (text windows) with per-token
    activations, sorted by their maximum, plus the component's stats (mean, max,
    fraction active). Heads: activation = norm of the head's write; each example names
    the token it attended to most. Example: top_examples(component="L1.N7", k=5)"""
    return top_examples_of(dataset(bench), covered(dataset(bench), args.component), args.k,
                           args.group or ("random" if args.random else "top"))


class ExplainArgs(ToolArgs):
    component: Annotated[str, Field(min_length=1, max_length=64, description="a neuron, head, SAE latent or "
                                    "transcoder feature id")]
    method: Annotated[Literal["auto", "llm", "heuristic"], Field(
        description="heuristic: offline, from the top examples; llm: a language model writes and reads it (the "
                    "configured OpenAI-compatible endpoint, else your own model through MCP sampling); auto: llm "
                    "when one is available, else heuristic")] = "auto"
    refresh: Annotated[bool, Field(description="recompute instead of using the cache")] = False


def explain_component(bench, args: ExplainArgs, job: Job) -> Explanation:
    """What does this component do? A short explanation from its top dataset examples,
    with three scores, each with its number of examples and a 95% interval: detection
    (can a reader tell contexts where it fires from ones where it does not, hard
    negatives included; balanced accuracy, 0.5 = chance), fuzzing (are the tokens it
    fires on the ones the explanation points at; 0.5 = chance) and simulation (`score`:
    correlation of predicted with true activations; 0 = none). `writer` and `simulator`
    say which model wrote and which scored it; `note` says when the scores are at chance
    or a fallback was taken. Example: explain_component(component="L2.resid.F17")"""
    covered(dataset(bench), args.component)
    x = explainer(bench)
    model, no_model = None, None
    if args.method != "heuristic" and not x.llm_settings.configured:  # no endpoint: the caller's model, if any
        model = job.model
        if model is None:
            no_model = f"{job.no_model or 'no language model was offered'} and no explainer endpoint is configured " \
                       "(TDB_EXPLAINER_BASE_URL)"
            if args.method == "llm":
                raise TdbError(f"method 'llm' needs a language model, but {no_model}; use method 'heuristic'")
    elif args.method != "heuristic":
        model = x.llm  # the configured endpoint
    if model is not None:  # other calls use the engine while the model thinks
        model = WaitsUnlocked(model, bench.engine.lock)
    return x.explain(args.component, args.method, refresh=args.refresh, model=model, no_model=no_model)


TOOLS: list[Tool] = [
    Tool("top_examples", TopExamplesArgs, top_examples, READ_ONLY, tags=DATASET),
    Tool("explain_component", ExplainArgs, explain_component, READ_ONLY, tags=DATASET, samples=True),
]


# ------------------------------------------------------------------ component-page sections
def _page_examples(bench, c):
    d = getattr(bench, "dataset", None)
    if d is None or c.kind not in ("neuron", "head", "sae", "transcoder"):
        return None
    try:
        return top_examples_of(d, c.id.split("@")[0], 5)
    except TdbError:
        return None


def _page_explanation(bench, c):
    if getattr(bench, "dataset", None) is None or c.kind not in ("neuron", "head", "sae", "transcoder"):
        return None
    try:
        e = explainer(bench).explain(c.id.split("@")[0], "heuristic")
    except TdbError:
        return None
    return {"explanation": e.explanation, "score": e.score, "method": e.method}


def add_page_sections(bench) -> None:
    """Top examples and the (heuristic) explanation on every component page of `bench`."""
    if hasattr(bench, "add_page_section"):
        bench.add_page_section("top_examples", lambda c: _page_examples(bench, c))
        bench.add_page_section("explanation", lambda c: _page_explanation(bench, c))
