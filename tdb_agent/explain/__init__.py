"""Explanations of components (heuristic and LLM) with simulation scores."""

from tdb_agent.explain.explainer import Explainer, Explanation, output_boosts, precompute_heuristic
from tdb_agent.explain.llm import ExplainerLLM

__all__ = ["Explainer", "ExplainerLLM", "Explanation", "output_boosts", "precompute_heuristic"]
