"""Tier 3: Tracr-compiled RASP programs as GPT-2 folders, with exact circuits.

`evals/tracr_compile.py` (run once where `tracr-pypi` is installed) stores each compiled
program's weights in `evals/tracr/{program}.npz` with its residual-space labels. Here they
become a `GPT2LMHeadModel` the engine loads like any other:

* Tracr has no LayerNorm; GPT-2 has one before every block. Every vector written into the
  residual stream gets one extra "balance" coordinate (minus the sum of the others), so the
  residual stream has mean 0, and the norms get eps 1e6 and weight 1e3: each is then the
  identity to about 1e-7 (the same device as the constructed models).
* Heads are padded to GPT-2's d_head = d_model / n_heads, and queries rescaled by
  sqrt(d_head / key_size) so the attention logits equal Tracr's.
* ReLU MLPs (GPT-2's `activation_function="relu"`); the unembedding reads the program's
  categorical output space (logit = 10 x that coordinate).

Ground truth: the heads and MLP blocks with non-zero weights (each RASP operation compiles
into its own blocks; the others are empty). Both programs are compiled causally and read at
the last position, where causal attention sees the whole input.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from tdb_agent.circuits import PromptPair

STORE = Path(__file__).resolve().parent / "tracr"
PROGRAMS = ("hist", "reverse")
LN_EPS = 1e6
LOGIT_SCALE = 10.0
VOCAB = ["a", "b", "c", "d"]


def _load(program: str) -> tuple[dict, dict[str, np.ndarray]]:
    meta = json.loads((STORE / f"{program}.json").read_text())
    with np.load(STORE / f"{program}.npz") as z:
        arrays = {k: z[k].astype(np.float32) for k in z.files}
    return meta, arrays


def _tokenizer(meta: dict) -> PreTrainedTokenizerFast:
    words = list(meta["input_encoding"]) + [w for w in meta["output_values"] if w not in meta["input_encoding"]]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="PAD"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="BOS", eos_token="BOS", unk_token="PAD",
                                   pad_token="PAD", model_max_length=meta["max_seq_len"] + 1)


def ground_truth(program: str) -> list[str]:
    """The non-empty heads and MLP blocks of the compiled program."""
    meta, a = _load(program)
    H, ks = meta["num_heads"], meta["key_size"]
    nodes = []
    for l in range(meta["num_layers"]):
        p = f"transformer/layer_{l}/"
        for h in range(H):
            cols = slice(h * ks, (h + 1) * ks)
            if any(np.abs(a[p + f"attn/{m}/w"][:, cols]).max() > 0 for m in ("query", "key", "value")) and \
                    np.abs(a[p + "attn/linear/w"][cols]).max() > 0:
                nodes.append(f"L{l}.H{h}")
        if np.abs(a[p + "mlp/linear_2/w"]).max() > 0:
            nodes.append(f"L{l}.MLP")
    return nodes


def ground_truth_edges(program: str) -> list[tuple[str, str]]:
    """Edges between the compiled blocks (and into LOGITS), read off the weights: u -> v when a
    residual-space label u writes is one v reads (a head's query, key or value rows; an MLP's
    first layer; the unembedding's output labels). Tracr gives each value its own labels, so
    this is the program's dataflow graph."""
    meta, a = _load(program)
    labels = meta["residual_labels"]
    H, ks = meta["num_heads"], meta["key_size"]
    nodes = ground_truth(program)

    def nz_rows(w):
        return set(np.nonzero(np.abs(w).max(axis=1) > 0)[0].tolist())

    reads, writes, order = {}, {}, []
    for l in range(meta["num_layers"]):
        p = f"transformer/layer_{l}/"
        for h in range(H):
            cols = slice(h * ks, (h + 1) * ks)
            reads[f"L{l}.H{h}"] = set().union(*(nz_rows(a[p + f"attn/{m}/w"][:, cols]) for m in ("query", "key",
                                                                                                  "value")))
            writes[f"L{l}.H{h}"] = nz_rows(a[p + "attn/linear/w"][cols].T)
            order.append(f"L{l}.H{h}")
        reads[f"L{l}.MLP"] = nz_rows(a[p + "mlp/linear_1/w"])
        writes[f"L{l}.MLP"] = nz_rows(a[p + "mlp/linear_2/w"].T)
        order.append(f"L{l}.MLP")
    reads["LOGITS"] = {labels.index(f"{meta['output']}:{v}") for v in meta["output_values"]}
    order.append("LOGITS")
    return [(u, v) for i, u in enumerate(order) if u in nodes for v in order[i + 1:]
            if (v in nodes or v == "LOGITS") and writes[u] & reads[v]]


def build(program: str, folder: str | Path) -> Path:
    """Write the program as a GPT-2 folder (model, tokenizer, reference.txt for mean ablation)."""
    meta, a = _load(program)
    labels = meta["residual_labels"]
    R, H, ks, L = len(labels), meta["num_heads"], meta["key_size"], meta["num_layers"]
    d_head = max(ks, math.ceil((R + 1) / H))
    D = H * d_head
    tok = _tokenizer(meta)

    def write(v: np.ndarray) -> torch.Tensor:
        """Rows written into the residual stream: padded to D, with the balance coordinate."""
        v = np.atleast_2d(v)
        out = np.zeros((v.shape[0], D), np.float32)
        out[:, :R] = v
        out[:, R] = -v.sum(1)
        return torch.from_numpy(out)

    def read(w: np.ndarray) -> np.ndarray:
        out = np.zeros((D, w.shape[1]), np.float32)
        out[:R] = w
        return out

    cfg = GPT2Config(vocab_size=len(tok), n_positions=meta["max_seq_len"] + 1, n_embd=D, n_layer=L, n_head=H,
                     n_inner=meta["mlp_hidden_size"], activation_function="relu", layer_norm_epsilon=LN_EPS,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    model = GPT2LMHeadModel(cfg)
    sd = {}
    wte = torch.zeros(len(tok), D)
    for word, i in meta["input_encoding"].items():
        wte[tok.convert_tokens_to_ids(word)] = write(a["token_embed/embeddings"][i])[0]
    sd["transformer.wte.weight"] = wte
    sd["transformer.wpe.weight"] = write(a["pos_embed/embeddings"])
    lm_head = torch.zeros(len(tok), D)
    for value in meta["output_values"]:
        lm_head[tok.convert_tokens_to_ids(value), labels.index(f"{meta['output']}:{value}")] = LOGIT_SCALE
    sd["lm_head.weight"] = lm_head
    qscale = math.sqrt(d_head / ks)
    for l in range(L):
        p, q = f"transformer/layer_{l}/", f"transformer.h.{l}."
        c_attn, c_attn_b = np.zeros((D, 3 * D), np.float32), np.zeros(3 * D, np.float32)
        proj = np.zeros((D, R), np.float32)
        for i, m in enumerate(("query", "key", "value")):
            w, b = read(a[p + f"attn/{m}/w"]), a[p + f"attn/{m}/b"]
            s = qscale if m == "query" else 1.0
            for h in range(H):
                dst = slice(i * D + h * d_head, i * D + h * d_head + ks)
                c_attn[:, dst] = w[:, h * ks:(h + 1) * ks] * s
                c_attn_b[dst] = b[h * ks:(h + 1) * ks] * s
        for h in range(H):
            proj[h * d_head:h * d_head + ks] = a[p + "attn/linear/w"][h * ks:(h + 1) * ks]
        sd |= {q + "attn.c_attn.weight": torch.from_numpy(c_attn), q + "attn.c_attn.bias": torch.from_numpy(c_attn_b),
               q + "attn.c_proj.weight": write(proj), q + "attn.c_proj.bias": write(a[p + "attn/linear/b"])[0],
               q + "mlp.c_fc.weight": torch.from_numpy(read(a[p + "mlp/linear_1/w"])),
               q + "mlp.c_fc.bias": torch.from_numpy(a[p + "mlp/linear_1/b"]),
               q + "mlp.c_proj.weight": write(a[p + "mlp/linear_2/w"]),
               q + "mlp.c_proj.bias": write(a[p + "mlp/linear_2/b"])[0]}
        for ln in ("ln_1", "ln_2"):
            sd |= {q + f"{ln}.weight": torch.full((D,), LN_EPS ** 0.5), q + f"{ln}.bias": torch.zeros(D)}
    sd |= {"transformer.ln_f.weight": torch.full((D,), LN_EPS ** 0.5), "transformer.ln_f.bias": torch.zeros(D)}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not m.endswith("attn.bias") and "masked_bias" not in m]
    if missing or unexpected:
        raise RuntimeError(f"tracr weights do not match GPT-2: missing {missing}, unexpected {unexpected}")
    folder = Path(folder)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    rng = random.Random(0)  # mean ablation averages over the program's own inputs
    (folder / "reference.txt").write_text("\n".join(
        " ".join(rng.choice(VOCAB) for _ in range(rng.randint(3, meta["max_seq_len"]))) for _ in range(48)) + "\n")
    return folder


def program_pairs(program: str, n: int, seed: int = 0) -> list[PromptPair]:
    """hist: the last token's count (the corrupted prompt changes one earlier token, so the
    count moves by one: the distractor); reverse: the first token (read at the last
    position; the corrupted prompt changes the first token to the distractor)."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        seq = [rng.choice(VOCAB) for _ in range(rng.randint(3, 8))]
        if program == "hist":
            last = seq[-1]
            i = rng.randrange(len(seq) - 1)
            bad = list(seq)
            bad[i] = rng.choice([w for w in VOCAB if w != last]) if seq[i] == last else last
            target, distractor = str(seq.count(last)), str(bad.count(last))
        else:
            bad = list(seq)
            bad[0] = rng.choice([w for w in VOCAB if w != seq[0]])
            target, distractor = seq[0], bad[0]
        out.append(PromptPair(prompt=" ".join(seq), corrupted_prompt=" ".join(bad), target=target,
                              distractor=distractor))
    return out
