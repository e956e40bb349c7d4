"""The bundled model's shipped SAEs: SAELens layout in float16, and the card's quality
targets re-measured here, independently, on held-out corpus text."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tdb_agent.engine.sae import BUNDLED_SAES, SAE, splice_hook
from tdb_agent.tasks import corpus_documents

ASSETS = Path(__file__).resolve().parents[1] / "tdb_agent" / "assets"


@pytest.fixture(scope="module")
def shipped(bundled):
    folders = sorted(BUNDLED_SAES.glob("L*.resid"))
    assert len(folders) == bundled.spec.n_layers, "the bundled SAEs are missing: python tools/train_saes.py"
    return [SAE.load(f) for f in folders]


def test_layout_and_card(shipped):
    for l, sae in enumerate(shipped):
        folder = BUNDLED_SAES / f"L{l}.resid"
        cfg = json.loads((folder / "cfg.json").read_text())
        assert cfg["hook_name"] == f"blocks.{l}.hook_resid_post" and cfg["architecture"] == "topk"
        with safe_open(str(folder / "sae_weights.safetensors"), "pt") as f:
            assert {f.get_slice(n).get_dtype() for n in f.keys()} == {"F16"}
    metrics = json.loads((BUNDLED_SAES / "metrics.json").read_text())["saes"]
    card = (BUNDLED_SAES / "README.md").read_text()
    for name, m in metrics.items():
        row = re.search(rf"\| {re.escape(name)} \| \d+ \| \d+ \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)% \|", card)
        assert row, name
        assert float(row.group(1)) == pytest.approx(m["fvu"], abs=1e-4)
        assert float(row.group(2)) == pytest.approx(m["mean_l0"], abs=0.05)
        assert m["fvu"] <= 0.15 and m["mean_l0"] <= 40 and m["dead_fraction"] <= 0.10


@torch.no_grad()
def test_quality_on_held_out_text(bundled, shipped):
    """FVU, L0 and dead latents measured here on documents no SAE was trained on (seeds
    other than the trainer's and its evaluation's), BOS position excluded as on the card."""
    e = bundled
    sites = [f"blocks.{l}.hook_resid_post" for l in range(e.spec.n_layers)]
    xs = [[] for _ in sites]
    n = 0
    by_length: dict[int, list[torch.Tensor]] = {}  # documents of one length run as one batch
    for text in corpus_documents(3000, seed=123_456_789):
        ids = e.to_tokens(text)
        by_length.setdefault(ids.shape[1], []).append(ids)
    for docs in by_length.values():
        ids = torch.cat(docs)
        _, acts = e.run_with_cache(ids, sites, logit_positions=[-1], logit_ids=[0])
        for i, s in enumerate(sites):
            xs[i].append(acts[s][:, 1:].reshape(-1, acts[s].shape[-1]))
        n += ids[:, 1:].numel()
    assert n > 60_000
    for sae, chunks in zip(shipped, xs):
        x = torch.cat(chunks).float()
        f = sae.encode(x)
        err = (x - sae.decode(f)).pow(2).sum()
        fvu = (err / (x - x.mean(0)).pow(2).sum()).item()
        l0 = (f != 0).sum(-1).float().mean().item()
        dead = 1 - (f != 0).any(0).float().mean().item()
        assert fvu <= 0.15 and l0 <= 40 and dead <= 0.10, (sae.cfg.hook_name, fvu, l0, dead)


def test_spliced_bundled_model_is_exact(bundled, shipped):
    ids = bundled.to_tokens("When Mary and John went to the store , John gave a drink to")
    base = bundled.forward(ids, logit_positions=None).logits
    hooks = {sae.cfg.hook_name: splice_hook(sae) for sae in shipped}
    assert torch.equal(bundled.forward(ids, hooks=hooks, logit_positions=None).logits, base)


def test_assets_fit_the_budget():
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file() and not p.name.endswith(".ckpt.pt"))
    assert total < 25 * 2 ** 20, f"tdb_agent/assets is {total / 2 ** 20:.1f} MB; the budget is 25 MB"
