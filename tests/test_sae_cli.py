"""`tdb-agent serve --sae PATH` attaches SAEs: a real stdio server, real client."""

import asyncio
import os
import sys

from mcp import Client, StdioServerParameters

from tests.test_sae import random_sae


def test_serve_with_sae_flag(tiny_dirs, tmp_path):
    d = 32
    random_sae(d, 24, "blocks.1.hook_resid_pre", seed=3).save(tmp_path / "s0")
    random_sae(d, 16, "blocks.1.hook_mlp_out", "topk", seed=4, k=3).save(tmp_path / "s1")
    params = StdioServerParameters(command=sys.executable, args=[
        "-m", "tdb_agent.cli", "serve", "--model", str(tiny_dirs["gpt2"]), "--sae", str(tmp_path / "s0"),
        "--sae", str(tmp_path / "s1")], env={**os.environ, "HF_HUB_OFFLINE": "1"})

    async def go():
        async with Client(params, read_timeout_seconds=120) as c:
            info = await c.call_tool("model_info", {})
            assert info.structured_content["saes"] == ["L0.resid (standard, d_sae=24)", "L1.mlp (topk, d_sae=16)"]
            r = await c.call_tool("ablate", {"prompt": "When Mary and John went to the store , John gave a drink to",
                                             "components": ["L0.resid.F3", "L1.mlp.F2@4"], "target": "Mary",
                                             "distractor": "John"})
            assert not r.is_error, r.content
            prompt = "When Mary and John went to the store , John gave a drink to"
            r = await c.call_tool("attribute", {"prompt": prompt, "target": "Mary", "distractor": "John",
                                                "kinds": ["sae"], "top_k": 5})
            assert not r.is_error, r.content
            assert {row["kind"] for row in r.structured_content["rows"]} == {"sae"}
            r = await c.call_tool("ablation_sweep", {"prompt": prompt, "kind": "sae", "target": "Mary",
                                                     "distractor": "John", "top_k": 3})
            assert not r.is_error, r.content
            assert r.structured_content["n_components"] == 24 + 16
            bad = await c.call_tool("ablate", {"prompt": "When Mary and John", "components": ["L0.resid.F24"],
                                               "target": "Mary", "distractor": "John"})
            assert bad.is_error and "0..23" in bad.content[0].text

    asyncio.run(go())
