"""Crash-safe files: every artifact is written to a temporary file in the same folder, then renamed over the target.

A kill at any moment leaves either the old file or the new one, never a half-written one; files get the mode the
umask gives (0644 under the usual 022), not mkstemp's 0600. The checkpoint being replaced is kept as
`checkpoint.prev.pt`, and resuming falls back to it when the latest is missing or unreadable. Checkpoints are read
with `torch.load(weights_only=True)`, so a checkpoint cannot run arbitrary code, and a truncated or corrupt file
or one from another recipe is reported with its path. A write that fails (no permission, a read-only file system, a
full disk) is an `OutputError` naming the path and the reason, and leaves the file that was there.
"""
from __future__ import annotations

import csv
import errno
import io
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Callable, Sequence

import torch
import yaml

from . import faults
from .config import defaults, flatten, retired_identity
from .errors import CheckpointError, OutputError, UnreadableCheckpointError, read_error

_logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "model_best.pt"


def _file_mode() -> int:
    """The mode open() gives a new file under the process umask (mkstemp would give 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _write_failure(path: str, e: OSError, nbytes: int | None = None) -> str:
    """What a failed write of `path` (a file or a folder) says: the path (and the one that failed when it is a parent
    folder), the system's reason for the errno and, for a full disk, the bytes needed and free."""
    reason = os.strerror(e.errno) if e.errno else str(e)
    parent = e.filename if e.filename and e.filename != path and not str(e.filename).endswith(".tmp") else None
    text = f"cannot write {path}" + (f" ({parent})" if parent else "") + f": {reason}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = shutil.disk_usage(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))).free
            room = f"{free / 1e6:.1f} MB free"
        except OSError:
            room = "free space unknown"
        text += f" ({f'{nbytes / 1e6:.1f} MB needed, ' if nbytes is not None else ''}{room}); free some space"
    return text


def check_output_dir(path: str) -> None:
    """Create the output folder and write and remove a probe file in it, so that a folder that cannot be written is
    an exit-2 error naming it before any data or model is built (not a traceback after them)."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=".tmp", dir=path)
        try:
            os.write(fd, b"lt-recipes")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise OutputError(_write_failure(path, e)) from None


def _atomic_write(path: str, data: bytes, point: str = "write",
                  before_replace: Callable[[], None] | None = None) -> None:
    """Write through a temporary file in the same folder, then rename; `point` names the fail point (faults.py)
    between the two, `before_replace` runs just before the rename. A failed write (`OutputError`) leaves the file
    that was there."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise OutputError(_write_failure(path, e, len(data))) from None
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        faults.hit(point)
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise OutputError(f"{_write_failure(path, e, len(data))}; the file there before, if any, is unchanged") \
                from None
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write text (UTF-8) so that readers see the old or the new content only."""
    _atomic_write(path, text.encode("utf-8"))


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write bytes atomically."""
    _atomic_write(path, data)


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


def previous_path(path: str) -> str:
    """Where the checkpoint replaced by the newest one is kept: checkpoint.pt -> checkpoint.prev.pt."""
    root, ext = os.path.splitext(path)
    return f"{root}.prev{ext}"


def has_checkpoint(run_dir: str) -> bool:
    """Whether `run_dir` holds a checkpoint to resume from (the latest or the previous one kept beside it)."""
    path = os.path.join(run_dir, CHECKPOINT_NAME)
    return os.path.exists(path) or os.path.exists(previous_path(path))


def save_checkpoint(path: str, state: dict[str, Any], keep_previous: bool = True, point: str = "checkpoint") -> int:
    """torch.save into a temporary file, then rename; with `keep_previous` the file it replaces is first renamed to
    `previous_path(path)`. A kill at any moment leaves a readable checkpoint. Returns the size in bytes."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()

    def rotate() -> None:
        if keep_previous and os.path.exists(path):
            os.replace(path, previous_path(path))

    _atomic_write(path, data, point=point, before_replace=rotate)
    return len(data)


def tensor_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of the distinct tensor storages in a nested state (each storage once, as torch.save writes it)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if not storage.nbytes() or storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    return 0


def size_report(state: dict[str, Any], nbytes: int) -> str:
    """'12.3 MB: model 4.1, optimizer 4.1, method 4.1 (bank 2.0, anchors 1.0, fisher 1.0)' for the log."""
    seen: set[int] = set()
    parts = []
    for key, value in state.items():
        size = tensor_bytes(value, seen)
        if not size:
            continue
        inner: list[tuple[str, int]] = []
        if isinstance(value, dict) and any(isinstance(v, (dict, list, tuple)) for v in value.values()):
            inner_seen: set[int] = set()  # a state of named parts (the method's), not a flat state dict
            inner = sorted(((k, tensor_bytes(v, inner_seen)) for k, v in value.items()), key=lambda kv: -kv[1])
        inner = [f"{k} {b / 1e6:.1f}" for k, b in inner if b >= 0.01 * size][:4]
        parts.append(f"{key} {size / 1e6:.1f}" + (f" ({', '.join(inner)})" if len(inner) > 1 else ""))
    return f"{nbytes / 1e6:.1f} MB: " + ", ".join(parts)


def load_resumable(path: str, expect: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The checkpoint at `path`, or the previous one kept beside it when `path` is missing or unreadable (logged);
    None when there is neither. A checkpoint from another run set-up is an error, never skipped."""
    prev = previous_path(path)
    if os.path.exists(path):
        try:
            return load_checkpoint(path, expect)
        except UnreadableCheckpointError as e:
            if not os.path.exists(prev):
                raise
            _logger.warning("%s; resuming from the previous checkpoint %s instead", e, prev)
    elif os.path.exists(prev):
        _logger.warning("%s is missing (the run stopped while replacing it); resuming from the previous checkpoint %s",
                        path, prev)
    else:
        return None
    return load_checkpoint(prev, expect)


