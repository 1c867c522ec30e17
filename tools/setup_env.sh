#!/usr/bin/env bash
# Create or refresh .venv: pinned torch/torchvision, requirements, the package with its C++ extension (and its CUDA
# kernels where nvidia-smi runs; tools/cuda_env.sh finds the toolkit and falls back to CPU-only in one line).
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
# shellcheck source=tools/cuda_env.sh
source tools/cuda_env.sh
stamp=.venv/.lt-recipes-stamp
want=$(cat requirements.txt setup.py csrc/* | sha256sum | cut -d' ' -f1)
# rebuilt when the inputs change, the extension does not load, or the build's CUDA kernels do not fit the machine (a
# CPU-only .venv on a machine with a GPU)
if ! cuda_stamp_fresh "$stamp" "$want" || ! "$PY" -c "import torch, lt_recipes._C" 2>/dev/null; then
  echo "[setup] installing requirements and building the extension"
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
  # with a GPU, the CUDA kernels too (a failed CUDA build says so in one line and builds CPU-only); without, CPU-only
  build_extension .venv/lt-recipes-cuda-build.log .venv/bin/pip install -q --disable-pip-version-check \
    --no-build-isolation -e .
  echo "$want${CUDA_BUILD:+ $CUDA_BUILD}" > "$stamp"
fi
# Fashion-MNIST for the fmnist_lt_* recipes (Debian package); optional, the tests skip without it.
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[setup] installing Debian's dataset-fashion-mnist"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "[setup] dataset-fashion-mnist not installed; Fashion-MNIST tests will be skipped"
fi
