#!/usr/bin/env bash
# The GPU check, as one prepared script for a machine with an NVIDIA GPU (run from anywhere; it works in the repo). It
# walks the paths a GPU user takes:
#   1. the README's set-up exactly as written (bash tools/setup_env.sh: .venv with the CUDA kernels); when it cannot
#      finish (no registry reachable), the CUDA extension is built in place for sm_90 instead, with CUDA_HOME from
#      tools/cuda_env.sh, and the later steps run on PYTHON,
#   2. the CUDA tests (fused CUDA kernels against float64 NumPy and the reference backend on the GPU) and the 16- and
#      32-group kernel variants against the reference,
#   3. every registered step for two steps under a one-process NCCL group (torchrun), GKP handed over on the CPU,
#   4. the engine for two short epochs on synthetic CIFAR-100 in bf16 and in fp16, killed at its grouping and resumed,
#      then validate.py on its checkpoint; the own-loop example (examples/own_loop.py) on the GPU; two steps with
#      model.compile=inductor and model.channels_last=true,
#   5. the kernel benchmark and the training-step benchmarks (ResNet-32 b256, ResNet-50 b64, bf16), with --json,
#   6. times whole epochs of the cifar100_lt_resnet32 recipe on synthetic CIFAR-100 and projects its 200 epochs.
# Each benchmark's JSON line is also saved under $BENCH_DIR (default: $OUT where set, else results/bench), named as
# results/bench/ expects (kernels_cuda.json, step_cuda_*.json, epoch_cuda_*.json), with the whole log beside it.
# Each step has its own time limit, cut to what is left of the whole check's budget (DEVICE_CHECK_BUDGET seconds,
# default 570: the device machines run a command for at most 10 minutes), so the log is always complete; a step with no
# time left is not run and counts as failed. A failing step does not stop the later ones, and the script exits
# non-zero at the end if any step failed. PYTHON overrides the interpreter (default python3, or .venv/bin/python once
# the set-up has made it).
# DEVICE_CHECK_SMOKE=1 is a CPU rehearsal of the script for the tests (tests/test_tool_smoke.py), on any machine: the
# set-up is only syntax-checked and its CUDA resolution run (tests/test_setup_env.py runs it with a fake GPU), no CUDA
# build and no GPU assertion, the fused kernels must be registered for the CPU instead, the CUDA tests may all be
# skipped, the process group is gloo, the engine trains ResNet-8 at 8 px in bf16 only (CPU autocast has no fp16), the
# compile step uses aot_eager, and each benchmark runs on the CPU with tiny sizes (its figures are not for
# results/bench: set BENCH_DIR).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# shellcheck source=tools/cuda_env.sh
source tools/cuda_env.sh
work=$(mktemp -d)
log=$work/step.log
trap 'rm -rf "$work"' EXIT
failed=()
BENCH_DIR=${BENCH_DIR:-${OUT:-results/bench}}
BUDGET=${DEVICE_CHECK_BUDGET:-570}
mkdir -p "$BENCH_DIR"
exec > >(tee "$BENCH_DIR/device_check.log") 2>&1

