"""Train the bundled model's SAEs (TopK, residual stream after every layer) on the CPU.

    nohup python tools/train_saes.py > /tmp/train_saes.log 2>&1 &

One pass of the model over fresh synthetic-corpus documents feeds all layers' SAEs at
once (no activation store on disk). TopK (Gao et al. 2024) with an AuxK loss, and latents
dead for `--dead-window` tokens resampled toward badly reconstructed inputs; decoder rows
kept at unit norm. Inputs are divided by a per-layer scale during
training, which is folded back into the weights on export, so the shipped SAEs take raw
activations (`normalize_activations: none`). Position 0 (BOS, the same vector in every
document) is left out of training and evaluation.

Checkpoints to `--ckpt` every `--ckpt-every` steps and resumes from it. At the end it
evaluates the fp16 export on held-out documents (fraction of variance unexplained, mean
L0, dead latents) and writes `<out>/L{l}.resid/` (SAELens layout) plus `<out>/README.md`
and `<out>/metrics.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tdb_agent.datasets.components import model_fingerprint
from tdb_agent.engine import Engine
from tdb_agent.engine.sae import SAE, SAEConfig
from tdb_agent.engine.tokens import with_bos
from tdb_agent.tasks import corpus_documents

TRAIN_SEED = 910_000_000  # corpus seeds far from the model's training blocks (seed * 100003 + block)
HELDOUT_SEED = 920_000_000


def token_batches(engine: Engine, seed: int, docs_per_batch: int):
    """Yield (ids [b, s], mask [b, s]) of whole documents padded with BOS; mask is False on
    padding and on position 0."""
    bos = engine.tokenizer.bos_token_id
    block = 0
    while True:
        docs = corpus_documents(docs_per_batch, seed=seed + block)
        block += 1
        toks = [with_bos(engine.tokenizer, engine.tokenizer(d, add_special_tokens=False)["input_ids"]) for d in docs]
        toks = [t[: engine.spec.n_ctx] for t in toks]
        s = max(map(len, toks))
        ids = torch.full((len(toks), s), bos if bos is not None else 0, dtype=torch.long)
        mask = torch.zeros(len(toks), s, dtype=torch.bool)
        for i, t in enumerate(toks):
            ids[i, : len(t)] = torch.tensor(t)
            mask[i, 1: len(t)] = True
        yield ids, mask


@torch.no_grad()
def resid_acts(engine: Engine, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    sites = [f"blocks.{l}.hook_resid_post" for l in range(engine.spec.n_layers)]
    _, acts = engine.run_with_cache(ids, sites, logit_positions=[-1], logit_ids=[0])
    return [acts[s][mask].float() for s in sites]


class TopKTrainer(torch.nn.Module):
    def __init__(self, d_in: int, d_sae: int, k: int, b_dec: torch.Tensor, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(d_sae, d_in, generator=g)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(w.clone())
        self.W_enc = torch.nn.Parameter(w.T.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_dec = torch.nn.Parameter(b_dec.clone())
        self.k = k

    def forward(self, x: torch.Tensor, dead: torch.Tensor, k_aux: int):
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        top = pre.topk(self.k, dim=-1)
        vals = torch.relu(top.values)
        f = torch.zeros_like(pre).scatter(-1, top.indices, vals)
        recon = f @ self.W_dec + self.b_dec
        err = x - recon
        loss = err.pow(2).sum(-1).mean()
        aux = torch.zeros((), device=x.device)
        n_dead = int(dead.sum())
        if n_dead and k_aux:
            dead_pre = pre.masked_fill(~dead, float("-inf"))
            ta = dead_pre.topk(min(k_aux, n_dead), dim=-1)
            # no ReLU here: dead latents' pre-activations are negative, and the gradient must reach them
            fa = torch.zeros_like(pre).scatter(-1, ta.indices, ta.values)
            err_hat = fa @ self.W_dec
            aux = (err.detach() - err_hat).pow(2).sum(-1).mean() / err.detach().pow(2).sum(-1).mean().clamp(min=1e-8)
        return loss, aux, f

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp(min=1e-8)

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Keep decoder rows on the unit sphere: drop the gradient component along each row."""
        if self.W_dec.grad is not None:
            w = self.W_dec
            self.W_dec.grad -= (self.W_dec.grad * w).sum(1, keepdim=True) * w

    @torch.no_grad()
    def resample(self, dead: torch.Tensor, x: torch.Tensor, opt: torch.optim.Optimizer, gen: torch.Generator) -> int:
        """Point dead latents at inputs the SAE reconstructs worst (drawn with probability
        proportional to the squared error): decoder row = that error direction, encoder
        column = the same direction at the alive latents' mean encoder norm, b_enc = 0, and
        their Adam moments reset."""
        idx = dead.nonzero().squeeze(1)
        if idx.numel() == 0:
            return 0
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        top = pre.topk(self.k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        err = x - (f @ self.W_dec + self.b_dec)
        w = err.pow(2).sum(-1)
        pick = torch.multinomial(w / w.sum(), idx.numel(), replacement=idx.numel() > len(w), generator=gen)
        dirs = err[pick] / err[pick].norm(dim=-1, keepdim=True).clamp(min=1e-8)
        alive_norm = self.W_enc[:, ~dead].norm(dim=0).mean() if (~dead).any() else torch.tensor(1.0)
        self.W_dec[idx] = dirs
        self.W_enc[:, idx] = dirs.T * alive_norm
        self.b_enc[idx] = 0.0
        for p, sel in ((self.W_dec, (idx, slice(None))), (self.W_enc, (slice(None), idx)), (self.b_enc, (idx,))):
            st = opt.state.get(p)
            if st:
                st["exp_avg"][sel] = 0.0
                st["exp_avg_sq"][sel] = 0.0
        return idx.numel()

    def export(self, scale: float, hook_name: str, model_name: str) -> SAE:
        """SAE on raw activations: trained on x / scale, so W_enc / scale, W_dec and b_dec * scale."""
        cfg = SAEConfig(d_in=self.W_enc.shape[0], d_sae=self.W_enc.shape[1], hook_name=hook_name,
                        architecture="topk", k=self.k, apply_b_dec_to_input=True, normalize_activations="none",
                        model_name=model_name)
        w = {"W_enc": self.W_enc.detach() / scale, "b_enc": self.b_enc.detach(),
             "W_dec": self.W_dec.detach() * scale, "b_dec": self.b_dec.detach() * scale}
        return SAE(cfg, w)


@torch.no_grad()
def evaluate(engine: Engine, saes: list[SAE], n_tokens: int, seed: int = HELDOUT_SEED) -> list[dict]:
    """FVU, mean L0 and dead fraction per SAE on held-out documents (position 0 excluded)."""
    sq_err = [0.0] * len(saes)
    s1 = [torch.zeros(engine.spec.d_model, dtype=torch.float64) for _ in saes]
    s2 = [0.0] * len(saes)
    l0 = [0.0] * len(saes)
    fired = [torch.zeros(s.d_sae, dtype=torch.bool) for s in saes]
    n = 0
    for ids, mask in token_batches(engine, seed, 64):
        acts = resid_acts(engine, ids, mask)
        for i, (sae, x) in enumerate(zip(saes, acts)):
            f = sae.encode(x)
            sq_err[i] += (x - sae.decode(f)).double().pow(2).sum().item()
            s1[i] += x.double().sum(0)
            s2[i] += x.double().pow(2).sum().item()
            l0[i] += (f != 0).sum().item()
            fired[i] |= (f != 0).any(0)
        n += acts[0].shape[0]
        if n >= n_tokens:
            break
    out = []
    for i in range(len(saes)):
        total_var = s2[i] - (s1[i].pow(2).sum().item() / n)
        out.append({"fvu": sq_err[i] / total_var, "mean_l0": l0[i] / n,
                    "dead_fraction": 1 - fired[i].float().mean().item(), "eval_tokens": n})
    return out


CARD = """# SAEs of the bundled model (tdb-tiny)

TopK sparse autoencoders on the residual stream after every layer
(`blocks.{{l}}.hook_resid_post`, component ids `L{{l}}.resid.F{{i}}`), in the SAELens folder
layout (`cfg.json` + `sae_weights.safetensors`, float16). Trained by
`tools/train_saes.py` on {train_tokens:,} tokens of the synthetic corpus (documents from
seeds {train_seed}+), {steps} steps of {batch_tokens} tokens, Adam lr {lr}, AuxK on dead
latents and resampling of latents dead for 200k tokens during the first 75% of training.
The BOS position (identical in every document) is excluded from training and
evaluation; spliced into the model the SAEs keep their error term, so outputs are exact.

Held-out evaluation ({eval_tokens:,} tokens of documents from seeds {heldout_seed}+, the
shipped float16 weights), checked by `tests/test_sae_assets.py`:

| SAE | d_sae | k | FVU | mean L0 | dead latents |
|---|---|---|---|---|---|
{rows}

Targets: FVU <= 0.15, mean L0 <= 40, dead latents <= 10%.
Reproduce the numbers: `python tools/train_saes.py --eval-only`.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    ap.add_argument("--out", default="tdb_agent/assets/saes")
    ap.add_argument("--d-sae", type=int, default=1024)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--k-aux", type=int, default=256)
    ap.add_argument("--aux-coef", type=float, default=1 / 32)
    ap.add_argument("--tokens", type=int, default=2_000_000)
    ap.add_argument("--docs-per-batch", type=int, default=96, help="documents per model pass (~4k tokens)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dead-window", type=int, default=200_000, help="tokens without firing = dead")
    ap.add_argument("--eval-tokens", type=int, default=100_000)
    ap.add_argument("--resample-every", type=int, default=25, help="steps between resampling dead latents "
                    "(during the first 75%% of training; 0: never)")
    ap.add_argument("--ckpt", default="/tmp/train_saes.ckpt.pt")
    ap.add_argument("--ckpt-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-only", action="store_true", help="evaluate the SAEs in --out and print")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    engine = Engine.load(args.model, device="cpu")
    n_layers = engine.spec.n_layers
    out = Path(args.out)
    if args.eval_only:
        saes = [SAE.load(out / f"L{l}.resid") for l in range(n_layers)]
        print(json.dumps(evaluate(engine, saes, args.eval_tokens), indent=2))
        return

    batches = token_batches(engine, TRAIN_SEED, args.docs_per_batch)
    ckpt = Path(args.ckpt)
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        if state.get("model_fingerprint") != model_fingerprint(engine):
            raise SystemExit(f"{ckpt} was written for another model; delete it to start over")
        scales = state["scales"].tolist()
        trainers = [TopKTrainer(engine.spec.d_model, args.d_sae, args.k, torch.zeros(engine.spec.d_model), l)
                    for l in range(n_layers)]
        for l, t in enumerate(trainers):
            t.load_state_dict(state["trainers"][l])
        opts = [torch.optim.Adam(t.parameters(), lr=args.lr) for t in trainers]
        for l, o in enumerate(opts):
            o.load_state_dict(state["opts"][l])
        since_fired = list(state["since_fired"])
        step, seen = int(state["step"]), int(state["seen"])
        for _ in range(step + 1):  # skip the batches already used (the first one set the scales)
            next(batches)
        print(f"resumed at step {step} ({seen:,} tokens)", flush=True)
    else:
        ids, mask = next(batches)
        first = resid_acts(engine, ids, mask)
        # scale so that E||x||^2 = d_in; b_dec starts at the mean
        scales = [(x.pow(2).sum(-1).mean() / x.shape[1]).sqrt().item() for x in first]
        trainers = [TopKTrainer(engine.spec.d_model, args.d_sae, args.k, (x / s).mean(0), l)
                    for l, (x, s) in enumerate(zip(first, scales))]
        opts = [torch.optim.Adam(t.parameters(), lr=args.lr) for t in trainers]
        since_fired = [torch.zeros(args.d_sae, dtype=torch.long) for _ in trainers]
        step, seen = 0, 0
    t0 = time.time()
    seen0 = seen
    while seen < args.tokens:
        ids, mask = next(batches)
        acts = resid_acts(engine, ids, mask)
        step += 1
        n = acts[0].shape[0]
        seen += n
        frac = seen / args.tokens
        lr = args.lr * min(1.0, 5 * (1 - frac)) if frac > 0.8 else args.lr
        logs = []
        for l, (t, o, x) in enumerate(zip(trainers, opts, acts)):
            for grp in o.param_groups:
                grp["lr"] = lr
            dead = since_fired[l] > args.dead_window
            loss, aux, f = t(x / scales[l], dead, args.k_aux)
            o.zero_grad(set_to_none=True)
            (loss + args.aux_coef * aux).backward()
            t.remove_parallel_grad()
            o.step()
            t.normalise_decoder()
            fired = (f != 0).any(0)
            since_fired[l] = torch.where(fired, torch.zeros_like(since_fired[l]), since_fired[l] + n)
            logs.append(f"L{l} mse {loss.item() / x.shape[1]:.4f} aux {aux.item():.3f} dead {int(dead.sum())}")
        if args.resample_every and step % args.resample_every == 0 and frac < 0.75:
            gen = torch.Generator().manual_seed(step)
            revived = [t.resample(since_fired[l] > args.dead_window, x / scales[l], o, gen)
                       for l, (t, o, x) in enumerate(zip(trainers, opts, acts))]
            for l, n_rev in enumerate(revived):
                if n_rev:
                    since_fired[l] = torch.where(since_fired[l] > args.dead_window, 0, since_fired[l])
            print(f"step {step}: resampled {revived} dead latents", flush=True)
        if step % 10 == 0:
            rate = (seen - seen0) / (time.time() - t0)
            print(f"step {step} tokens {seen:,} ({rate:,.0f} tok/s) | " + " | ".join(logs), flush=True)
        if step % args.ckpt_every == 0:
            torch.save({"trainers": [t.state_dict() for t in trainers], "opts": [o.state_dict() for o in opts],
                        "since_fired": since_fired, "scales": torch.tensor(scales), "step": step, "seen": seen,
                        "model_fingerprint": model_fingerprint(engine)},
                       str(ckpt) + ".tmp")
            Path(str(ckpt) + ".tmp").replace(ckpt)

    out.mkdir(parents=True, exist_ok=True)
    for l, t in enumerate(trainers):
        t.export(scales[l], f"blocks.{l}.hook_resid_post", engine.name).save(out / f"L{l}.resid", dtype=torch.float16)
    shipped = [SAE.load(out / f"L{l}.resid") for l in range(n_layers)]  # evaluate what ships (fp16)
    metrics = evaluate(engine, shipped, args.eval_tokens)
    rows = "\n".join(f"| L{l}.resid | {args.d_sae} | {args.k} | {m['fvu']:.4f} | {m['mean_l0']:.1f} | "
                     f"{100 * m['dead_fraction']:.1f}% |" for l, m in enumerate(metrics))
    (out / "metrics.json").write_text(json.dumps({"eval_tokens": metrics[0]["eval_tokens"], "heldout_seed": HELDOUT_SEED,
                                                  "saes": {f"L{l}.resid": m for l, m in enumerate(metrics)}},
                                                 indent=2) + "\n")
    (out / "README.md").write_text(CARD.format(train_tokens=seen, train_seed=TRAIN_SEED, steps=step,
                                               batch_tokens=f"~{seen // step:,}", lr=args.lr,
                                               eval_tokens=metrics[0]["eval_tokens"], heldout_seed=HELDOUT_SEED,
                                               rows=rows))
    print(json.dumps(metrics, indent=2), flush=True)


if __name__ == "__main__":
    main()
