"""The server on the bundled model: SAEs and the shipped activation dataset are attached,
so the dataset tools are offered and model_info lists both."""

import asyncio

from mcp import Client

from tdb_agent.engine import Engine
from tdb_agent.engine.sae import attach_saes
from tdb_agent.server import build_server
from tdb_agent.workbench import Workbench


def test_bundled_server_offers_dataset_tools(bundled, tmp_path):
    engine = Engine.load()  # a fresh engine: SAEs attach to it
    attach_saes(engine, [], bundled=True)
    server = build_server(Workbench(engine, workspace=tmp_path))

    async def go():
        async with Client(server) as c:
            names = {t.name for t in (await c.list_tools()).tools}
            assert {"top_examples", "explain_component"} <= names
            info = (await c.call_tool("model_info", {})).structured_content
            assert info["datasets"] == ["tdb-tiny"] and len(info["saes"]) == engine.spec.n_layers
            r = await c.call_tool("top_examples", {"component": "L0.resid.F15", "k": 5})
            assert not r.is_error
            maxima = [max(x["activations"]) for x in r.structured_content["examples"]]
            assert maxima == sorted(maxima, reverse=True)
    asyncio.run(go())
