#!/usr/bin/env bash
# The main job: set up .venv, train the default recipe (digits_lt) and print its Top-1 / Many / Medium / Few table.
# Re-running reuses .venv and the finished run (--resume-or-start on a complete run only re-evaluates it).
# Environment (both optional; relative paths are taken from the repository root):
#   PYTHON     an interpreter that already has the requirements and the built package: .venv is then neither set up
#              (tools/setup_env.sh is not run) nor used. Default: .venv/bin/python after tools/setup_env.sh.
#   LT_OUTPUT  the run directory, e.g. a scratch folder for a short test run that must leave the real run alone.
#              Default: output/digits_lt-<first 8 hex digits of the recipe file's sha256>.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  bash tools/setup_env.sh
fi
PY=${PYTHON:-.venv/bin/python}
# one run directory per version of the recipe file: editing the recipe starts a fresh run instead of a refused resume
out=${LT_OUTPUT:-output/digits_lt-$(sha256sum recipes/digits_lt.yaml | cut -c1-8)}
"$PY" train.py --recipe digits_lt --output "$out" --resume-or-start "$@"
