"""MCP tools for circuit hypotheses: wiring only, the work is in `tdb_agent.circuits`.

Circuits are named, kept on the workbench (`bench.circuits`) and saved as node-link JSON in
`bench.workspace/circuits/` after every change; exports go to `bench.workspace/exports/`.
Validation and pruning run in a worker thread, report progress and stop when cancelled.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from pydantic import BaseModel, Field, ValidationError

from tdb_agent import circuits as C
from tdb_agent.circuits.evaluate import AblationMode
from tdb_agent.circuits.store import CircuitStore, check_name
from tdb_agent.errors import TdbError
from tdb_agent.ops.metrics import make_metric
from tdb_agent.service.annotations import DESTRUCTIVE, EDITS, READ_ONLY, WRITES_RESULT
from tdb_agent.service.running import run_long_tool, run_tool
from tdb_agent.workbench import Workbench

T = TypeVar("T")


Name = Annotated[str, Field(description="the circuit's name (letters, digits, _ . -)", min_length=1, max_length=64)]
Mode = Annotated[AblationMode, Field(
    description="how components outside the circuit are ablated: mean (over a reference corpus) or resample "
                "(their activation on each pair's corrupted prompt)")]
Format = Literal["json", "graphml", "dot", "circuit_tracer", "svg", "html"]
EXT = {"json": "json", "graphml": "graphml", "dot": "dot", "circuit_tracer": "circuit_tracer.json", "svg": "svg",
       "html": "html"}


class NodeIn(BaseModel):
    id: str = Field(description="component id, e.g. L3.H0, L2.MLP, L1.N17, EMB, with optional @t", min_length=1,
                    max_length=64)
    role: str | None = Field(None, max_length=200, description="short label, e.g. 'name mover'")
    explanation: str | None = Field(None, max_length=4000)
    effect: float | None = Field(None, description="the measured effect behind the node")
    evidence: list[C.Evidence] = Field(default_factory=list, max_length=50)


class EdgeIn(BaseModel):
    source: str = Field(min_length=1, max_length=64)
    target: str = Field(min_length=1, max_length=64, description="a later component, or LOGITS")
    weight: float | None = None
    via: C.Via = Field("direct", description="q / k / v: into a head's query, key or value input; direct otherwise")
    evidence: list[C.Evidence] = Field(default_factory=list, max_length=50)


class EdgeRef(BaseModel):
    source: str = Field(min_length=1, max_length=64)
    target: str = Field(min_length=1, max_length=64)


class SavedCircuit(C.CircuitInfo):
    saved_to: str = Field(description="the node-link JSON file in the server's workspace")


class CircuitList(BaseModel):
    circuits: list[dict[str, Any]] = Field(description="name, nodes, edges, faithfulness of each circuit")


class ValidationOut(C.Validation):
    name: str
    saved_to: str


class PruneOut(C.PruneResult):
    name: str
    saved_as: str = Field(description="the name the pruned circuit was stored under")
    saved_to: str


class ExportOut(BaseModel):
    name: str
    format: Format
    path: str = Field(description="where the file was written in the server's workspace")
    chars: int
    content: str | None = Field(None, description="the file's text (omitted when include_content is false)")


def _readable(fn: Callable[[], T]) -> T:
    """pydantic validation errors (e.g. of a behaviour's pairs) as a user error with a short message."""
    try:
        return fn()
    except ValidationError as e:
        raise TdbError("; ".join(f"{'.'.join(map(str, x['loc'])) or 'value'}: {x['msg']}" for x in e.errors())) from e


def register_circuit_tools(mcp: MCPServer, bench: Workbench) -> None:
    def _run(fn: Callable[[], T], what: str = "circuit tool") -> T:
        return run_tool(bench, what, lambda: _readable(fn))

    async def _run_long(ctx: Context | None, fn: Callable[..., T], what: str) -> T:
        return await run_long_tool(bench, ctx, what, lambda progress, stop: _readable(lambda: fn(progress, stop)))

    engine = bench.engine
    store = CircuitStore(bench.circuits, bench.workspace, bench.limits)
    store.load_saved()

    def saved(name: str) -> SavedCircuit:
        return SavedCircuit(**C.info(store.get(name)).model_dump(), saved_to=str(store.path(name)))

    def check_pairs(b: C.Behaviour, metric: str | None) -> None:
        for i, p in enumerate(b.resolve()):
            for text in (p.prompt, p.corrupted_prompt):
                if text and engine.to_tokens(text).shape[1] > bench.limits.max_prompt_tokens:
                    raise TdbError(f"pair {i}: a prompt exceeds max_prompt_tokens={bench.limits.max_prompt_tokens}")
            try:
                make_metric(engine, p.target, p.distractor, metric)
            except TdbError as e:
                raise TdbError(f"pair {i}: {e}") from e

    @mcp.tool(annotations=EDITS)
    def circuit_create(
        name: Name,
        task: Annotated[str | None, Field(description="a built-in task (see list_tasks) whose prompt pairs define "
                                          "the behaviour")] = None,
        n_pairs: Annotated[int, Field(ge=1, le=64, description="how many pairs of the task to use")] = 16,
        seed: Annotated[int, Field(ge=0, description="which pairs of the task")] = 0,
        pairs: Annotated[list[C.PromptPair] | None, Field(
            description="explicit prompt pairs instead of a task", max_length=64)] = None,
        metric: Annotated[Literal["logit_diff", "logprob"] | None, Field(
            description="default: logit_diff when every pair has a distractor, else logprob")] = None,
        description: Annotated[str | None, Field(max_length=4000)] = None,
        overwrite: Annotated[bool, Field(description="replace an existing circuit of that name")] = False,
    ) -> SavedCircuit:
        """Start a circuit hypothesis for a behaviour (a task or your prompt pairs): an empty graph
        with the LOGITS sink, saved in the workspace. Then add nodes and edges with evidence,
        validate and prune. Example: circuit_create(name="ioi", task="ioi", n_pairs=16)"""
        def go():
            b = C.Behaviour(task=task, n=n_pairs, seed=seed, pairs=pairs or [])
            check_pairs(b, metric)
            g = C.new_circuit(name, behaviour=b, metric=metric, model=engine.name, description=description)
            store.put(name, g, overwrite=overwrite)
            return saved(name)
        return _run(go)

    @mcp.tool(annotations=EDITS)
    def circuit_add(
        name: Name,
        nodes: Annotated[list[NodeIn], Field(max_length=256, description="components to add (or update: given "
                                             "fields replace, evidence is appended)")] = [],  # noqa: B006
        edges: Annotated[list[EdgeIn], Field(max_length=512, description="edges source -> target to add (missing "
                                             "endpoints are added as nodes)")] = [],  # noqa: B006
    ) -> SavedCircuit:
        """Add nodes and edges, each with the evidence (tool, args, value) that supports it. All or
        nothing: one bad id leaves the circuit unchanged. Example: circuit_add(name="ioi",
        nodes=[{"id": "L3.H0", "role": "name mover", "effect": 1.3, "evidence": [{"tool": "attribute",
        "args": {"prompt": "..."}, "value": 1.3}]}], edges=[{"source": "L3.H0", "target": "LOGITS",
        "weight": 1.3}])"""
        def go():
            if not nodes and not edges:
                raise TdbError("give nodes and/or edges to add")
            with store.edit(name) as g:
                for n in nodes:
                    C.add_node(g, n.id, role=n.role, explanation=n.explanation, effect=n.effect,
                               evidence=n.evidence, engine=engine)
                for e in edges:
                    C.add_edge(g, e.source, e.target, weight=e.weight, via=e.via, evidence=e.evidence, engine=engine)
            return saved(name)
        return _run(go)

    @mcp.tool(annotations=DESTRUCTIVE)
    def circuit_remove(
        name: Name,
        nodes: Annotated[list[str], Field(max_length=256,
                                          description="node ids to remove with their edges")] = [],  # noqa: B006
        edges: Annotated[list[EdgeRef], Field(max_length=512)] = [],  # noqa: B006
    ) -> SavedCircuit:
        """Remove nodes (with their edges) or edges from a circuit, e.g. a hypothesis the evidence
        did not support. Example: circuit_remove(name="ioi", nodes=["L1.H3"])"""
        def go():
            if not nodes and not edges:
                raise TdbError("give nodes and/or edges to remove")
            with store.edit(name) as g:
                for e in edges:
                    C.remove_edge(g, e.source, e.target)
                for n in nodes:
                    C.remove_node(g, n)
            return saved(name)
        return _run(go)

    @mcp.tool(annotations=READ_ONLY)
    def circuit_show(name: Name) -> SavedCircuit:
        """A circuit with every node and edge, their evidence, and the latest validation
        (faithfulness at the top level). Example: circuit_show(name="ioi")"""
        return _run(lambda: saved(name))

    @mcp.tool(annotations=READ_ONLY)
    def circuit_list() -> CircuitList:
        """The circuits of this session (and of the workspace) with their sizes and faithfulness.
        Example: circuit_list()"""
        def go():
            rows = []
            for n in store.names():
                g = store.get(n)
                rows.append({"name": n, "nodes": g.number_of_nodes(), "edges": g.number_of_edges(),
                             "faithfulness": g.graph.get("faithfulness")})
            return CircuitList(circuits=rows)
        return _run(go)

    @mcp.tool(annotations=WRITES_RESULT)
    async def circuit_validate(
        name: Name,
        mode: Mode = "mean",
        necessity: Annotated[bool, Field(description="also measure each node's necessity (faithfulness drop "
                                         "without it)")] = True,
        heldout_seed: Annotated[int | None, Field(ge=0, description="for a task behaviour: validate on other "
                                                  "pairs of the task (this seed) instead; not recorded")] = None,
        ctx: Context | None = None,
    ) -> ValidationOut:
        """Is the hypothesis enough? Runs the behaviour's pairs with every head and MLP block
        outside the circuit ablated: faithfulness = (m(C) − m(∅)) / (m(full) − m(∅)) (1 = the
        circuit alone recovers the metric), and per node the faithfulness lost without it. The
        result is stored as the circuit's latest validation (unless heldout_seed picks other
        pairs). Example: circuit_validate(name="ioi", mode="resample")"""
        def work(progress, should_stop):
            g = store.get(name)
            pairs = None
            if heldout_seed is not None:
                b = C.behaviour(g)
                if b is None or b.task is None:
                    raise TdbError("heldout_seed needs a circuit whose behaviour is a task")
                pairs = b.model_copy(update={"seed": heldout_seed})
            with store.lock:
                v = C.validate(engine, g, pairs=pairs, mode=mode, necessity=necessity, record=False,
                               cache=bench.cache, batch_size=bench.limits.batch_size, progress=progress,
                               should_stop=should_stop)
                if pairs is None:
                    with store.edit(name) as h:
                        C.record_validation(h, v)
            return ValidationOut(**v.model_dump(), name=name, saved_to=str(store.path(name)))
        return await _run_long(ctx, work, "validation")

    @mcp.tool(annotations=WRITES_RESULT)
    async def circuit_prune(
        name: Name,
        threshold: Annotated[float, Field(gt=0, le=1.5, description="the faithfulness to keep")] = 0.8,
        mode: Mode = "mean",
        protect: Annotated[list[str], Field(max_length=256, description="nodes never removed")] = [],  # noqa: B006
        into: Annotated[str | None, Field(description="name for the pruned circuit (default: '<name>-pruned'; "
                                          "the same name replaces the circuit)", max_length=64)] = None,
        modes: Annotated[list[AblationMode] | None, Field(
            min_length=1, max_length=2, description="several ablation modes at once, e.g. ['mean', 'resample']: "
            "a subset is kept only if it stays >= threshold under every one (the minimum over the modes); the "
            "first is the primary mode the pruned circuit is validated under. Replaces `mode` when given")] = None,
        ctx: Context | None = None,
    ) -> PruneOut:
        """Find a small sub-circuit that keeps faithfulness >= threshold, by greedy backward
        elimination (drop the least needed node while faithfulness stays above the threshold),
        validate it and store it under `into`. With `modes=["mean", "resample"]` the threshold
        must hold under both ablations (faithfulness = their minimum; `faithfulness_by_mode`
        gives each), so the circuit does not hold under one ablation only.
        Example: circuit_prune(name="ioi", threshold=0.8, modes=["mean", "resample"])"""
        def work(progress, should_stop):
            target = into or f"{name}-pruned"
            check_name(target)
            g = store.get(name)
            with store.lock:
                r = C.prune(engine, g, threshold=threshold, mode=mode, modes=modes, protect=protect,
                            cache=bench.cache, batch_size=bench.limits.batch_size, should_stop=should_stop,
                            max_rows=bench.limits.max_prune_rows, progress=progress)
                h = C.pruned_circuit(g, r, name=target)
                C.validate(engine, h, mode=r.mode, cache=bench.cache, batch_size=bench.limits.batch_size,
                           should_stop=should_stop)
                path = store.put(target, h)
            return PruneOut(**r.model_dump(), name=name, saved_as=target, saved_to=str(path))
        return await _run_long(ctx, work, "pruning")

    @mcp.tool(annotations=WRITES_RESULT)
    def circuit_export(
        name: Name,
        format: Annotated[Format, Field(description="json (networkx node-link), graphml, dot (Graphviz), "
                                        "circuit_tracer (Neuronpedia graph JSON), svg or html (pictures)")] = "json",
        include_content: Annotated[bool, Field(description="return the file's text too")] = True,
    ) -> ExportOut:
        """Write a circuit to a file in the workspace (and return its text): node-link JSON,
        GraphML, Graphviz DOT, circuit-tracer / Neuronpedia graph JSON, or a self-contained SVG
        or HTML picture. Example: circuit_export(name="ioi", format="html")"""
        def go():
            g = store.get(name)
            text = export_text(g, format)
            path = bench.workspace / "exports" / f"{name}.{EXT[format]}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return ExportOut(name=name, format=format, path=str(path), chars=len(text),
                             content=text if include_content else None)
        return _run(go)

    def export_text(g, format: Format) -> str:
        if format == "json":
            return json.dumps(C.to_json(g), indent=1)
        if format == "graphml":
            return C.to_graphml(g)
        if format == "dot":
            return C.to_dot(g)
        if format == "svg":
            return C.to_svg(g)
        if format == "html":
            return C.to_html(g)
        pairs = C.behaviour(g).resolve() if C.behaviour(g) else []
        prompt = pairs[0].prompt if pairs else None
        tokens = engine.str_tokens(engine.to_tokens(prompt)) if prompt else None
        return json.dumps(C.to_circuit_tracer(g, prompt_tokens=tokens, prompt=prompt,
                                              n_layers=engine.spec.n_layers), indent=1)
