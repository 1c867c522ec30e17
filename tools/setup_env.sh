#!/usr/bin/env bash
# Create or refresh .venv: pinned torch/torchvision, requirements, the package with its C++ extension.
# Idempotent: each step runs only when what it installs is missing or its inputs changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if [ ! -x "$PY" ]; then
  echo "[setup] creating .venv"
  python3 -m venv .venv
fi
if ! "$PY" -c "import torch, torchvision, sys; sys.exit(torch.__version__.split('+')[0] != '2.14.1' or torchvision.__version__.split('+')[0] != '0.29.1')" 2>/dev/null; then
  echo "[setup] installing torch==2.14.1 torchvision==0.29.1"
  .venv/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
fi
stamp=.venv/.lt-recipes-stamp
want=$(cat requirements.txt setup.py csrc/* | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$PY" -c "import torch, lt_recipes._C" 2>/dev/null; then
  echo "[setup] installing requirements and building the extension"
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
  # The CUDA kernels cannot run on a machine without a GPU; tests/test_cuda_compile.py still compiles them.
  if ! command -v nvidia-smi >/dev/null 2>&1; then export NO_CUDA=1; fi
  .venv/bin/pip install -q --disable-pip-version-check --no-build-isolation -e .
  echo "$want" > "$stamp"
fi
# Fashion-MNIST for the fmnist_lt_* recipes (Debian package); optional, the tests skip without it.
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[setup] installing Debian's dataset-fashion-mnist"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "[setup] dataset-fashion-mnist not installed; Fashion-MNIST tests will be skipped"
fi
