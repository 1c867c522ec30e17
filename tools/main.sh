#!/usr/bin/env bash
# The main job: set up .venv, train the default recipe (digits_lt) and print its Top-1 / Many / Medium / Few table.
# Re-running reuses .venv and the finished run (--resume on a complete run only re-evaluates it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
# one run directory per version of the recipe file: editing the recipe starts a fresh run instead of a refused resume
out="output/digits_lt-$(sha256sum recipes/digits_lt.yaml | cut -c1-8)"
.venv/bin/python train.py --recipe digits_lt --output "$out" --resume "$@"
