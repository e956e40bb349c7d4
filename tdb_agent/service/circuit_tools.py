"""The circuit tools: hypotheses as named graphs, the work is in `tdb_agent.circuits`.

Circuits are kept on the workbench (`bench.circuits`) and saved as node-link JSON in
`bench.workspace/circuits/` after every change (`circuit_store`); exports go to
`bench.workspace/exports/circuits/<name>/` (`service.exports`). Results give paths relative
to the workspace. Validation and pruning are long tools: they report progress and stop when
cancelled.
"""

from __future__ import annotations

import weakref
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from tdb_agent import circuits as C
from tdb_agent import jsonsafe
from tdb_agent.circuits.evaluate import AblationMode
from tdb_agent.circuits.store import CircuitStore, check_name
from tdb_agent.errors import TdbError
from tdb_agent.ops.metrics import make_metric
from tdb_agent.service.annotations import DESTRUCTIVE, EDITS, READ_ONLY, WRITES_RESULT
from tdb_agent.service.exports import in_workspace, write_export
from tdb_agent.service.limits import LimitChecks
from tdb_agent.service.tool import InputModel, Job, NoArgs, Tool, ToolArgs
from tdb_agent.workbench import Workbench

Name = Annotated[str, Field(description="the circuit's name (letters, digits, _ . -)", min_length=1, max_length=64)]
Mode = Annotated[AblationMode, Field(
    description="how components outside the circuit are ablated: mean (over a reference corpus) or resample "
                "(their activation on each pair's corrupted prompt)")]
Format = Literal["json", "graphml", "dot", "circuit_tracer", "svg", "html"]
EXT = {"json": "json", "graphml": "graphml", "dot": "dot", "circuit_tracer": "circuit_tracer.json", "svg": "svg",
       "html": "html"}

_stores: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def circuit_store(bench: Workbench) -> CircuitStore:
    """The store over `bench.circuits` (one per workbench, so every front end shares its lock)."""
    store = _stores.get(bench)
    if store is None or store.circuits is not bench.circuits:
        store = _stores[bench] = CircuitStore(bench.circuits, bench.workspace, bench.limits)
    return store


# ------------------------------------------------------------------ inputs and results
class NodeIn(InputModel):
    id: str = Field(description="component id, e.g. L3.H0, L2.MLP, L1.N17, EMB, with optional @t", min_length=1,
                    max_length=64)
    role: str | None = Field(None, max_length=200, description="short label, e.g. 'name mover'")
    explanation: str | None = Field(None, max_length=4000)
    effect: float | None = Field(None, description="the measured effect behind the node")
    evidence: list[C.Evidence] = Field(default_factory=list, max_length=50)


class EdgeIn(InputModel):
    source: str = Field(min_length=1, max_length=64)
    target: str = Field(min_length=1, max_length=64, description="a later component, or LOGITS")
    weight: float | None = None
    via: C.Via = Field("direct", description="q / k / v: into a head's query, key or value input; direct otherwise")
    evidence: list[C.Evidence] = Field(default_factory=list, max_length=50)


class EdgeRef(InputModel):
    source: str = Field(min_length=1, max_length=64)
    target: str = Field(min_length=1, max_length=64)


class SavedCircuit(C.CircuitInfo):
    saved_to: str = Field(description="the node-link JSON file, relative to the server's workspace")


class Unreadable(BaseModel):
    file: str = Field(description="the file in the workspace's circuits folder")
    why: str


class CircuitList(BaseModel):
    circuits: list[dict[str, Any]] = Field(description="name, nodes, edges, faithfulness of each circuit")
    unreadable: list[Unreadable] = Field([], description="circuit files that could not be read, and why (fix "
                                         "or remove them, or replace one with circuit_create(overwrite=true))")


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
    path: str = Field(description="where the file was written, relative to the server's workspace")
    chars: int
    content: str | None = Field(None, description="the file's text (omitted when include_content is false)")


def saved(bench: Workbench, name: str) -> SavedCircuit:
    store = circuit_store(bench)
    return SavedCircuit(**C.info(store.get(name)).model_dump(), saved_to=in_workspace(bench, store.path(name)))


