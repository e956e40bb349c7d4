"""Train per-layer skip transcoders of the bundled model's MLPs on the CPU.

    nohup python tools/train_transcoders.py > /tmp/train_transcoders.log 2>&1 &

Each transcoder reads the MLP input of its layer (`blocks.{l}.ln2.hook_normalized`) and
predicts the MLP output (`blocks.{l}.hook_mlp_out`): TopK features plus a linear skip
term, f = topk(x W_enc + b_enc), y ~ f W_dec + b_dec + x W_skip. One model pass feeds every
layer's transcoder. Inputs and outputs are divided by per-layer scales during training,
folded back into the weights on export. Features that have not fired for `--dead-window`
tokens are pointed at the worst-reconstructed outputs (first `--resample-until` of training);
`--k-aux N` adds an AuxK loss on them and `--lr-decay` decays the learning rate at the end
(tried, held-out: `--k-aux 128 --dead-window 20000` left 20.7% dead features instead of
39.5%, with worse FVU on 3 of 4 layers and 50% dead on L1; adding `--resample-until 0.97
--lr-decay` left 13.1% dead (L0 7.4%, L1 37.3%, L2 0%, L3 7.8%) with FVU 0.021 / 0.091 /
0.029 / 0.011 against the shipped 0.015 / 0.030 / 0.053 / 0.001: not shipped, L1 is worse
on both counts; those runs, and the 512-feature transcoders shipped before, resampled with
a bug since fixed: Adam's moments were zeroed for whole parameters, not the resampled
features', so every resampling kicked every weight). Position 0 (BOS) is left out.

Fact answers ('The people of Zorvia speak' -> its language) are about 0.3 % of the corpus's
tokens, and there the MLPs recall memorised facts: a corpus-trained transcoder leaves most
of those outputs to its error term (the card's "FVU at fact answers"), so an attribution
graph of a fact prompt finds the answer in error nodes. `--extra-facts N` adds N fact
sentences to every batch (from `--extra-facts-from` tokens on).

Checkpoints to `--ckpt` every `--ckpt-every` steps and resumes from it. At the end it
evaluates the float16 export on held-out documents (FVU of the MLP output, mean L0, dead
features) and writes `<out>/L{l}/` (SAELens skip_transcoder layout) plus README.md and
metrics.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
from train_saes import HELDOUT_SEED, token_batches  # noqa: E402

from tdb_agent.datasets.components import model_fingerprint  # noqa: E402
from tdb_agent.engine import Engine  # noqa: E402
from tdb_agent.engine.transcoder import LayerTranscoder, TranscoderSet, load_transcoders  # noqa: E402
from tdb_agent.tasks.generators import facts_document  # noqa: E402

TRAIN_SEED = 930_000_000
FACTS_SEED = 940_000_000


@torch.no_grad()
def mlp_io(engine: Engine, ids, mask):
    n = engine.spec.n_layers
    sites = [f"blocks.{l}.ln2.hook_normalized" for l in range(n)] + [f"blocks.{l}.hook_mlp_out" for l in range(n)]
    _, acts = engine.run_with_cache(ids, sites, logit_positions=[-1], logit_ids=[0])
    return [(acts[sites[l]][mask].float(), acts[sites[n + l]][mask].float()) for l in range(n)]


class Trainer(torch.nn.Module):
    def __init__(self, d: int, n: int, k: int, b_dec: torch.Tensor, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(n, d, generator=g)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_enc = torch.nn.Parameter(w.T.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(n))
        self.W_dec = torch.nn.Parameter(w.clone() * 0.1)
        self.b_dec = torch.nn.Parameter(b_dec.clone())
        self.W_skip = torch.nn.Parameter(torch.zeros(d, d))
        self.k = k

    def forward(self, x):
        pre = x @ self.W_enc + self.b_enc
        top = pre.topk(self.k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        return f @ self.W_dec + self.b_dec + x @ self.W_skip, f

    def aux_loss(self, x, err, dead, k_aux: int):
        """AuxK (Gao et al. 2024): the top `k_aux` dead features' pre-activations must
        reconstruct the main reconstruction's error, so gradient reaches features that never fire."""
        n_dead = int(dead.sum())
        if not n_dead or not k_aux:
            return torch.zeros((), device=x.device)
        pre = (x @ self.W_enc + self.b_enc).masked_fill(~dead, float("-inf"))
        top = pre.topk(min(k_aux, n_dead), dim=-1)
        fa = torch.zeros_like(pre).scatter(-1, top.indices, top.values)  # no ReLU: dead pre-activations are < 0
        err = err.detach()
        return (err - fa @ self.W_dec).pow(2).sum(-1).mean() / err.pow(2).sum(-1).mean().clamp(min=1e-8)

    @torch.no_grad()
    def resample(self, dead, x, y, opt, gen) -> int:
        idx = dead.nonzero().squeeze(1)
        if idx.numel() == 0:
            return 0
        err = y - self(x)[0]
        w = err.pow(2).sum(-1)
        pick = torch.multinomial(w / w.sum(), idx.numel(), replacement=idx.numel() > len(w), generator=gen)
        xin = x[pick] / x[pick].norm(dim=-1, keepdim=True).clamp(min=1e-8)
        alive = self.W_enc[:, ~dead].norm(dim=0).mean() if (~dead).any() else torch.tensor(1.0)
        # a fifth of the live encoders' norm (Bricken et al. 2023): at full norm the new
        # features win TopK on most tokens at once and push live ones out for several steps
        self.W_enc[:, idx] = xin.T * alive * 0.2
        self.b_enc[idx] = 0.0
        self.W_dec[idx] = err[pick] / err[pick].norm(dim=-1, keepdim=True).clamp(min=1e-8) * 0.1
        # Adam's moments are reset for the resampled features only: zeroing a whole
        # parameter's moments makes the next step about 3 lr * sign(grad) on every weight
        # (bias correction is ~1 by then), a shock to the live features every resampling
        for p, sel in ((self.W_enc, (slice(None), idx)), (self.b_enc, (idx,)), (self.W_dec, (idx,))):
            st = opt.state.get(p)
            if st:
                st["exp_avg"][sel] = 0
                st["exp_avg_sq"][sel] = 0
        return idx.numel()

    def export(self, layer: int, sx: float, sy: float) -> LayerTranscoder:
        d = lambda t: t.detach().clone()  # noqa: E731
        return LayerTranscoder(layer, d(self.W_enc) / sx, d(self.b_enc), d(self.W_dec)[:, None] * sy, d(self.b_dec) * sy,
                               d(self.W_skip) * sy / sx, None, self.k)


