"""The MCP annotations a tool can carry, written once. Clients (and the agent's resume
logic, `agent.toolbox.read_only`) read them to tell looking from changing."""

from mcp.types import ToolAnnotations

#: answers from the model and the data; changes nothing
READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)
#: adds to a circuit (calling it twice adds twice)
EDITS = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False)
#: removes from a circuit
DESTRUCTIVE = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=False,
                              open_world_hint=False)
#: stores a result (a validation, a pruned set, an export): the same call gives the same state
WRITES_RESULT = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True,
                                open_world_hint=False)
