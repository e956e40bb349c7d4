"""Attribution graphs over transcoder features or SAE latents (docs/DESIGN.md §3): the local
replacement model (frozen.py), its nodes (nodes.py), the batched adjacency (build.py),
influence pruning and scores (influence.py), attention splits (heads.py), JSON (export.py)."""

from tdb_agent.ops.graph.build import AttributionGraph, GraphTarget, build_graph

__all__ = ["AttributionGraph", "GraphTarget", "build_graph"]
