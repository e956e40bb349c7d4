"""A 2-layer toy with planted, redundant induction heads, trained in seconds.

Why this toy: single-component ablation misses redundant circuits. Trained on random
segments *tiled with a variable period*, a 2-layer, 4-head attention-only GPT-2 forms
previous-token heads in layer 0 and several induction heads in layer 1 (REFERENCES:
"Toy models"); ablating any one induction head barely moves it, ablating them together
breaks it. A fixed period would be solved by position, with no previous-token head, so the
period varies.

The model is a plain `GPT2LMHeadModel` whose MLPs are zeroed and frozen (attention only),
saved as a Hugging Face folder with its own word-level tokenizer, so `Engine.load(folder)`
reads it like any model. Its ground truth is not assumed: `evals` establishes it by
exhaustive ablation.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from tdb_agent.tasks.generators import TaskExample

N_WORDS = 48
BOS = "<bos>"
WORDS = [f"w{i:02d}" for i in range(N_WORDS)]
SEQ_LEN = 64  # tokens after BOS


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {BOS: 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=BOS))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS, unk_token=BOS,
                                   pad_token=BOS, model_max_length=SEQ_LEN + 1)


def tiled_sequence(rng: random.Random, length: int = SEQ_LEN) -> tuple[list[str], int, int]:
    """A random prefix, then a random segment (5-16 distinct words) tiled to `length` words.

    Returns (words, prefix length, period)."""
    period = rng.randint(5, 16)
    prefix = [rng.choice(WORDS) for _ in range(rng.randint(0, 6))]
    seg = rng.sample(WORDS, period)
    words = prefix + seg * (length // period + 1)
    return words[:length], len(prefix), period


def example(rng: random.Random) -> TaskExample:
    """One prompt pair: the prompt ends inside a repeat of the segment, so the next word is a
    copy; the corrupted prompt keeps that last, partial repeat and replaces every earlier
    occurrence of the segment by words outside it, so there is nothing left to copy. The
    distractor is another word of the segment."""
    words, start, period = tiled_sequence(rng)
    cut = rng.randint(start + period + 1, len(words) - 1)
    prompt, target = words[:cut], words[cut]
    seg = words[start:start + period]
    distractor = rng.choice([w for w in seg if w not in (target, prompt[-1])])
    current = start + ((cut - 1 - start) // period) * period  # where the last repeat begins
    others = [w for w in WORDS if w not in seg]
    corrupted = prompt[:start] + [rng.choice(others) for _ in range(current - start)] + prompt[current:]
    return TaskExample(prompt=" ".join(prompt), corrupted_prompt=" ".join(corrupted), target=target,
                       distractor=distractor)


def examples(n: int, seed: int = 1) -> list[TaskExample]:
    rng = random.Random(seed)
    return [example(rng) for _ in range(n)]


def _batch(rng: random.Random, n: int) -> torch.Tensor:
    rows = [[0] + [WORDS.index(w) + 1 for w in tiled_sequence(rng)[0]] for _ in range(n)]
    return torch.tensor(rows)


def copy_accuracy(model: GPT2LMHeadModel, n: int = 256, seed: int = 99) -> float:
    """Top-1 accuracy on words that a copy can predict (those after the first period)."""
    rng = random.Random(seed)
    hits = total = 0
    model.eval()
    with torch.no_grad():
        for _ in range(n // 64):
            seqs = [tiled_sequence(rng) for _ in range(64)]
            ids = torch.tensor([[0] + [WORDS.index(w) + 1 for w in s[0]] for s in seqs])
            pred = model(ids).logits[:, :-1].argmax(-1)
            for row, (_, start, period) in enumerate(seqs):
                lo = 1 + start + period  # first position (in ids) whose next token is a copy
                hits += (pred[row, lo - 1:] == ids[row, lo:]).sum().item()
                total += ids.shape[1] - lo
    return hits / total


def train_toy_induction(out_dir: Path | str, seed: int = 0, steps: int = 1500, batch: int = 32,
                        lr: float = 3e-3, d_model: int = 64, verbose: bool = False) -> Path:
    """Train the toy and save it (model + tokenizer) to `out_dir`; returns the folder.

    About 30 s on one CPU core. Untied embeddings and 64-word sequences matter: tied ones
    (GPT-2's default) or 40-word sequences left copy accuracy below 0.5 after 1,000 steps."""
    out = Path(out_dir)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = build_tokenizer()
    cfg = GPT2Config(vocab_size=len(tok), n_positions=SEQ_LEN + 1, n_embd=d_model, n_layer=2, n_head=4,
                     n_inner=4, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, bos_token_id=0, eos_token_id=0,
                     pad_token_id=0, tie_word_embeddings=False)
    model = GPT2LMHeadModel(cfg)
    for block in model.transformer.h:  # attention only: the MLPs write exactly zero
        for p in block.mlp.parameters():
            p.data.zero_()
            p.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        ids = _batch(rng, batch)
        loss = model(ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if verbose and step % 100 == 0:
            print(f"step {step} loss {loss.item():.3f}")
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    # the reference set of mean ablation (ops.runs.reference_documents): the toy's own data
    ref = random.Random(seed + 1_000)
    (out / "reference.txt").write_text("\n".join(" ".join(tiled_sequence(ref)[0]) for _ in range(48)) + "\n")
    return out


if __name__ == "__main__":
    import sys
    import time

    t0 = time.time()
    folder = train_toy_induction(sys.argv[1] if len(sys.argv) > 1 else "/tmp/toy-induction", verbose=True)
    m = GPT2LMHeadModel.from_pretrained(folder)
    print(f"trained in {time.time() - t0:.1f} s; copy accuracy {copy_accuracy(m):.3f}")
