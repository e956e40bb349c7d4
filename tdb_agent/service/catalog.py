"""Every tool, in the order clients list them, and lookup by name. The MCP server registers
these (`server.app`), the viewer routes some of them (`viewer.routes`), and the agent's
resume logic reads their annotations."""

from __future__ import annotations

from tdb_agent.service import (causal_tools, circuit_tools, dataset_tools, edge_tools, graph_tools, lens_tools,
                               model_tools)
from tdb_agent.service.tool import Tool

_model = {t.name: t for t in model_tools.TOOLS + causal_tools.TOOLS + lens_tools.TOOLS}
_ORDER = ["model_info", "tokenize", "predict", "list_tasks", "attribute", "ablate", "ablation_sweep", "patch",
          "trace_upstream", "attention_pattern", "steer", "logit_lens", "direct_logit_attribution"]
assert set(_ORDER) == set(_model), "list every model tool in _ORDER"

MODEL_TOOLS: list[Tool] = [_model[n] for n in _ORDER]
CIRCUIT_TOOLS: list[Tool] = circuit_tools.TOOLS
EDGE_TOOLS: list[Tool] = edge_tools.TOOLS
#: attribution graphs: registered only where transcoders or residual-stream SAEs are loaded
GRAPH_TOOLS: list[Tool] = graph_tools.TOOLS
TOOLS: list[Tool] = MODEL_TOOLS + EDGE_TOOLS + CIRCUIT_TOOLS + dataset_tools.TOOLS + GRAPH_TOOLS
#: the tools tagged "dataset": registered only where an activation dataset is loaded
DATASET_TOOLS: list[Tool] = [t for t in TOOLS if "dataset" in t.tags]
BY_NAME: dict[str, Tool] = {t.name: t for t in TOOLS}


def tool(name: str) -> Tool:
    return BY_NAME[name]
