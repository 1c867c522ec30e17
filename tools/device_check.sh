#!/usr/bin/env bash
# The GPU check, as one prepared script for a machine with an NVIDIA GPU (run from anywhere; it works in the repo):
#   1. builds the CUDA extension in place for sm_90 (FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0),
#   2. runs the CUDA tests (fused CUDA kernels against float64 NumPy and the reference backend on the GPU),
#   3. runs the kernel benchmark and the training-step benchmarks (ResNet-32 b256, ResNet-50 b64, bf16), with --json,
#   4. times whole epochs of the cifar100_lt_resnet32 recipe on synthetic CIFAR-100 and projects its 200 epochs.
# Each benchmark's JSON line is also saved under $BENCH_DIR (default: $OUT where set, else results/bench), named as
# results/bench/ expects (kernels_cuda.json, step_cuda_*.json, epoch_cuda_*.json), with the whole log beside it.
# Each step has its own time limit (together under 10 minutes); a failing step does not stop the later ones, and the
# script exits non-zero at the end if any step failed. PYTHON overrides the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
  # torch guesses CUDA_HOME from nvcc's folder without resolving links (/usr/local/bin/nvcc -> /usr/local)
  CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  export CUDA_HOME
fi
log=$(mktemp)
failed=()
BENCH_DIR=${BENCH_DIR:-${OUT:-results/bench}}
mkdir -p "$BENCH_DIR"
exec > >(tee "$BENCH_DIR/device_check.log") 2>&1

step() {  # step NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo
  echo "==== $name (limit ${limit}s) ===="
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  if [ "$rc" -eq 0 ]; then
    echo "---- $name: ok in $((SECONDS - start))s"
  else
    echo "---- $name: FAILED with exit $rc after $((SECONDS - start))s$([ "$rc" -eq 124 ] && echo ' (time limit)')"
    failed+=("$name")
  fi
  return "$rc"
}

step "environment" 30 "$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'; \
import timm, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__, \
'accelerate', accelerate.__version__, 'device', torch.cuda.get_device_name(0))"
step "build the CUDA extension (sm_90)" 180 env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 "$PY" setup.py build_ext --inplace
step "CUDA kernels registered" 30 "$PY" -c "import torch, lt_recipes.ops as ops; \
assert ops.fused_available(), 'lt_recipes._C did not load'; \
assert torch._C._dispatch_has_kernel_for_dispatch_key('lt_recipes::gsa_project', 'CUDA'), 'no CUDA kernels'; \
print('fused kernels for', sorted(ops._FUSED_DEVICES))"
# all-skipped (no GPU seen) counts as a failure: at least one test must pass
step "CUDA tests" 100 bash -c '"$0" -m pytest -q -p no:cacheprovider tests/test_ops.py -k cuda | tee "$1"; \
[ "${PIPESTATUS[0]}" -eq 0 ] && grep -q " passed" "$1"' "$PY" "$log"
bench() {  # bench NAME LIMIT_SECONDS JSON_FILE COMMAND...: a step whose last output line is saved as JSON_FILE
  local name=$1 limit=$2 file=$3
  shift 3
  step "$name" "$limit" bash -c '"$@" | tee "$0"; [ "${PIPESTATUS[0]}" -eq 0 ]' "$log" "$@" && \
    tail -n 1 "$log" > "$BENCH_DIR/$file"
}
bench "kernel benchmark" 60 kernels_cuda.json "$PY" tools/bench_kernels.py --device cuda --json
bench "step benchmark, ResNet-32 batch 256 bf16" 80 step_cuda_resnet32.json \
  "$PY" tools/bench_step.py --device cuda --amp bf16 --batch 256 --json
bench "step benchmark, ResNet-50 batch 64 bf16" 100 step_cuda_resnet50.json "$PY" tools/bench_step.py --device cuda \
  --amp bf16 --model resnet50 --batch 64 --img-size 224 --num-classes 1000 --groups 6 --repeats 10 --json
bench "epoch timing, cifar100_lt_resnet32 on synthetic CIFAR-100" 150 epoch_cuda_cifar100_lt_resnet32.json \
  "$PY" tools/bench_epoch.py --recipe cifar100_lt_resnet32 --paper-hours 1.67 --json

echo
if [ "${#failed[@]}" -gt 0 ]; then
  echo "device check FAILED: ${failed[*]}"
  exit 1
fi
echo "device check passed"
