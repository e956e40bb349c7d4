"""Tier 1: GPT-2-architecture models whose weights are set by hand, so the circuit is known exactly.

Why hand-set weights: a discovery method can only be scored where the truth is not itself
an estimate. Each model here implements one mechanism with a few heads or one neuron, and
fills the other slots with distractors: random heads (input-dependent, task-irrelevant
writes) and a *confounder* head that always attends to BOS and writes a large constant
vector into the logits (a big direct effect on every prompt, no effect under mean or
resample ablation: it is not part of the circuit).

Residual stream layout (d_model 256; every written vector is made zero-mean, and the
LayerNorms have eps 1e4 with weight 100, so each norm is the identity to ~1e-3 and the
hand-set reads see exactly the features below):

    TOK   0..39    one-hot of the case's words (the rest of the vocabulary reads as OTHER)
    OTHER 40, BOS 41, CONST 42 (1 on every token), DUP 43 (duplicate-token flag)
    POS   64..111  one-hot position 0..47 (the context is 128; later positions have no POS feature)
    PREV  128..167 previous token / inhibited name (written by a layer-0 or layer-1 head)
    OUT   168..207 what the unembedding reads: logit of word t = 10 * OUT[t]
    NOISE 208..255 what distractor heads and MLPs write

Cases (ground truth at the level of heads and MLP blocks, and edges between them):

* `induction`: L0.H0 previous-token head -> (k) L1.H1 induction head -> logits.
* `induction_backup`: the same with a second previous-token head L0.H3 (a backup): either
  one alone saturates the induction head, so single-component ablation sees neither.
* `names`: IOI-like. L0.H2 duplicate-token head -> (k) L1.H1 S-inhibition head (copies the
  duplicated name) -> (q) L2.H3 name mover (attends to names that are not inhibited, copies
  the name) -> logits.
* `class_neuron`: L0.N5 fires on names and writes 'said' over 'the' -> logits.

The tokenizer is the bundled model's (words of the synthetic world), so the reference
corpus that mean ablation averages over tokenizes here too.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from pydantic import BaseModel
from transformers import GPT2Config, GPT2LMHeadModel

from tdb_agent.circuits import PromptPair
from tdb_agent.tasks import vocab as V
from tdb_agent.tasks.generators import IOI_TEMPLATES
from tdb_agent.tasks.tokenizer import build_tokenizer

D, N_HEAD, D_HEAD, N_CTX, D_MLP = 256, 4, 64, 48, 32
N_POSITIONS = 128  # the model's context; positions >= N_CTX have no POS feature (the mechanisms need < 48 tokens)
TOK, OTHER, BOS, CONST, DUP = 0, 40, 41, 42, 43
POS, PREV, OUT, NOISE = 64, 128, 168, 208
LOGIT_SCALE = 10.0
LN_EPS = 1e4  # with weight sqrt(eps), LayerNorm(x) = x (x has mean 0) up to var(x)/2e4
CASES = ("induction", "induction_backup", "names", "class_neuron")


class ConstructedCase(BaseModel):
    """A constructed model on disk and what is true about it."""

    name: str
    model_dir: str
    description: str
    n_layers: int
    nodes: list[str]  # ground truth over heads and MLP blocks
    edges: list[tuple[str, str]]  # ground truth edges (source, target), LOGITS the sink
    neurons: list[str] = []  # ground truth neurons, where the mechanism is a neuron
    words: list[str]  # the words with a one-hot TOK feature


class _Weights:
    """The parameters of a GPT-2 being built, in Conv1D layout (x @ W)."""

    def __init__(self, n_layers: int, vocab: int, seed: int):
        self.g = torch.Generator().manual_seed(seed)
        self.n_layers = n_layers
        self.wte = torch.zeros(vocab, D)
        self.wpe = torch.zeros(N_POSITIONS, D)
        self.qkv = [torch.zeros(D, 3 * D) for _ in range(n_layers)]
        self.proj = [torch.zeros(D, D) for _ in range(n_layers)]
        self.fc = [torch.zeros(D, D_MLP) for _ in range(n_layers)]
        self.fc_b = [torch.zeros(D_MLP) for _ in range(n_layers)]
        self.mlp_out = [torch.zeros(D_MLP, D) for _ in range(n_layers)]
        self.lm_head = torch.zeros(vocab, D)

    def randn(self, *shape, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g) * std

    def head(self, layer: int, h: int, q=None, k=None, v=None, o=None) -> None:
        """Set head h's read matrices q/k/v [D, D_HEAD] and its write matrix o [D_HEAD, D]."""
        cols = slice(h * D_HEAD, (h + 1) * D_HEAD)
        for i, m in enumerate((q, k, v)):
            if m is not None:
                self.qkv[layer][:, i * D + cols.start:i * D + cols.stop] = m
        if o is not None:
            self.proj[layer][cols] = o

    def distractor_head(self, layer: int, h: int) -> None:
        """Random reads, small writes into the logits and the noise dimensions only (so the
        mechanism stays exact while the head still moves the metric a little)."""
        o = torch.zeros(D_HEAD, D)
        o[:, OUT:OUT + 40] = self.randn(D_HEAD, 40, std=0.003)
        o[:, NOISE:] = self.randn(D_HEAD, D - NOISE, std=0.03)
        self.head(layer, h, q=self.randn(D, D_HEAD, std=0.3), k=self.randn(D, D_HEAD, std=0.3),
                  v=self.randn(D, D_HEAD, std=0.3), o=o)

    def confounder_head(self, layer: int, h: int) -> None:
        """Always attends to BOS and writes a large constant into the logits."""
        q, k, v, o = torch.zeros(D, D_HEAD), torch.zeros(D, D_HEAD), torch.zeros(D, D_HEAD), torch.zeros(D_HEAD, D)
        q[CONST, 0] = 8 * 12.0
        k[POS + 0, 0] = 1.0
        v[BOS, 0] = 1.0
        o[0, OUT:OUT + 40] = self.randn(40, std=0.1)
        self.head(layer, h, q=q, k=k, v=v, o=o)

    def noise_mlp(self, layer: int) -> None:
        self.fc[layer] = self.randn(D, D_MLP, std=0.1)
        self.mlp_out[layer][:, NOISE:] = self.randn(D_MLP, D - NOISE, std=0.03)

    def save(self, folder: Path, tokenizer) -> None:
        cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=N_POSITIONS, n_embd=D, n_layer=self.n_layers,
                         n_head=N_HEAD, n_inner=D_MLP, layer_norm_epsilon=LN_EPS, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.bos_token_id,
                         pad_token_id=tokenizer.bos_token_id)
        model = GPT2LMHeadModel(cfg)

        def centred(w: torch.Tensor) -> torch.Tensor:  # rows written into the residual stream: mean 0
            return w - w.mean(-1, keepdim=True)

        sd = {"transformer.wte.weight": centred(self.wte), "transformer.wpe.weight": centred(self.wpe),
              "lm_head.weight": self.lm_head}
        for l in range(self.n_layers):
            p = f"transformer.h.{l}."
            sd |= {p + "attn.c_attn.weight": self.qkv[l], p + "attn.c_attn.bias": torch.zeros(3 * D),
                   p + "attn.c_proj.weight": centred(self.proj[l]), p + "attn.c_proj.bias": torch.zeros(D),
                   p + "mlp.c_fc.weight": self.fc[l], p + "mlp.c_fc.bias": self.fc_b[l],
                   p + "mlp.c_proj.weight": centred(self.mlp_out[l]), p + "mlp.c_proj.bias": torch.zeros(D)}
            for ln in ("ln_1", "ln_2"):
                sd |= {p + f"{ln}.weight": torch.full((D,), LN_EPS ** 0.5), p + f"{ln}.bias": torch.zeros(D)}
        sd |= {"transformer.ln_f.weight": torch.full((D,), LN_EPS ** 0.5), "transformer.ln_f.bias": torch.zeros(D)}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [m for m in missing if not m.endswith("attn.bias") and "masked_bias" not in m]
        if missing or unexpected:
            raise RuntimeError(f"constructed weights do not match GPT-2: missing {missing}, unexpected {unexpected}")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)


