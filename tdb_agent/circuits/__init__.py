"""Circuit hypotheses (docs/DESIGN.md §6): networkx graphs of components whose nodes and edges carry
their evidence, validated by ablation (faithfulness, necessity, pruning) and exported.

    g = new_circuit("ioi", behaviour=Behaviour(task="ioi", n=16), metric="logit_diff")
    add_node(g, "L3.H0", role="name mover", evidence=[Evidence(tool="attribute", value=1.2)])
    add_edge(g, "L3.H0", "LOGITS", weight=1.2)
    v = validate(engine, g, mode="mean")          # v.faithfulness, v.necessity
    r = prune(engine, g, threshold=0.8)           # r.kept; pruned_circuit(g, r)
    save(g, "graph.json"); to_svg(g); to_html(g); to_graphml(g); to_dot(g); to_circuit_tracer(g)
"""

from tdb_agent.circuits.draw import to_html, to_svg
from tdb_agent.circuits.evaluate import AblationMode, Evaluator
from tdb_agent.circuits.io import flat_copy, from_json, load, save, to_circuit_tracer, to_dot, to_graphml, to_json
from tdb_agent.circuits.model import (
    FORMAT,
    SINK,
    CircuitInfo,
    EdgeRecord,
    Evidence,
    NodeRecord,
    Via,
    add_edge,
    add_node,
    behaviour,
    check_ids,
    components,
    edge_records,
    get_edge,
    get_node,
    info,
    new_circuit,
    node_records,
    remove_edge,
    remove_node,
)
from tdb_agent.circuits.pairs import Behaviour, PromptPair
from tdb_agent.circuits.prune import PruneResult, PruneStep, prune, pruned_circuit
from tdb_agent.circuits.universe import POSITIONS, UNIVERSE, keep_set
from tdb_agent.circuits.validate import NodeNecessity, Validation, faithfulness, record_validation, validate

__all__ = [
    "FORMAT", "SINK", "POSITIONS", "UNIVERSE", "AblationMode", "Behaviour", "CircuitInfo", "EdgeRecord", "Evaluator",
    "Evidence", "NodeNecessity", "NodeRecord", "PromptPair", "PruneResult", "PruneStep", "Validation", "Via",
    "add_edge", "add_node", "behaviour", "check_ids", "components", "edge_records", "faithfulness", "flat_copy",
    "from_json", "get_edge", "get_node", "info", "keep_set", "load", "new_circuit", "node_records", "prune",
    "pruned_circuit", "record_validation", "remove_edge", "remove_node", "save", "to_circuit_tracer", "to_dot",
    "to_graphml", "to_html", "to_json", "to_svg", "validate",
]
