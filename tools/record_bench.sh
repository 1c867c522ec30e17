#!/usr/bin/env bash
# Record the CPU benchmark JSON files under results/bench/ and regenerate the README tables from them.
# Other CPU-heavy jobs distort timings: pause them first (this script pauses a running tools/run_grid.py grid).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
mkdir -p results/bench
pids=$(pgrep -f "train.py --recipe fmnist" || true)
[ -n "$pids" ] && kill -STOP $pids
trap '[ -n "$pids" ] && kill -CONT $pids 2>/dev/null || true' EXIT
$PY tools/bench_step.py --repeats 9 --json | tee /tmp/bench_step.txt
tail -n 1 /tmp/bench_step.txt > results/bench/step_cpu_resnet32.json
$PY tools/bench_kernels.py --json | tee /tmp/bench_kernels.txt
tail -n 1 /tmp/bench_kernels.txt > results/bench/kernels_cpu.json
$PY tools/bench_memory.py --recipe imagenet_lt_resnext50 --json 2>/dev/null | tail -n 1 > results/bench/memory_imagenet_lt_resnext50.json
$PY tools/bench_report.py >/dev/null
