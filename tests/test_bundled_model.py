"""The shipped model: loads through the engine like any HF model and has its behaviours."""

from pathlib import Path

import torch

from tdb_agent.engine import DEFAULT_MODEL
from tdb_agent.tasks import task_examples
from tdb_agent.tasks.evaluate import behaviour_scores


def test_held_out_behaviours(bundled):
    scores = behaviour_scores(bundled.model, bundled.tokenizer, n=200, seed=999)
    assert scores.ioi_top1 >= 0.95, scores
    assert scores.induction_top1 >= 0.90, scores
    assert scores.greater_than_mass >= 0.90, scores
    assert scores.facts_top1 >= 0.90, scores


def test_engine_and_tasks_agree_on_tokens(bundled):
    for name in ("ioi", "induction", "greater_than", "facts"):
        for ex in task_examples(name, 20):
            bundled.token_id(ex.target)
            bundled.token_id(ex.distractor)
            assert bundled.to_tokens(ex.prompt).shape == bundled.to_tokens(ex.corrupted_prompt).shape


def test_assets_fit_the_budget():
    assets = DEFAULT_MODEL.parent
    size = sum(p.stat().st_size for p in Path(assets).rglob("*") if p.is_file() and not p.name.endswith(".ckpt.pt"))
    assert size <= 25 * 2**20


def test_loaded_as_float32(bundled):
    assert bundled.dtype == torch.float32 and bundled.spec.family == "gpt2"
