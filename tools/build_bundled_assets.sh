#!/usr/bin/env bash
# Build the bundled model's SAEs, transcoders, activation dataset and heuristic explanations, then check
# them. Run after tools/train_default_model.py (with --wait it waits for the model's card,
# the last file that script writes). One CPU thread per step; logs go to stdout.
#
#   nohup tools/build_bundled_assets.sh --wait > /tmp/bundled_assets.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MODEL=tdb_agent/assets/tdb-tiny
if [ "${1:-}" = "--wait" ]; then
  until [ -f "$MODEL/scores.json" ]; do sleep 20; done
fi
echo "== $(date -u +%T) SAEs"
"$PY" tools/train_saes.py --tokens "${SAE_TOKENS:-600000}" --lr 2e-3 --docs-per-batch 192 --ckpt /tmp/train_saes.ckpt.pt
echo "== $(date -u +%T) transcoders"
"$PY" tools/train_transcoders.py --tokens 1900000 --lr-decay --dead-window 150000 --extra-facts 64 \
  --extra-facts-from 1200000 --ckpt /tmp/train_transcoders.ckpt.pt
echo "== $(date -u +%T) dataset (neurons, heads, SAE latents, transcoder features; gzipped)"
"$PY" -m tdb_agent.cli build-dataset --out tdb_agent/assets/datasets/tdb-tiny --corpus-docs 9000 --threads 1 --gzip
echo "== $(date -u +%T) explanations"
"$PY" tools/precompute_explanations.py --gzip
echo "== $(date -u +%T) checks"
TDB_TEST_THREADS=1 "$PY" -m pytest -q tests/test_sae_assets.py tests/test_dataset_assets.py tests/test_graph_bundled.py
du -sh tdb_agent/assets/* 
echo "== $(date -u +%T) benchmark"
"$PY" tools/bench_dataset.py --docs 4000
echo "== $(date -u +%T) done"
