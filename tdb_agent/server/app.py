"""The MCP server: wiring only. The tools are `tdb_agent.service` (argument models and
protocol-free functions, docs/DESIGN.md §5), turned into MCP tools by `server.tools`;
unknown argument names are refused by `guard`. Resources and prompts live in `resources`
and `prompts`.
"""

import logging
from pathlib import Path

from mcp.server import MCPServer
from mcp.server.auth.provider import TokenVerifier
from mcp.server.auth.settings import AuthSettings

from tdb_agent.server.circuit_tools import register_circuit_tools
from tdb_agent.server.guard import UnknownArgumentGuard
from tdb_agent.server.prompts import PROMPTS_DIR, register_prompts
from tdb_agent.server.resources import register_resources
from tdb_agent.server.sae_tools import register_sae_tools
from tdb_agent.server.tools import add_tools
from tdb_agent.service.catalog import EDGE_TOOLS, GRAPH_TOOLS, MODEL_TOOLS
from tdb_agent.service.graph_tools import has_graph_features
from tdb_agent.service.examples import attach_dataset
from tdb_agent.workbench import Workbench

log = logging.getLogger(__name__)


INSTRUCTIONS = """Interpretability workbench for a transformer language model (Transformer
Debugger as tools). Start with model_info and list_tasks; use predict to see what the model
says, attribute to rank the components behind a logit difference, ablate / ablation_sweep /
patch to test them causally, trace_upstream and attention_pattern to see why a head attends
where it does. Components are named EMB, L{l}.H{h} (head), L{l}.ATTN, L{l}.MLP, L{l}.N{n}
(neuron), L{l}.{resid|mlp|attn}.F{i} (SAE latent), LOGITS; add @t to pin a token position
(tokenize shows positions). Resources: tdb://model, tdb://component/{id} (a component's
page), tdb://circuit/{name}. Prompts: investigation recipes (why_prefers, why_attends, ...)."""


def build_server(bench: Workbench, *, token_verifier: TokenVerifier | None = None,
                 auth: AuthSettings | None = None, prompts_dir: Path = PROMPTS_DIR) -> MCPServer:
    """The server over one workbench. `token_verifier`/`auth` protect the HTTP transport
    (see `tdb_agent.server.http`); models, SAEs and datasets are fixed by `bench`, so no
    tool ever takes a path."""
    guard = UnknownArgumentGuard()
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    mcp = MCPServer("tdb-agent", instructions=INSTRUCTIONS, token_verifier=token_verifier, auth=auth,
                    middleware=[guard], log_level=level if level in ("DEBUG", "INFO", "ERROR") else "WARNING")
    guard.server = mcp
    add_tools(mcp, bench, MODEL_TOOLS)
    add_tools(mcp, bench, EDGE_TOOLS)
    if has_graph_features(bench):  # attribution graphs: only with transcoders or residual SAEs
        add_tools(mcp, bench, GRAPH_TOOLS)
    register_circuit_tools(mcp, bench)
    if attach_dataset(bench) if getattr(bench, "dataset", None) is None else bench.dataset:
        # top_examples / explain_component: only where there is a dataset to answer from
        register_sae_tools(mcp, bench)
    register_resources(mcp, bench)
    register_prompts(mcp, prompts_dir)
    return mcp