def check_pairs(bench: Workbench, b: C.Behaviour, metric: str | None) -> None:
    """Every pair within the prompt limit, and its target/distractor single tokens."""
    checks = LimitChecks(bench)
    for i, p in enumerate(b.resolve()):
        checks.text(p.prompt, p.corrupted_prompt, field=f"pair {i}'s prompt")
        try:
            make_metric(bench.engine, p.target, p.distractor, metric)
        except TdbError as e:
            raise TdbError(f"pair {i}: {e}") from e


# ------------------------------------------------------------------ tools
class CreateArgs(ToolArgs):
    name: Name
    task: Annotated[str | None, Field(description="a built-in task (see list_tasks) whose prompt pairs define "
                                      "the behaviour")] = None
    n_pairs: Annotated[int, Field(ge=1, le=64, description="how many pairs of the task to use")] = 16
    seed: Annotated[int, Field(ge=0, description="which pairs of the task")] = 0
    pairs: Annotated[list[C.PromptPair] | None, Field(description="explicit prompt pairs instead of a task",
                                                      max_length=64)] = None
    metric: Annotated[Literal["logit_diff", "logprob"] | None, Field(
        description="default: logit_diff when every pair has a distractor, else logprob")] = None
    description: Annotated[str | None, Field(max_length=4000)] = None
    overwrite: Annotated[bool, Field(description="replace an existing circuit of that name")] = False


def circuit_create(bench: Workbench, args: CreateArgs, job: Job) -> SavedCircuit:
    """Start a circuit hypothesis for a behaviour (a task or your prompt pairs): an empty graph
    with the LOGITS sink, saved in the workspace. Then add nodes and edges with evidence,
    validate and prune. Example: circuit_create(name="ioi", task="ioi", n_pairs=16)"""
    b = C.Behaviour(task=args.task, n=args.n_pairs, seed=args.seed, pairs=args.pairs or [])
    check_pairs(bench, b, args.metric)
    g = C.new_circuit(args.name, behaviour=b, metric=args.metric, model=bench.engine.name,
                      description=args.description)
    circuit_store(bench).put(args.name, g, overwrite=args.overwrite)
    return saved(bench, args.name)


class AddArgs(ToolArgs):
    name: Name
    nodes: Annotated[list[NodeIn], Field(max_length=256, description="components to add (or update: given "
                                         "fields replace, evidence is appended)")] = []  # noqa: RUF012
    edges: Annotated[list[EdgeIn], Field(max_length=512, description="edges source -> target to add (missing "
                                         "endpoints are added as nodes)")] = []  # noqa: RUF012


def circuit_add(bench: Workbench, args: AddArgs, job: Job) -> SavedCircuit:
    """Add nodes and edges, each with the evidence (tool, args, value) that supports it. All or
    nothing: one bad id leaves the circuit unchanged. Example: circuit_add(name="ioi",
    nodes=[{"id": "L3.H0", "role": "name mover", "effect": 1.3, "evidence": [{"tool": "attribute",
    "args": {"prompt": "..."}, "value": 1.3}]}], edges=[{"source": "L3.H0", "target": "LOGITS",
    "weight": 1.3}])"""
    if not args.nodes and not args.edges:
        raise TdbError("give nodes and/or edges to add")
    engine = bench.engine
    with circuit_store(bench).edit(args.name) as g:
        for n in args.nodes:
            C.add_node(g, n.id, role=n.role, explanation=n.explanation, effect=n.effect, evidence=n.evidence,
                       engine=engine)
        for e in args.edges:
            C.add_edge(g, e.source, e.target, weight=e.weight, via=e.via, evidence=e.evidence, engine=engine)
    return saved(bench, args.name)


class RemoveArgs(ToolArgs):
    name: Name
    nodes: Annotated[list[str], Field(max_length=256, description="node ids to remove with their "
                                      "edges")] = []  # noqa: RUF012
    edges: Annotated[list[EdgeRef], Field(max_length=512)] = []  # noqa: RUF012


