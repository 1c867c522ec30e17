#!/usr/bin/env bash
# Record the CPU benchmark JSON files under results/bench/ and regenerate docs/benchmarks.md's tables from them.
# Other CPU-heavy jobs distort timings: pause them first (this script pauses a running tools/run_grid.py grid).
# Environment (all optional; relative paths are taken from the repository root):
#   PYTHON        the interpreter (default .venv/bin/python).
#   BENCH_DIR     where the JSON files go (default results/bench).
#   BENCH_DOC     the Markdown page whose benchmark blocks are regenerated from BENCH_DIR (default docs/benchmarks.md
#                 when BENCH_DIR is results/bench; with another BENCH_DIR no tables are written unless this is set).
#   SMOKE=1       a rehearsal for the tests: tiny sizes, one repeat, and no other process is paused; its JSON files
#                 are not figures to commit, so point BENCH_DIR elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
BENCH_DIR=${BENCH_DIR:-results/bench}
if [ "$BENCH_DIR" = results/bench ]; then DOC=${BENCH_DOC:-docs/benchmarks.md}; else DOC=${BENCH_DOC:-}; fi
if [ "${SMOKE:-0}" = 1 ]; then
  step_args=(--model resnet8_cifar --batch 16 --num-classes 10 --img-size 8 --groups 2 --repeats 1 --warmup 0)
  batched_kinds=sam,gsa_masked,gsa_masked_batched
  batched_args=("${step_args[@]}")
  dispatch_args=("${step_args[@]}")
  kernel_args=(--d 4096 --repeats 1)
  pids=
else
  step_args=(--repeats 9)
  batched_kinds=sam,gsa_masked,gsa_masked_batched,gkp_gsa_masked,gkp_gsa_masked_batched
  batched_args=(--batch 32 --repeats 9)
  dispatch_args=(--batch 8 --img-size 4 --repeats 20)  # dispatch-bound: the CPU's stand-in for a launch-bound GPU
  kernel_args=()
  pids=$(pgrep -f "train.py --recipe fmnist" || true)
fi
mkdir -p "$BENCH_DIR"
log=$(mktemp)
trap 'rm -f "$log"; [ -n "$pids" ] && kill -CONT $pids 2>/dev/null || true' EXIT
[ -n "$pids" ] && kill -STOP $pids
bench() {  # bench JSON_FILE COMMAND...: run a benchmark with --json, show its output, save its last line as JSON_FILE
  local file=$1
  shift
  "$@" | tee "$log"
  tail -n 1 "$log" > "$BENCH_DIR/$file"
}
bench step_cpu_resnet32.json "$PY" tools/bench_step.py "${step_args[@]}" --json
# gsa.batched against the sequential passes, compute-bound and dispatch-bound, on one thread (two threads on a
# shared 2-core machine time the threads' contention more than the steps)
bench step_cpu_resnet32_batched_b32.json env OMP_NUM_THREADS=1 "$PY" tools/bench_step.py "${batched_args[@]}" \
  --kinds "$batched_kinds" --json
bench step_cpu_resnet32_batched_dispatch.json env OMP_NUM_THREADS=1 "$PY" tools/bench_step.py "${dispatch_args[@]}" \
  --kinds "$batched_kinds" --json
bench kernels_cpu.json "$PY" tools/bench_kernels.py "${kernel_args[@]}" --json
bench memory_imagenet_lt_resnext50.json "$PY" tools/bench_memory.py --recipe imagenet_lt_resnext50 --json
[ -z "$DOC" ] || "$PY" tools/bench_report.py --bench "$BENCH_DIR" --doc "$DOC" >/dev/null
