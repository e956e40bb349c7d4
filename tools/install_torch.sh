#!/usr/bin/env bash
# Install PyTorch into the environment of the given pip: the CUDA build where an NVIDIA GPU
# is present, else the CPU build (torch==2.13.0+cpu, from the PyTorch CPU index or a local
# wheel). A torch that is already installed is kept (users who bring their own).
set -euo pipefail
PIP=${1:-pip}
PY=$(dirname "$PIP")/python
if "$PY" -c "import torch" 2>/dev/null; then
  echo "torch $("$PY" -c 'import torch; print(torch.__version__)') already installed"
  exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "$PIP" install torch
else
  "$PIP" install "torch==2.13.0" --extra-index-url https://download.pytorch.org/whl/cpu --retries 0 --timeout 10
fi