def circuit_remove(bench: Workbench, args: RemoveArgs, job: Job) -> SavedCircuit:
    """Remove nodes (with their edges) or edges from a circuit, e.g. a hypothesis the evidence
    did not support. Example: circuit_remove(name="ioi", nodes=["L1.H3"])"""
    if not args.nodes and not args.edges:
        raise TdbError("give nodes and/or edges to remove")
    with circuit_store(bench).edit(args.name) as g:
        for e in args.edges:
            C.remove_edge(g, e.source, e.target)
        for n in args.nodes:
            C.remove_node(g, n)
    return saved(bench, args.name)


class NameArgs(ToolArgs):
    name: Name


def circuit_show(bench: Workbench, args: NameArgs, job: Job) -> SavedCircuit:
    """A circuit with every node and edge, their evidence, and the latest validation
    (faithfulness at the top level). Example: circuit_show(name="ioi")"""
    return saved(bench, args.name)


def circuit_list(bench: Workbench, args: NoArgs, job: Job) -> CircuitList:
    """The circuits of this session (and of the workspace) with their sizes and faithfulness.
    Example: circuit_list()"""
    store = circuit_store(bench)
    rows = []
    for n in store.names():
        g = store.get(n)
        rows.append({"name": n, "nodes": g.number_of_nodes(), "edges": g.number_of_edges(),
                     "faithfulness": g.graph.get("faithfulness")})
    unreadable = [Unreadable(file=f, why=why) for f, why in sorted(store.unreadable.items())]
    return CircuitList(circuits=rows, unreadable=unreadable)


class ValidateArgs(ToolArgs):
    name: Name
    mode: Mode = "mean"
    necessity: Annotated[bool, Field(description="also measure each node's necessity (faithfulness drop "
                                     "without it)")] = True
    heldout_seed: Annotated[int | None, Field(ge=0, description="for a task behaviour: validate on other "
                                              "pairs of the task (this seed) instead; not recorded")] = None


def circuit_validate(bench: Workbench, args: ValidateArgs, job: Job) -> ValidationOut:
    """Is the hypothesis enough? Runs the behaviour's pairs with every head and MLP block
    outside the circuit ablated (a circuit of transcoder features, e.g. from
    graph_to_circuit: every feature and MLP error term outside it, attention live):
    faithfulness = (m(C) − m(∅)) / (m(full) − m(∅)) (1 = the
    circuit alone recovers the metric), and per node the faithfulness lost without it. The
    result is stored as the circuit's latest validation (unless heldout_seed picks other
    pairs). Example: circuit_validate(name="ioi", mode="resample")"""
    store = circuit_store(bench)
    g = store.get(args.name)
    pairs = None
    if args.heldout_seed is not None:
        b = C.behaviour(g)
        if b is None or b.task is None:
            raise TdbError("heldout_seed needs a circuit whose behaviour is a task")
        pairs = b.model_copy(update={"seed": args.heldout_seed})
    with store.lock:
        v = C.validate(bench.engine, g, pairs=pairs, mode=args.mode, necessity=args.necessity, record=False,
                       cache=bench.cache, batch_size=bench.limits.batch_size, progress=job.progress,
                       should_stop=job.should_stop)
        if pairs is None:
            with store.edit(args.name) as h:
                C.record_validation(h, v)
    return ValidationOut(**v.model_dump(), name=args.name, saved_to=in_workspace(bench, store.path(args.name)))


class PruneArgs(ToolArgs):
    name: Name
    threshold: Annotated[float, Field(gt=0, le=1.5, description="the faithfulness to keep")] = 0.8
    mode: Mode = "mean"
    protect: Annotated[list[str], Field(max_length=256, description="nodes never removed")] = []  # noqa: RUF012
    into: Annotated[str | None, Field(description="name for the pruned circuit (default: '<name>-pruned'; the "
                                      "same name replaces the circuit)", max_length=64)] = None
    modes: Annotated[list[AblationMode] | None, Field(
        min_length=1, max_length=2, description="several ablation modes at once, e.g. ['mean', 'resample']: a "
        "subset is kept only if it stays >= threshold under every one (the minimum over the modes); the first is "
        "the primary mode the pruned circuit is validated under. Replaces `mode` when given")] = None


