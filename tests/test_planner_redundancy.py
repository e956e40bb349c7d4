"""The scripted planner finds backup heads that single-component ablation misses.

The model: the constructed `induction_backup` case (evals/constructed.py): previous-token
heads L0.H0 and L0.H3 with the same weights feed induction head L1.H1. The
induction head's attention saturates with either previous-token head, so ablating one of
them does nothing and ablating both breaks induction (an OR). Direct effect, act x grad and
single ablations all score both near zero, and pruning alone would keep only one of them.
"""

import asyncio

import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

from evals.constructed import D_HEAD, build_case, case_pairs
from tdb_agent.agent import planner
from tdb_agent.session import EngineSpec, open_session
from tdb_agent.agent.runstore import RunStore
from tdb_agent.agent.toolbox import Toolbox


@pytest.fixture(scope="module")
def backup_model(tmp_path_factory):
    return build_case("induction_backup", tmp_path_factory.mktemp("backup")).model_dir


def _logit_diff_without(folder, heads: list[int], pairs) -> float:
    """Mean logit diff with layer-0 heads zeroed in the weights: plain transformers, no engine."""
    model = GPT2LMHeadModel.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        for h in heads:
            model.transformer.h[0].attn.c_proj.weight[h * D_HEAD:(h + 1) * D_HEAD] = 0
        diffs = []
        for p in pairs:
            ids = torch.tensor([[tok.bos_token_id] + tok(p.prompt, add_special_tokens=False)["input_ids"]])
            logits = model(ids).logits[0, -1]
            t, d = (tok(w, add_special_tokens=False)["input_ids"][0] for w in (p.target, p.distractor))
            diffs.append((logits[t] - logits[d]).item())
    return sum(diffs) / len(diffs)


def test_backup_head_is_an_or(backup_model):
    pairs = case_pairs("induction", 8, seed=3)
    full = _logit_diff_without(backup_model, [], pairs)
    assert full > 5
    assert abs(_logit_diff_without(backup_model, [0], pairs) - full) < 0.05 * full
    assert abs(_logit_diff_without(backup_model, [3], pairs) - full) < 0.05 * full
    assert _logit_diff_without(backup_model, [0, 3], pairs) < 0.3 * full


def _discover(folder, pairs, out):
    async def go():
        async with open_session(EngineSpec(model=str(folder)), workspace=out / "workspace") as client:
            return await planner.discover(Toolbox(client, RunStore(out)), None, pairs, "backup")
    return asyncio.run(go())


def test_planner_keeps_both_backup_heads(backup_model, tmp_path, monkeypatch):
    pairs = [p.model_dump() for p in case_pairs("induction", 8, seed=3)]
    result = _discover(backup_model, pairs, tmp_path / "with")
    assert {"L0.H0", "L0.H3", "L1.H1"} <= set(result.nodes), result
    assert result.faithfulness >= 0.8
    assert any("redundancy (layer 0 heads)" in n and "L0.H0" in n and "L0.H3" in n for n in result.notes)

    # control: without the redundancy step, pruning drops one of the two (either suffices)
    monkeypatch.setattr(planner, "SUPERADDITIVE", float("inf"))
    plain = _discover(backup_model, pairs, tmp_path / "without")
    assert len({"L0.H0", "L0.H3"} & set(plain.nodes)) == 1, plain
