"""Train the bundled default model (a small GPT-2) on the synthetic task corpus.

    python tools/train_default_model.py --out tdb_agent/assets/tdb-tiny

Seeded and reproducible (same seed, same torch build, same thread count -> same weights).
Checkpoints every `--eval-every` steps to `<out>.ckpt.pt` and resumes from it, so an
interrupted run loses at most one interval. Writes a Hugging Face folder (config,
fp16 safetensors, tokenizer) plus a model card with the measured held-out scores.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from tdb_agent.tasks import corpus_documents
from tdb_agent.tasks.evaluate import behaviour_scores
from tdb_agent.tasks.tokenizer import build_tokenizer

CTX = 128


def make_config(vocab_size: int) -> GPT2Config:
    return GPT2Config(vocab_size=vocab_size, n_positions=CTX, n_embd=256, n_layer=4, n_head=8,
                      n_inner=1024, activation_function="gelu_new", resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                      pad_token_id=0, tie_word_embeddings=True)


def packed_batches(tokenizer, batch_size: int, seed: int):
    """Rows of CTX tokens made of whole documents, each starting with BOS; the tail of a
    row that no further document fits in is padding with its loss masked."""
    bos = tokenizer.bos_token_id
    block = 0
    pending: list[list[int]] = []
    while True:
        if not pending:
            docs = corpus_documents(4096, seed=seed * 100_003 + block)
            block += 1
            pending = [[bos] + tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
            pending = [d[:CTX] for d in pending]
        ids = torch.full((batch_size, CTX), bos, dtype=torch.long)
        labels = torch.full((batch_size, CTX), -100, dtype=torch.long)
        for r in range(batch_size):
            pos = 0
            while pending and pos + len(pending[-1]) <= CTX:
                doc = pending.pop()
                ids[r, pos:pos + len(doc)] = torch.tensor(doc)
                labels[r, pos:pos + len(doc)] = torch.tensor(doc)
                pos += len(doc)
            if not pending:
                break
        yield ids, labels


def lr_at(step: int, steps: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tdb_agent/assets/tdb-tiny")
    ap.add_argument("--steps", type=int, default=5000, help="length of the learning-rate schedule")
    ap.add_argument("--stop-after", type=int, default=None,
                    help="stop (and save) after this many steps of that schedule")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                    help="bf16 autocast (about 2x faster on CPU)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="torch.compile the training step (about 1.5-2x faster on CPU)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tokenizer = build_tokenizer()
    model = GPT2LMHeadModel(make_config(len(tokenizer)))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    out = Path(args.out)
    ckpt = out.with_name(out.name + ".ckpt.pt")
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        print(f"resumed from step {start}", flush=True)
    end = min(args.steps, args.stop_after or args.steps)
    batches = packed_batches(tokenizer, args.batch_size, args.seed)
    for _ in range(start if start < end else 0):  # replay the data stream: a resumed run sees the same batches
        next(batches)

    forward = torch.compile(model) if args.compile else model
    t0 = time.time()
    tokens = 0
    for step in range(start, end):
        ids, labels = next(batches)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = forward(ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += ids.numel()
        if step % 50 == 0:
            rate = tokens / (time.time() - t0)
            print(f"step {step} loss {loss.item():.3f} {rate:,.0f} tok/s", flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == end:
            model.eval()
            scores = behaviour_scores(model, tokenizer, n=100)
            model.train()
            print(f"step {step + 1} eval {scores.model_dump()}", flush=True)
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1}, ckpt)

    save(model, tokenizer, out, args, steps_done=end)


def save(model: GPT2LMHeadModel, tokenizer, out: Path, args, steps_done: int) -> None:
    """Write the HF folder in fp16 (half the bytes; the engine loads it as float32) and the
    model card with scores measured on the saved (rounded) weights."""
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.half().save_pretrained(out)
    tokenizer.save_pretrained(out)
    model = GPT2LMHeadModel.from_pretrained(out, dtype=torch.float32)
    scores = behaviour_scores(model, tokenizer, n=400)
    n_params = sum(p.numel() for p in model.parameters())
    cfg = model.config
    card = f"""# tdb-tiny: the bundled default model of tdb-agent

A GPT-2-architecture model (`GPT2LMHeadModel`) trained from scratch on the synthetic
corpus of `tdb_agent.tasks` with planted behaviours. Weights are stored in float16.

- parameters: {n_params:,} ({cfg.n_layer} layers, d_model {cfg.n_embd}, {cfg.n_head} heads,
  d_mlp {cfg.n_inner}, context {cfg.n_positions}, word-level vocabulary of {cfg.vocab_size})
- training: {steps_done} steps (of a {args.steps}-step cosine schedule) x {args.batch_size} x {CTX} tokens
  ({steps_done * args.batch_size * CTX / 1e6:.1f}M tokens, padding included), AdamW lr {args.lr}, seed {args.seed},
  bf16 autocast {args.bf16}, torch.compile {args.compile}
- reproduce: `python tools/train_default_model.py --out {out} --steps {args.steps} --stop-after {steps_done} --lr {args.lr} --seed {args.seed}`
  (bitwise reproducible for the same torch build and thread count; about an hour on 2 CPU cores)

## Held-out behaviour ({scores.n_per_task} prompts per task)

| task | score | threshold |
|---|---|---|
| ioi (top-1 = indirect object, held-out name pairs) | {scores.ioi_top1:.3f} | >= 0.95 |
| induction (top-1 on the repeated part) | {scores.induction_top1:.3f} | >= 0.90 |
| greater_than (probability mass on later years) | {scores.greater_than_mass:.3f} | >= 0.90 |
| facts (top-1) | {scores.facts_top1:.3f} | >= 0.90 |
"""
    (out / "README.md").write_text(card)
    (out / "scores.json").write_text(json.dumps(scores.model_dump(), indent=2))
    print(card)


if __name__ == "__main__":
    main()
