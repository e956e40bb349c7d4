"""Interpretability operations: pure functions over the engine with typed results."""

from tdb_agent.ops.basic import list_tasks, model_info, predict, tokenize
from tdb_agent.ops.metrics import Metric, make_metric

__all__ = ["Metric", "list_tasks", "make_metric", "model_info", "predict", "tokenize"]