def fact_batch(engine: Engine, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` fact sentences (ids, mask without BOS), the extra ones of `--extra-facts`."""
    rng = random.Random(seed)
    bos = engine.tokenizer.bos_token_id
    docs = [facts_document(rng) for _ in range(n)]
    toks = [[bos] + engine.tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    ids = torch.full((n, max(map(len, toks))), bos, dtype=torch.long)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, t in enumerate(toks):
        ids[i, : len(t)] = torch.tensor(t)
        mask[i, 1: len(t)] = True
    return ids, mask


def reconstruct(tc: LayerTranscoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = tc.encode(x)
    return f @ tc.W_dec[:, 0] + tc.b_dec + tc.skip(x), f


@torch.no_grad()
def fact_answer_fvu(engine: Engine, tcs: TranscoderSet, n_docs: int = 600) -> list[float]:
    """FVU of each MLP output at the position that predicts a fact's answer ('... speak' ->
    language, '... is' -> capital) over held-out fact sentences. These positions are rare in
    the corpus (about 0.3 % of tokens) and their MLPs recall memorised facts, so the
    corpus-wide FVU says little about them; attribution graphs of fact prompts rest on them."""
    ids, mask = fact_batch(engine, n_docs, HELDOUT_SEED)
    length = mask.sum(1) + 1  # with BOS; a fact document ends '<answer> .'
    mask = torch.zeros_like(mask)
    mask[torch.arange(n_docs), length - 3] = True
    out = []
    for l, (x, y) in enumerate(mlp_io(engine, ids, mask)):
        rec, _ = reconstruct(tcs.layers[l], x)
        out.append(float((y - rec).double().pow(2).sum() / (y - y.mean(0)).double().pow(2).sum()))
    return out


@torch.no_grad()
def evaluate(engine: Engine, tcs: TranscoderSet, n_tokens: int) -> list[dict]:
    n_l = engine.spec.n_layers
    err, s1, s2, l0, n = [0.0] * n_l, [0.0] * n_l, [0.0] * n_l, [0.0] * n_l, 0
    s1 = [torch.zeros(engine.spec.d_model, dtype=torch.float64) for _ in range(n_l)]
    fired = {l: torch.zeros(tc.d_tc, dtype=torch.bool) for l, tc in tcs.layers.items()}
    for ids, mask in token_batches(engine, HELDOUT_SEED, 64):
        for l, (x, y) in enumerate(mlp_io(engine, ids, mask)):
            rec, f = reconstruct(tcs.layers[l], x)
            err[l] += (y - rec).double().pow(2).sum().item()
            s1[l] += y.double().sum(0)
            s2[l] += y.double().pow(2).sum().item()
            l0[l] += (f != 0).sum().item()
            fired[l] |= (f != 0).any(0)
        n += int(mask.sum())
        if n >= n_tokens:
            break
    facts = fact_answer_fvu(engine, tcs)
    return [{"fvu": err[l] / (s2[l] - s1[l].pow(2).sum().item() / n), "mean_l0": l0[l] / n,
             "dead_fraction": 1 - fired[l].float().mean().item(), "eval_tokens": n,
             "fact_answer_fvu": facts[l]} for l in range(n_l)]


CARD = """# Transcoders of the bundled model (tdb-tiny)

Per-layer skip transcoders of every MLP: features read the MLP input
(`blocks.{{l}}.ln2.hook_normalized`) and write the MLP output (`blocks.{{l}}.hook_mlp_out`),
y = topk(x W_enc + b_enc) W_dec + b_dec + x W_skip. Component ids `L{{l}}.tc.F{{i}}`.
SAELens `skip_transcoder` folder layout (`cfg.json` + `sae_weights.safetensors`, float16;
`k` in cfg.json marks TopK). Trained by `tools/train_transcoders.py` on {train_tokens:,}
tokens of the synthetic corpus, {steps} steps, Adam lr {lr}{recipe}. Spliced into the model they
keep their error term, so outputs are exact; attribution graphs (`tdb_agent/ops/graph`) use
them as the replacement model's MLPs.

Held-out evaluation ({eval_tokens:,} tokens, the shipped float16 weights); FVU is of the
MLP output. "FVU at fact answers": over 600 held-out fact sentences, at the position that
predicts the answer ('The people of Zorvia speak' -> its language), where the MLPs recall
memorised facts; an attribution graph of a fact prompt leans on these positions:

| layer | features | k | FVU | mean L0 | dead features | FVU at fact answers |
|---|---|---|---|---|---|---|
{rows}

Reproduce: `python tools/train_transcoders.py --eval-only`.
"""


def recipe(args) -> str:
    """The card's words for the dead-feature measures that were on."""
    out = " (decayed to 0 over the last 20%)" if args.lr_decay else ""
    out += f"; features dead for {args.dead_window:,} tokens resampled during the first {args.resample_until:.0%}"
    if args.extra_facts:
        out += (f"; from {args.extra_facts_from:,} tokens on, each batch of {args.docs_per_batch} corpus documents "
                f"gets {args.extra_facts} extra fact sentences (the corpus has 7% fact documents)")
    if args.k_aux:
        out += f", and AuxK on them (k_aux {args.k_aux}, coefficient {args.aux_coef:.4g})"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tdb_agent/assets/transcoders")
    ap.add_argument("--features", type=int, default=1024)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=600_000)
    ap.add_argument("--docs-per-batch", type=int, default=48)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dead-window", type=int, default=50_000)
    ap.add_argument("--resample-until", type=float, default=0.9, help="resample dead features during this share "
                    "of training")
    ap.add_argument("--k-aux", type=int, default=0, help="AuxK (off at 0): this many dead features model the "
                    "error")
    ap.add_argument("--aux-coef", type=float, default=1 / 32)
    ap.add_argument("--lr-decay", action="store_true", help="decay lr linearly to 0 over the last 20%%")
    ap.add_argument("--extra-facts", type=int, default=0, help="this many extra fact sentences per batch: "
                    "the corpus's fact answers are ~0.3%% of tokens, too rare for TopK features to cover")
    ap.add_argument("--extra-facts-from", type=int, default=0, help="add them once this many tokens are seen")
    ap.add_argument("--eval-tokens", type=int, default=50_000)
    ap.add_argument("--ckpt", default="/tmp/train_transcoders.ckpt.pt")
    ap.add_argument("--ckpt-every", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    engine = Engine.load(None, device="cpu")
    n_l = engine.spec.n_layers
    out = Path(args.out)
    if args.eval_only:
        print(json.dumps(evaluate(engine, load_transcoders(out), args.eval_tokens), indent=2))
        return
    batches = token_batches(engine, TRAIN_SEED, args.docs_per_batch)
    ckpt = Path(args.ckpt)
    ids, mask = next(batches)
    first = mlp_io(engine, ids, mask)
    sx = [(x.pow(2).sum(-1).mean() / x.shape[1]).sqrt().item() for x, _ in first]
    sy = [(y.pow(2).sum(-1).mean() / y.shape[1]).sqrt().item() for _, y in first]
    trainers = [Trainer(engine.spec.d_model, args.features, args.k, (y / sy[l]).mean(0), l)
                for l, (_, y) in enumerate(first)]
    opts = [torch.optim.Adam(t.parameters(), lr=args.lr) for t in trainers]
    since = [torch.zeros(args.features, dtype=torch.long) for _ in trainers]
    step, seen = 0, 0
    if ckpt.exists():
        st = torch.load(ckpt, weights_only=True)
        if st.get("model_fingerprint") != model_fingerprint(engine):
            raise SystemExit(f"{ckpt} was written for another model; delete it to start over")
        for l in range(n_l):
            trainers[l].load_state_dict(st["trainers"][l])
            opts[l].load_state_dict(st["opts"][l])
        since, step, seen, sx, sy = list(st["since"]), int(st["step"]), int(st["seen"]), st["sx"], st["sy"]
        for _ in range(step):
            next(batches)
        print(f"resumed at step {step} ({seen:,} tokens)", flush=True)
    gen = torch.Generator().manual_seed(1)
    t0 = time.time()
    while seen < args.tokens:
        io = mlp_io(engine, *next(batches))
        if args.extra_facts and seen >= args.extra_facts_from:
            extra = mlp_io(engine, *fact_batch(engine, args.extra_facts, FACTS_SEED + step))
            io = [(torch.cat([x, ex]), torch.cat([y, ey])) for (x, y), (ex, ey) in zip(io, extra)]
        step += 1
        seen += io[0][0].shape[0]
        msg = []
        frac = seen / args.tokens
        for opt in opts:  # linear decay to 0 over the last 20 %
            for grp in opt.param_groups:
                grp["lr"] = args.lr * (min(1.0, 5 * (1 - frac)) if args.lr_decay else 1.0)
        for l, ((x, y), t, opt) in enumerate(zip(io, trainers, opts)):
            x, y = x / sx[l], y / sy[l]
            rec, f = t(x)
            loss = (y - rec).pow(2).sum(-1).mean() / (y - y.mean(0)).pow(2).sum(-1).mean()
            aux = t.aux_loss(x, y - rec, since[l] >= args.dead_window, args.k_aux)
            opt.zero_grad()
            (loss + args.aux_coef * aux).backward()
            opt.step()
            fired = (f != 0).any(0)
            since[l] = torch.where(fired, torch.zeros_like(since[l]), since[l] + x.shape[0])
            dead = since[l] >= args.dead_window
            if seen < args.resample_until * args.tokens and step % 25 == 0 and dead.any():
                t.resample(dead, x, y, opt, gen)
                since[l][dead] = 0
            msg.append(f"L{l} fvu {loss.item():.3f} aux {aux.item():.2f} dead {int(dead.sum())}")
        if step % 5 == 0:
            print(f"step {step} tokens {seen:,} ({seen / (time.time() - t0):.0f}/s) " + " | ".join(msg), flush=True)
        if step % args.ckpt_every == 0:
            torch.save({"trainers": [t.state_dict() for t in trainers], "opts": [o.state_dict() for o in opts],
                        "since": since, "step": step, "seen": seen, "sx": sx, "sy": sy,
                        "model_fingerprint": model_fingerprint(engine)}, ckpt)
    tcs = TranscoderSet({l: t.export(l, sx[l], sy[l]) for l, t in enumerate(trainers)}, "mlp_in", n_l)
    tcs.save(out, model_name="tdb-tiny", dtype=torch.float16)
    shipped = load_transcoders(out)
    metrics = evaluate(engine, shipped, args.eval_tokens)
    rows = "\n".join(f"| L{l} | {args.features} | {args.k} | {m['fvu']:.3f} | {m['mean_l0']:.1f} | "
                     f"{m['dead_fraction']:.1%} | {m['fact_answer_fvu']:.3f} |" for l, m in enumerate(metrics))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "README.md").write_text(CARD.format(train_tokens=seen, steps=step, lr=args.lr, recipe=recipe(args),
                                               eval_tokens=metrics[0]["eval_tokens"], rows=rows))
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
