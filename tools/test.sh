#!/usr/bin/env bash
# The whole test suite, after the same set-up as the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
# two workers: most tests run one thread (or one-thread subprocesses), so the second core would sit idle; work
# stealing keeps both busy to the end (a few tests take a minute each)
.venv/bin/python -m pytest -q -n 2 --dist worksteal tests "$@"
