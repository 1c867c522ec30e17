#!/usr/bin/env bash
# The whole test suite, after the same set-up as the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
.venv/bin/python -m pytest -q tests "$@"
