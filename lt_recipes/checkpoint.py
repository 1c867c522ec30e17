"""Crash-safe files: every artifact is written to a temporary file in the same folder, then renamed over the target.

A kill at any moment leaves either the old file or the new one, never a half-written one. Checkpoints are read
with `torch.load(weights_only=True)`, so a checkpoint cannot run arbitrary code, and a truncated or corrupt file
or one from another recipe is reported with its path.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
from typing import Any, Callable, Sequence

import torch
import yaml

from . import faults

_logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: corrupt, truncated, or made by a different run set-up."""


def _atomic_write(path: str, write: Callable[[Any], None], mode: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        faults.hit("write")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write text so that readers see the old or the new content only."""
    _atomic_write(path, lambda f: f.write(text), "w")


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write bytes atomically."""
    _atomic_write(path, lambda f: f.write(data), "wb")


def atomic_write_json(path: str, obj: Any) -> None:
    """JSON artifact (results.json, groups.json), written atomically; NaN is written as null."""
    atomic_write_text(path, json.dumps(_nan_to_none(obj), indent=2) + "\n")


def atomic_write_yaml(path: str, obj: Any) -> None:
    """YAML artifact (args.yaml), written atomically."""
    atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))


def atomic_write_csv(path: str, rows: Sequence[dict[str, Any]]) -> None:
    """summary.csv: one row per epoch; the header is the union of keys in first-seen order."""
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    """torch.save into a temporary file, then rename: the previous checkpoint survives a kill mid-write."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str, expect: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a checkpoint safely (weights_only) and check that it belongs to this run set-up.

    `expect` maps identity keys (recipe, num_classes, model, method, ..., and `config`: the flattened recipe) to the
    values of the current run; any difference is an error naming the key(s) and both values.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated/corrupt zip archives and unpickling
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated and cannot be read: "
                              f"{type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or "identity" not in state:
        raise CheckpointError(f"checkpoint {path} is not an lt-recipes checkpoint (no 'identity' entry)")
    for key, want in (expect or {}).items():
        have = state["identity"].get(key)
        if isinstance(want, dict) and isinstance(have, dict):
            diff = sorted(k for k in set(want) | set(have) if have.get(k) != want.get(k))
            if diff:
                raise CheckpointError(f"checkpoint {path} was made with a different recipe: " + "; ".join(
                    f"{k}={have.get(k)!r} there, {k}={want.get(k)!r} here" for k in diff[:5]) +
                    (f" (and {len(diff) - 5} more)" if len(diff) > 5 else ""))
        elif isinstance(want, dict) and have is None:
            raise CheckpointError(f"checkpoint {path} does not record its {key} (made before lt-recipes did), so it "
                                  "cannot be checked against this run: start a new --output")
        elif have != want:
            raise CheckpointError(f"checkpoint {path} was made with {key}={have!r}, this run has {key}={want!r}")
    return state
