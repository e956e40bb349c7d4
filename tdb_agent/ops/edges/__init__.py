"""Edge-level circuits (docs/DESIGN.md §4 "edges"): the edge graph (graph.py), how a receiver
reads the residual stream and its gradient (reads.py), what a run gives (capture.py), EAP and
EAP-IG scores (eap.py), exact edge patching (patch.py) and faithfulness curves over edge
budgets scored like the MIB circuit track (faithfulness.py)."""

from tdb_agent.ops.edges.eap import EdgeScores, edge_scores
from tdb_agent.ops.edges.faithfulness import MIB_BUDGETS, FaithfulnessCurve, faithfulness_curve, smallest_circuit
from tdb_agent.ops.edges.graph import EdgeGraph, count_edges
from tdb_agent.ops.edges.patch import patched_metrics

__all__ = ["MIB_BUDGETS", "EdgeGraph", "EdgeScores", "FaithfulnessCurve", "count_edges", "edge_scores",
           "faithfulness_curve", "patched_metrics", "smallest_circuit"]
