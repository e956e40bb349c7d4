"""Held-out behaviour scores of a causal LM on the bundled tasks.

Works on any `transformers` causal LM with the bundled tokenizer; used by the training
script (progress and the model card) and by the tests that check the shipped model.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel

from tdb_agent.engine.tokens import with_bos
from tdb_agent.tasks.generators import task_examples


class BehaviourScores(BaseModel):
    ioi_top1: float
    induction_top1: float
    greater_than_mass: float
    facts_top1: float
    n_per_task: int

    def passes(self) -> bool:
        """The thresholds of the foundation issue."""
        return (self.ioi_top1 >= 0.95 and self.induction_top1 >= 0.90
                and self.greater_than_mass >= 0.90 and self.facts_top1 >= 0.90)


@torch.no_grad()
def last_token_logits(model, tokenizer, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Logits at the last token of each prompt (BOS prepended), shape [n_prompts, vocab]."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = [with_bos(tokenizer, tokenizer(p, add_special_tokens=False)["input_ids"])
               for p in prompts[i:i + batch_size]]
        width = max(len(x) for x in ids)
        batch = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
        for r, x in enumerate(ids):
            batch[r, :len(x)] = torch.tensor(x)
        logits = model(batch.to(device)).logits.float()  # right padding: causal, so harmless
        last = torch.tensor([len(x) - 1 for x in ids], device=device)
        out.append(logits[torch.arange(len(ids), device=device), last])
    return torch.cat(out)


def _token_id(tokenizer, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, f"{word!r} is not one token: {ids}"
    return ids[0]


def behaviour_scores(model, tokenizer, n: int = 200, seed: int = 12345) -> BehaviourScores:
    scores = {}
    for task in ("ioi", "induction", "facts"):
        examples = task_examples(task, n, seed=seed, split="test")
        logits = last_token_logits(model, tokenizer, [e.prompt for e in examples])
        targets = torch.tensor([_token_id(tokenizer, e.target) for e in examples], device=logits.device)
        scores[f"{task}_top1"] = (logits.argmax(-1) == targets).float().mean().item()
    examples = task_examples("greater_than", n, seed=seed, split="test")
    probs = last_token_logits(model, tokenizer, [e.prompt for e in examples]).softmax(-1)
    year_ids = torch.tensor([_token_id(tokenizer, f"{y:02d}") for y in range(100)], device=probs.device)
    masses = []
    for row, e in zip(probs, examples):
        start = int(e.target) - 1  # the target is one year above the start year
        masses.append(row[year_ids[start + 1:]].sum().item())
    return BehaviourScores(ioi_top1=scores["ioi_top1"], induction_top1=scores["induction_top1"],
                           greater_than_mass=sum(masses) / len(masses), facts_top1=scores["facts_top1"],
                           n_per_task=n)