def _embed(w: _Weights, tokenizer, words: list[str]) -> None:
    """Token features (TOK one-hot for the case's words, OTHER otherwise, BOS), CONST, POS,
    and the unembedding of the case's words from OUT."""
    w.wte[:, OTHER] = 1.0
    w.wte[:, CONST] = 1.0
    bos = tokenizer.bos_token_id
    w.wte[bos, OTHER] = 0.0
    w.wte[bos, BOS] = 1.0
    for t, word in enumerate(words):
        i = tokenizer.convert_tokens_to_ids(word)
        w.wte[i, OTHER] = 0.0
        w.wte[i, TOK + t] = 1.0
        w.lm_head[i, OUT + t] = LOGIT_SCALE
    for p in range(N_CTX):
        w.wpe[p, POS + p] = 1.0


def _copy(rows_from: int, rows_to: int, n: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Value [D, D_HEAD] and output [D_HEAD, D] matrices copying n features from one
    subspace to another through head dims 0..n-1."""
    v, o = torch.zeros(D, D_HEAD), torch.zeros(D_HEAD, D)
    for t in range(n):
        v[rows_from + t, t] = 1.0
        o[t, rows_to + t] = scale
    return v, o


INDUCTION_WORDS = V.NONSENSE[:30]
NAME_WORDS = V.NAMES[:10]
CLASS_WORDS = V.NAMES[:10] + ["said", "the"]


def _induction(w: _Weights, n: int, backup: bool = False) -> None:
    # L0.H0 (and with `backup` also L0.H3): previous-token head. Query at i points at
    # position i-1; value copies TOK to PREV.
    q, k = torch.zeros(D, D_HEAD), torch.zeros(D, D_HEAD)
    for i in range(1, N_CTX):
        q[POS + i, i - 1] = 8 * 12.0
    for j in range(N_CTX):
        k[POS + j, j] = 1.0
    v, o = _copy(TOK, PREV, n)
    for h in ((0, 3) if backup else (0,)):
        w.head(0, h, q=q, k=k, v=v, o=o)
    # L1.H1: induction head. Query = current token, key = previous token; BOS as the default.
    q, k = torch.zeros(D, D_HEAD), torch.zeros(D, D_HEAD)
    for t in range(n):
        q[TOK + t, t] = 8 * 12.0
        k[PREV + t, t] = 1.0
    q[CONST, D_HEAD - 1] = 8 * 6.0
    k[POS + 0, D_HEAD - 1] = 1.0
    v, o = _copy(TOK, OUT, n)
    w.head(1, 1, q=q, k=k, v=v, o=o)
    for l, h in ((0, 1), (0, 2)) + (() if backup else ((0, 3),)) + ((1, 2), (1, 3)):
        w.distractor_head(l, h)
    w.confounder_head(1, 0)
    for l in range(2):
        w.noise_mlp(l)


def _names(w: _Weights, n: int) -> None:
    # L0.H2: duplicate-token head. Score 12 for an earlier copy of the current name, 0 for
    # itself (the position term cancels it), 9 for BOS; the value is 1 except at BOS -> DUP.
    q, k, v, o = torch.zeros(D, D_HEAD), torch.zeros(D, D_HEAD), torch.zeros(D, D_HEAD), torch.zeros(D_HEAD, D)
    for t in range(n):
        q[TOK + t, t] = 8 * 12.0
        k[TOK + t, t] = 1.0
    for i in range(N_CTX):
        q[POS + i, n + i] = -8 * 12.0
        k[POS + i, n + i] = 1.0
    q[CONST, D_HEAD - 1] = 8 * 9.0
    k[POS + 0, D_HEAD - 1] = 1.0
    v[CONST, 0], v[POS + 0, 0] = 1.0, -1.0
    o[0, DUP] = 1.0
    w.head(0, 2, q=q, k=k, v=v, o=o)
    # L1.H1: S-inhibition head. Attends to the duplicated name (DUP), BOS otherwise; copies
    # the name's identity into PREV (here: the inhibited name).
    q, k = torch.zeros(D, D_HEAD), torch.zeros(D, D_HEAD)
    q[CONST, D_HEAD - 1] = 8 * 12.0
    k[DUP, D_HEAD - 1] = 1.0
    q[CONST, D_HEAD - 2] = 8 * 6.0
    k[POS + 0, D_HEAD - 2] = 1.0
    v, o = _copy(TOK, PREV, n)
    w.head(1, 1, q=q, k=k, v=v, o=o)
    # L2.H3: name mover. Score 10 for a name, -10 for the inhibited one, 0 otherwise; copies
    # the attended name into OUT.
    q, k = torch.zeros(D, D_HEAD), torch.zeros(D, D_HEAD)
    for t in range(n):
        q[CONST, t] = 8 * 10.0
        q[PREV + t, t] = -8 * 20.0
        k[TOK + t, t] = 1.0
    v, o = _copy(TOK, OUT, n)
    w.head(2, 3, q=q, k=k, v=v, o=o)
    for l, h in ((0, 0), (0, 1), (0, 3), (1, 2), (1, 3), (2, 1), (2, 2)):
        w.distractor_head(l, h)
    w.confounder_head(2, 0)
    w.confounder_head(1, 0)
    for l in range(3):
        w.noise_mlp(l)


def _class_neuron(w: _Weights, n_names: int, said: int, the: int) -> None:
    for l in range(2):
        w.noise_mlp(l)
    # L0.N5: pre-activation 2 on a name, -2 otherwise; writes 'said' over 'the'
    w.fc[0][:, 5] = 0.0
    for t in range(n_names):
        w.fc[0][TOK + t, 5] = 4.0
    w.fc_b[0][5] = -2.0
    w.mlp_out[0][5, OUT + said] = 0.5
    w.mlp_out[0][5, OUT + the] = -0.5
    for l, h in ((0, 0), (0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)):
        w.distractor_head(l, h)
    w.confounder_head(1, 0)


def build_case(name: str, root: str | Path, seed: int = 0) -> ConstructedCase:
    """Write the case's model (HF folder) under root/name and return its ground truth."""
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    if name == "induction":
        words, layers = INDUCTION_WORDS, 2
        w = _Weights(layers, len(tok), seed)
        _embed(w, tok, words)
        _induction(w, len(words))
        case = ConstructedCase(name=name, model_dir=str(folder), n_layers=layers, words=words,
                               description="previous-token head L0.H0 -> induction head L1.H1; random distractor "
                                           "heads; confounder L1.H0 (constant write to the logits)",
                               nodes=["L0.H0", "L1.H1"], edges=[("L0.H0", "L1.H1"), ("L1.H1", "LOGITS")])
    elif name == "induction_backup":
        words, layers = INDUCTION_WORDS, 2
        w = _Weights(layers, len(tok), seed)
        _embed(w, tok, words)
        _induction(w, len(words), backup=True)
        case = ConstructedCase(name=name, model_dir=str(folder), n_layers=layers, words=words,
                               description="previous-token heads L0.H0 and L0.H3 (either alone suffices) -> induction "
                                           "head L1.H1; random distractor heads; confounder L1.H0",
                               nodes=["L0.H0", "L0.H3", "L1.H1"],
                               edges=[("L0.H0", "L1.H1"), ("L0.H3", "L1.H1"), ("L1.H1", "LOGITS")])
    elif name == "names":
        words, layers = NAME_WORDS, 3
        w = _Weights(layers, len(tok), seed)
        _embed(w, tok, words)
        _names(w, len(words))
        case = ConstructedCase(name=name, model_dir=str(folder), n_layers=layers, words=words,
                               description="IOI-like: duplicate-token head L0.H2 -> S-inhibition L1.H1 -> name "
                                           "mover L2.H3 (copies the name); random distractor heads; confounders "
                                           "L1.H0, L2.H0",
                               nodes=["L0.H2", "L1.H1", "L2.H3"],
                               edges=[("L0.H2", "L1.H1"), ("L1.H1", "L2.H3"), ("L2.H3", "LOGITS")])
    elif name == "class_neuron":
        words, layers = CLASS_WORDS, 2
        w = _Weights(layers, len(tok), seed)
        _embed(w, tok, words)
        _class_neuron(w, len(NAME_WORDS), words.index("said"), words.index("the"))
        case = ConstructedCase(name=name, model_dir=str(folder), n_layers=layers, words=words,
                               description="MLP neuron L0.N5 fires on names and writes 'said' over 'the'; random "
                                           "distractor heads and neurons; confounder L1.H0",
                               nodes=["L0.MLP"], edges=[("L0.MLP", "LOGITS")], neurons=["L0.N5"])
    else:
        raise ValueError(f"unknown constructed case {name!r}; cases: {', '.join(CASES)}")
    w.save(folder, tok)
    (folder / "ground_truth.json").write_text(case.model_dump_json(indent=1))
    return case


# --------------------------------------------------------------------------- prompt pairs

FILLER = ["the", "a", "and", "then", "was", "store", "park", "book", "ball", "red", "green", "went"]


def case_pairs(name: str, n: int, seed: int = 0) -> list[PromptPair]:
    """Prompt pairs of a case: the corrupted prompt removes what makes the target right."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if name in ("induction", "induction_backup"):
            L = rng.randint(4, 10)
            words = rng.sample(INDUCTION_WORDS, 2 * L)
            seg, other = words[:L], words[L:]
            k = rng.randint(1, L - 1)
            target = seg[k]
            distractor = rng.choice([w for w in seg if w not in (target, seg[k - 1])] or other)
            clean = seg + seg[:k]
            corrupt = other[:L - 1] + [rng.choice([w for w in INDUCTION_WORDS if w not in seg + other])] + seg[:k]
            out.append(PromptPair(prompt=" ".join(clean), corrupted_prompt=" ".join(corrupt), target=target,
                                  distractor=distractor))
        elif name == "names":
            a, b, c = rng.sample(NAME_WORDS, 3)
            t = rng.choice(IOI_TEMPLATES)
            fill = {"place": rng.choice(V.PLACES), "obj": rng.choice(V.OBJECTS)}
            out.append(PromptPair(prompt=t.format(A=a, B=b, S=b, **fill),
                                  corrupted_prompt=t.format(A=a, B=b, S=c, **fill), target=a, distractor=b))
        elif name == "class_neuron":
            L = rng.randint(3, 10)
            ctx = [rng.choice(FILLER) for _ in range(L)]
            out.append(PromptPair(prompt=" ".join(ctx + [rng.choice(NAME_WORDS)]),
                                  corrupted_prompt=" ".join(ctx + [rng.choice(V.OBJECTS)]), target="said",
                                  distractor="the"))
        else:
            raise ValueError(name)
    return out


def load_case(folder: str | Path) -> ConstructedCase:
    return ConstructedCase(**json.loads((Path(folder) / "ground_truth.json").read_text()))