def circuit_prune(bench: Workbench, args: PruneArgs, job: Job) -> PruneOut:
    """Find a small sub-circuit that keeps faithfulness >= threshold, by greedy backward
    elimination (drop the least needed node while faithfulness stays above the threshold),
    validate it and store it under `into`. With `modes=["mean", "resample"]` the threshold
    must hold under both ablations (faithfulness = their minimum; `faithfulness_by_mode`
    gives each), so the circuit does not hold under one ablation only.
    Example: circuit_prune(name="ioi", threshold=0.8, modes=["mean", "resample"])"""
    store = circuit_store(bench)
    target = args.into or f"{args.name}-pruned"
    check_name(target)
    g = store.get(args.name)
    engine, batch = bench.engine, bench.limits.batch_size
    with store.lock:
        r = C.prune(engine, g, threshold=args.threshold, mode=args.mode, modes=args.modes, protect=args.protect,
                    cache=bench.cache, batch_size=batch, should_stop=job.should_stop,
                    max_rows=bench.limits.max_prune_rows, progress=job.progress)
        h = C.pruned_circuit(g, r, name=target)
        C.validate(engine, h, mode=r.mode, cache=bench.cache, batch_size=batch, should_stop=job.should_stop)
        path = store.put(target, h)
    return PruneOut(**r.model_dump(), name=args.name, saved_as=target, saved_to=in_workspace(bench, path))


class ExportArgs(ToolArgs):
    name: Name
    format: Annotated[Format, Field(description="json (networkx node-link), graphml, dot (Graphviz), "
                                    "circuit_tracer (Neuronpedia graph JSON), svg or html (pictures)")] = "json"
    include_content: Annotated[bool, Field(description="return the file's text too")] = True


def export_text(bench: Workbench, g, format: Format) -> str:
    """A circuit in one of the export formats."""
    writers = {"json": lambda: jsonsafe.dumps(C.to_json(g), indent=1), "graphml": lambda: C.to_graphml(g),
               "dot": lambda: C.to_dot(g), "svg": lambda: C.to_svg(g), "html": lambda: C.to_html(g)}
    if format in writers:
        return writers[format]()
    engine = bench.engine
    pairs = C.behaviour(g).resolve() if C.behaviour(g) else []
    prompt = pairs[0].prompt if pairs else None
    tokens = engine.str_tokens(engine.to_tokens(prompt)) if prompt else None
    return jsonsafe.dumps(C.to_circuit_tracer(g, prompt_tokens=tokens, prompt=prompt,
                                              n_layers=engine.spec.n_layers), indent=1)


def circuit_export(bench: Workbench, args: ExportArgs, job: Job) -> ExportOut:
    """Write a circuit to a file in the workspace (and return its text): node-link JSON,
    GraphML, Graphviz DOT, circuit-tracer / Neuronpedia graph JSON, or a self-contained SVG
    or HTML picture. Example: circuit_export(name="ioi", format="html")"""
    g = circuit_store(bench).get(check_name(args.name))
    text = export_text(bench, g, args.format)
    path = write_export(bench, "circuits", args.name, f"{args.name}.{EXT[args.format]}", text)
    return ExportOut(name=args.name, format=args.format, path=path, chars=len(text),
                     content=text if args.include_content else None)


TOOLS: list[Tool] = [
    Tool("circuit_create", CreateArgs, circuit_create, EDITS),
    Tool("circuit_add", AddArgs, circuit_add, EDITS),
    Tool("circuit_remove", RemoveArgs, circuit_remove, DESTRUCTIVE),
    Tool("circuit_show", NameArgs, circuit_show, READ_ONLY),
    Tool("circuit_list", NoArgs, circuit_list, READ_ONLY),
    Tool("circuit_validate", ValidateArgs, circuit_validate, WRITES_RESULT, long=True),
    Tool("circuit_prune", PruneArgs, circuit_prune, WRITES_RESULT, long=True),
    Tool("circuit_export", ExportArgs, circuit_export, WRITES_RESULT),
]
