#!/usr/bin/env bash
# One run on a CUDA machine: the GPU-marked tests, then the edge benchmarks on CUDA.
#
#   tools/gpu_check.sh wheels               here: fetch the wheels the device lacks into .whl/
#   OUT=gpu-out tools/gpu_check.sh          there: logs and JSON land in $OUT
#
# Made for a lent device machine (Python 3.12, a CUDA PyTorch, no network, no pydantic, an
# older transformers): the wheels in .whl/, fetched here for its Python at the versions this
# checkout's .venv runs, are installed to /tmp/site first (carry .whl with the run). Each step has its own time limit, so that one that hangs
# still leaves the others' figures; the script returns the tests' exit status.
set -uo pipefail
if [ "${1:-}" = wheels ]; then
  ver() { .venv/bin/python -m pip show "$1" 2>/dev/null | awk '/^Version:/{print $2}'; }
  pkgs=()
  for p in pydantic pydantic_core annotated-types typing-inspection transformers huggingface_hub kernels httpx2 \
           httpcore2 hf-xet click regex tomlkit truststore; do pkgs+=("$p==$(ver "$p")"); done
  exec .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${pkgs[@]}"
fi
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing .whl failed"; exit 2; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
{ nvidia-smi -L; python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
'transformers', transformers.__version__)"; } 2>&1 | tee "$OUT/env.txt"

timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_ops.py tests/test_engine.py \
  tests/test_device_map.py 2>&1 | tee "$OUT/gpu_tests.log"
status=${PIPESTATUS[0]}

timeout 300 python3 tools/bench_edges.py --small --pairs 2 --device cuda --repeats 5 \
  --out "$OUT/bench_edges_cuda.json" 2>&1 | tee "$OUT/bench_edges_cuda.log"
exit "$status"