step() {  # step NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo
  if [ $((BUDGET - SECONDS)) -lt 15 ]; then
    echo "==== $name: not run, the check's ${BUDGET}s budget is spent ===="
    echo "---- $name: FAILED (no time left)"
    failed+=("$name")
    return 1
  fi
  [ "$limit" -le $((BUDGET - SECONDS)) ] || limit=$((BUDGET - SECONDS))
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

skipped() {  # skipped NAME WHY: a part that cannot run in this checkout yet
  echo
  echo "==== $1: skipped ($2) ===="
}

if [ "${DEVICE_CHECK_SMOKE:-0}" = 1 ]; then
  # later options win: each benchmark's own options stay as below, these shrink it and move it to the CPU
  smoke=True kernels_key=CPU tested=" (passed|skipped)" device=cpu precisions=(bf16) compile_backend=aot_eager
  tiny_kernels=(--device cpu --d 4096 --repeats 1)
  tiny_step=(--device cpu --model resnet8_cifar --batch 16 --img-size 8 --num-classes 10 --groups 2 --repeats 1 \
    --warmup 0)
  tiny_epoch=(--train-images 1000 --test-images 100 --grouped-epochs 1 --num-workers 0 --set data.imbalance_ratio=10 \
    --set data.val_per_class=2 --set model.name=resnet8_cifar --set data.img_size=8)
  synthetic=(1000 100)
  engine_sets=(--set data.imbalance_ratio=10 --set data.val_per_class=2 --set model.name=resnet8_cifar \
    --set data.img_size=8 --set data.num_workers=0 --set data.batch_size=128 --set data.eval_batch_size=128)
else
  # all-skipped (no GPU seen) counts as a failure: at least one test must pass
  smoke=False kernels_key=CUDA tested=" passed" device=cuda precisions=(bf16 fp16) compile_backend=inductor
  tiny_kernels=() tiny_step=() tiny_epoch=()
  synthetic=(10000 1000)
  engine_sets=(--set data.num_workers=4)
fi

step "environment" 30 "$PY" -c "import torch, timm, accelerate; \
assert torch.cuda.is_available() or $smoke, 'torch sees no GPU'; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__, \
'accelerate', accelerate.__version__, 'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"

# ---- 1. set-up ------------------------------------------------------------------------------------------------
if [ "$smoke" = True ]; then
  step "the README's set-up (smoke: syntax and CUDA resolution only)" 30 bash -c 'bash -n tools/setup_env.sh && \
source tools/cuda_env.sh && echo "CUDA_HOME resolves to ${CUDA_HOME:-$(cuda_home)}; GPU present: \
$(gpu_present && echo yes || echo no)"'
  echo "==== build the CUDA extension: skipped (smoke run) ===="
elif PIP_RETRIES=1 PIP_TIMEOUT=15 step "the README's set-up: bash tools/setup_env.sh" 240 bash tools/setup_env.sh; then
  [ -n "${PYTHON:-}" ] || PY=.venv/bin/python
  echo "==== build the CUDA extension: done by the set-up ($(cat .venv/.lt-recipes-stamp | cut -d' ' -f2-)) ===="
else
  CUDA_HOME=$(cuda_home)
  export CUDA_HOME
  step "build the CUDA extension (sm_90, CUDA_HOME=$CUDA_HOME)" 180 \
    env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 "$PY" setup.py build_ext --inplace
fi

# ---- 2. kernels ---------------------------------------------------------------------------------------------------
step "$kernels_key kernels registered" 30 "$PY" -c "import torch, lt_recipes.ops as ops; \
assert ops.fused_available(), 'lt_recipes._C did not load'; \
assert torch._C._dispatch_has_kernel_for_dispatch_key('lt_recipes::gsa_project', '$kernels_key'), \
'no $kernels_key kernels'; print('fused kernels for', sorted(ops._FUSED_DEVICES))"
step "CUDA tests" 100 bash -c '"$0" -m pytest -q -p no:cacheprovider tests/test_ops.py tests/test_gpu_options.py -k cuda | tee "$1"; \
[ "${PIPESTATUS[0]}" -eq 0 ] && grep -qE "$2" "$1"' "$PY" "$log" "$tested"
step "16- and 32-group kernel variants on $device" 40 "$PY" tests/device_group_kernels.py "$device"

# ---- 3. every step under a process group ------------------------------------------------------------------------
step "every registered step, two steps under a one-process $([ "$device" = cuda ] && echo NCCL || echo gloo) group" \
  90 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 tests/device_steps_worker.py "$device"

# ---- 4. the users' paths ------------------------------------------------------------------------------------------
"$PY" -c "import sys; sys.path.insert(0, 'tools'); from bench_epoch import write_synthetic_cifar; \
write_synthetic_cifar(sys.argv[1], 'cifar100', train_images=int(sys.argv[2]), test_images=int(sys.argv[3]))" \
  "$work/cifar" "${synthetic[@]}"
engine_sets+=(--set "data.root=$work/cifar" --set epochs=2 --set groups.start_epoch=1)
engine() {  # engine PRECISION SETS...: killed when the groups are formed (epoch 1), resumed, then validated
  local prec=$1 run=$work/engine_$1 rc
  shift
  LT_RECIPES_FAILPOINT=grouping:1 "$PY" train.py --recipe cifar100_lt_resnet32 --output "$run" \
    --mixed-precision "$prec" "$@" >"$run.log" 2>&1
  rc=$?
  tail -n 3 "$run.log"
  [ "$rc" -eq 137 ] || { echo "expected the fail point's SIGKILL (exit 137), got $rc"; return 1; }
  echo "killed at the grouping of epoch 1 as planned; resuming"
  "$PY" train.py --recipe cifar100_lt_resnet32 --output "$run" --mixed-precision "$prec" "$@" --resume 2>&1 |
    tail -n 3
  [ "${PIPESTATUS[0]}" -eq 0 ] || return 1
  "$PY" validate.py --recipe cifar100_lt_resnet32 "$@" --checkpoint "$run/checkpoint.pt" --output "$run/validate" \
    2>&1 | tail -n 3
  [ "${PIPESTATUS[0]}" -eq 0 ]
}
export -f engine
export PY work
for prec in "${precisions[@]}"; do
  step "engine, 2 epochs of synthetic CIFAR-100 in $prec, killed and resumed, then validate.py" 100 \
    bash -c 'engine "$@"' engine "$prec" "${engine_sets[@]}"
done
[ "$smoke" = False ] || skipped "engine in fp16" "smoke run: CPU autocast has no fp16, and the engine refuses it there"
# shellcheck disable=SC2046  # the smoke options are words
step "the README's own loop on $device (examples/own_loop.py)" 90 "$PY" examples/own_loop.py --device "$device" \
  $([ "$smoke" = True ] && echo --epochs 2 --group-epoch 1)
# the plain step with GKP, which compiles exactly; two steps, then the fail point stops the run
step "two steps with model.compile=$compile_backend and model.channels_last=true" 150 bash -c \
  'LT_RECIPES_FAILPOINT=step:2 "$0" train.py --recipe cifar100_lt_resnet32 --output "$1" "${@:2}" 2>&1 | tail -n 3; \
[ "${PIPESTATUS[0]}" -eq 137 ]' "$PY" "$work/compiled" "${engine_sets[@]}" --set method=gkp \
  --set "model.compile=$compile_backend" --set model.channels_last=true

# ---- 5-6. benchmarks ----------------------------------------------------------------------------------------------
bench() {  # bench NAME LIMIT_SECONDS JSON_FILE COMMAND...: a step whose last output line is saved as JSON_FILE
  local name=$1 limit=$2 file=$3
  shift 3
  step "$name" "$limit" bash -c '"$@" | tee "$0"; [ "${PIPESTATUS[0]}" -eq 0 ]' "$log" "$@" && \
    tail -n 1 "$log" > "$BENCH_DIR/$file"
}
bench "kernel benchmark" 60 kernels_cuda.json "$PY" tools/bench_kernels.py --device cuda --json "${tiny_kernels[@]}"
bench "step benchmark, ResNet-32 batch 256 bf16" 80 step_cuda_resnet32.json \
  "$PY" tools/bench_step.py --device cuda --amp bf16 --batch 256 --json "${tiny_step[@]}"
# 19 kinds, one warm-up and three timed steps each (with ten, about 170 s)
bench "step benchmark, ResNet-50 batch 64 bf16" 100 step_cuda_resnet50.json "$PY" tools/bench_step.py --device cuda \
  --amp bf16 --model resnet50 --batch 64 --img-size 224 --num-classes 1000 --groups 6 --repeats 3 --warmup 1 --json \
  "${tiny_step[@]}"
bench "epoch timing, cifar100_lt_resnet32 on synthetic CIFAR-100" 120 epoch_cuda_cifar100_lt_resnet32.json \
  "$PY" tools/bench_epoch.py --recipe cifar100_lt_resnet32 --paper-hours 1.67 --grouped-epochs 1 --json \
  "${tiny_epoch[@]}"

echo
if [ "${#failed[@]}" -gt 0 ]; then
  echo "device check FAILED: ${failed[*]}"
  exit 1
fi
echo "device check passed"
