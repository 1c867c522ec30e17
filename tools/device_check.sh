#!/usr/bin/env bash
# The GPU check, as one prepared script for a machine with an NVIDIA GPU (run from anywhere; it works in the repo):
#   1. builds the CUDA extension in place for sm_90 (FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0),
#   2. runs the CUDA tests (fused CUDA kernels against float64 NumPy and the reference backend on the GPU),
#   3. runs the kernel benchmark and the training-step benchmarks (ResNet-32 b256, ResNet-50 b64, bf16), with --json,
#   4. times whole epochs of the cifar100_lt_resnet32 recipe on synthetic CIFAR-100 and projects its 200 epochs,
#   5. runs the own-loop example (examples/own_loop.py) on the GPU.
# Each benchmark's JSON line is also saved under $BENCH_DIR (default: $OUT where set, else results/bench), named as
# results/bench/ expects (kernels_cuda.json, step_cuda_*.json, epoch_cuda_*.json), with the whole log beside it.
# Each step has its own time limit (together under 10 minutes); a failing step does not stop the later ones, and the
# script exits non-zero at the end if any step failed. PYTHON overrides the interpreter (default python3).
# DEVICE_CHECK_SMOKE=1 is a CPU rehearsal of the script for the tests (tests/test_tool_smoke.py), on any machine: no
# CUDA build and no GPU assertion, the fused kernels must be registered for the CPU instead, the CUDA tests may all
# be skipped, and each benchmark runs on the CPU with tiny sizes (its figures are not for results/bench: set BENCH_DIR).
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
trap 'rm -f "$log"' EXIT
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

if [ "${DEVICE_CHECK_SMOKE:-0}" = 1 ]; then
  # later options win: each benchmark's own options stay as below, these shrink it and move it to the CPU
  smoke=True kernels_key=CPU tested=" (passed|skipped)"
  tiny_kernels=(--device cpu --d 4096 --repeats 1)
  tiny_step=(--device cpu --model resnet8_cifar --batch 16 --img-size 8 --num-classes 10 --groups 2 --repeats 1 \
    --warmup 0)
  tiny_epoch=(--train-images 1000 --test-images 100 --grouped-epochs 1 --num-workers 0 --set data.imbalance_ratio=10 \
    --set data.val_per_class=2 --set model.name=resnet8_cifar --set data.img_size=8)
else
  # all-skipped (no GPU seen) counts as a failure: at least one test must pass
  smoke=False kernels_key=CUDA tested=" passed"
  tiny_kernels=() tiny_step=() tiny_epoch=()
fi

step "environment" 30 "$PY" -c "import torch, timm, accelerate; \
assert torch.cuda.is_available() or $smoke, 'torch sees no GPU'; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__, \
'accelerate', accelerate.__version__, 'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
if [ "$smoke" = True ]; then
  echo "==== build the CUDA extension: skipped (smoke run) ===="
else
  step "build the CUDA extension (sm_90)" 180 \
    env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 "$PY" setup.py build_ext --inplace
fi
step "$kernels_key kernels registered" 30 "$PY" -c "import torch, lt_recipes.ops as ops; \
assert ops.fused_available(), 'lt_recipes._C did not load'; \
assert torch._C._dispatch_has_kernel_for_dispatch_key('lt_recipes::gsa_project', '$kernels_key'), \
'no $kernels_key kernels'; print('fused kernels for', sorted(ops._FUSED_DEVICES))"
step "CUDA tests" 100 bash -c '"$0" -m pytest -q -p no:cacheprovider tests/test_ops.py -k cuda | tee "$1"; \
[ "${PIPESTATUS[0]}" -eq 0 ] && grep -qE "$2" "$1"' "$PY" "$log" "$tested"
bench() {  # bench NAME LIMIT_SECONDS JSON_FILE COMMAND...: a step whose last output line is saved as JSON_FILE
  local name=$1 limit=$2 file=$3
  shift 3
  step "$name" "$limit" bash -c '"$@" | tee "$0"; [ "${PIPESTATUS[0]}" -eq 0 ]' "$log" "$@" && \
    tail -n 1 "$log" > "$BENCH_DIR/$file"
}
bench "kernel benchmark" 60 kernels_cuda.json "$PY" tools/bench_kernels.py --device cuda --json "${tiny_kernels[@]}"
bench "step benchmark, ResNet-32 batch 256 bf16" 80 step_cuda_resnet32.json \
  "$PY" tools/bench_step.py --device cuda --amp bf16 --batch 256 --json "${tiny_step[@]}"
bench "step benchmark, ResNet-50 batch 64 bf16" 100 step_cuda_resnet50.json "$PY" tools/bench_step.py --device cuda \
  --amp bf16 --model resnet50 --batch 64 --img-size 224 --num-classes 1000 --groups 6 --repeats 10 --json \
  "${tiny_step[@]}"
bench "epoch timing, cifar100_lt_resnet32 on synthetic CIFAR-100" 150 epoch_cuda_cifar100_lt_resnet32.json \
  "$PY" tools/bench_epoch.py --recipe cifar100_lt_resnet32 --paper-hours 1.67 --json "${tiny_epoch[@]}"
# shellcheck disable=SC2046  # the options are words
step "own-loop example" 90 "$PY" examples/own_loop.py $([ "$smoke" = True ] && echo --device cpu --epochs 2 \
  --group-epoch 1 || echo --device cuda)

echo
if [ "${#failed[@]}" -gt 0 ]; then
  echo "device check FAILED: ${failed[*]}"
  exit 1
fi
echo "device check passed"
