"""Interpretability operations: pure functions over the engine with typed results."""

from tdb_agent.ops.ablate import ablate, ablation_sweep, patch
from tdb_agent.ops.attention import attention_pattern
from tdb_agent.ops.attribute import attribute
from tdb_agent.ops.basic import list_tasks, model_info, predict, tokenize
from tdb_agent.ops.lens import direct_logit_attribution, logit_lens
from tdb_agent.ops.metrics import Metric, make_metric
from tdb_agent.ops.steer import steer
from tdb_agent.ops.trace import trace_upstream

__all__ = ["Metric", "ablate", "ablation_sweep", "attention_pattern", "attribute", "direct_logit_attribution",
           "list_tasks", "logit_lens", "make_metric", "model_info", "patch", "predict", "steer", "tokenize", "trace_upstream"]