def evaluation_identity(cfg: dict[str, Any], num_classes: int | None = None) -> dict[str, Any]:
    """What a checkpoint must agree on with the recipe that evaluates or exports it (validate.py, tools/export.py):
    the data (dataset, image size, class count when known) and the model, not how it was trained."""
    return {"dataset": cfg["data"]["dataset"], "data.img_size": cfg["data"]["img_size"], "model": cfg["model"]["name"],
            **({} if num_classes is None else {"num_classes": num_classes})}


def _recorded(identity: dict[str, Any], key: str) -> Any:
    """A checkpoint identity's value of `key`; a dotted key (data.img_size) is the recipe key in its config."""
    if key in identity or "." not in key:
        return identity.get(key)
    return (identity.get("config") or {}).get(key)


# What --resume with another `epochs` says: the schedule is a function of epochs, so a run is not extended in place.
EXTEND_RUN = ("; epochs shapes the whole schedule (learning rate, warm-up, grouping epochs), so a run resumes with "
              "its own: to train longer, start a new --output with --set epochs=N --set model.pretrained_path=<this "
              "checkpoint> (its weights; the optimizer, memory bank and groups start afresh)")


def check_identity(path: str, identity: dict[str, Any], expect: dict[str, Any]) -> None:
    """An error naming every key of `expect` (plain values; dotted keys are recipe keys) whose value in the
    checkpoint's identity differs, with both values."""
    differ = [k for k, want in expect.items() if _recorded(identity, k) != want]
    if differ:
        raise CheckpointError(f"checkpoint {path} was made with "
                              + ", ".join(f"{k}={_recorded(identity, k)!r}" for k in differ)
                              + "; this run has " + ", ".join(f"{k}={expect[k]!r}" for k in differ)
                              + (EXTEND_RUN if "epochs" in differ else ""))


def load_checkpoint(path: str, expect: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a checkpoint safely (weights_only) and check that it belongs to this run set-up.

    `expect` maps identity keys (recipe, num_classes, model, method, ..., and `config`: the flattened recipe) to the
    values of the current run; any difference is an error naming the key(s) and both values, the main keys first. A
    recipe key that lt-recipes gained after the checkpoint was written matches when it is at its default (which keeps
    the behaviour the checkpoint was trained with).
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated/corrupt zip archives and unpickling
        raise UnreadableCheckpointError(f"checkpoint {path} {read_error(e)} and cannot be read") from None
    if not isinstance(state, dict) or "identity" not in state:
        raise CheckpointError(f"checkpoint {path} is not an lt-recipes checkpoint (no 'identity' entry)")
    expect = expect or {}
    identity = retired_identity(state["identity"])
    check_identity(path, identity, {k: v for k, v in expect.items() if not isinstance(v, dict)})
    for key, want in expect.items():
        if not isinstance(want, dict):
            continue
        have = identity.get(key)
        if not isinstance(have, dict):
            raise CheckpointError(f"checkpoint {path} does not record its {key} (made before lt-recipes did), so it "
                                  "cannot be checked against this run: start a new --output")
        added = flatten(defaults())
        diff = sorted(k for k in set(want) | set(have) if have.get(k) != want.get(k)
                      and not (k not in have and k in added and want[k] == added[k]))
        if diff:
            raise CheckpointError(f"checkpoint {path} was made with a different recipe: " + "; ".join(
                f"{k}={have.get(k)!r} there, {k}={want.get(k)!r} here" for k in diff[:5]) +
                (f" (and {len(diff) - 5} more)" if len(diff) > 5 else ""))
    return state
