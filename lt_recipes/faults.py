"""Fail points for crash tests: `LT_RECIPES_FAILPOINT=NAME:N` kills the process with SIGKILL at the N-th hit of NAME.

Named points: `step` (after a training step), `write` (an artifact's temporary file is complete but not yet
renamed over the old one), `grouping` (groups computed, Fisher not yet estimated). Unset, a hit costs one dict
lookup. tests/test_faults.py uses them to show that `--resume` after a kill at any of these moments ends with
exactly the results of an uninterrupted run.
"""
from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def hit(name: str) -> None:
    """Count a pass through fail point `name`; SIGKILL this process when the environment asks for it."""
    spec = os.environ.get("LT_RECIPES_FAILPOINT")
    if not spec:
        return
    target, _, n = spec.partition(":")
    if target != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == int(n or 1):
        os.kill(os.getpid(), signal.SIGKILL)
