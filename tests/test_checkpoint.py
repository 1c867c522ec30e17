"""Checkpoint files: modes under the umask, latest + previous, fallback when the latest is unreadable, safe errors."""
import logging
import os

import pytest
import torch

from lt_recipes.checkpoint import (CheckpointError, UnreadableCheckpointError, atomic_write_json, load_checkpoint,
                                   load_resumable, previous_path, save_checkpoint, size_report)
from lt_recipes.config import defaults, flatten


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_artifacts_honour_the_umask(tmp_path, umask, mode):
    before = os.umask(umask)
    try:
        atomic_write_json(str(tmp_path / "results.json"), {"top1": 1.0})
        save_checkpoint(str(tmp_path / "checkpoint.pt"), {"identity": {}, "epoch": 0})
    finally:
        os.umask(before)
    for name in ("results.json", "checkpoint.pt"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == mode, name


def _save(path, epoch, **extra):
    return save_checkpoint(str(path), {"identity": {"seed": 0}, "epoch": epoch, "w": torch.full((4,), float(epoch)),
                                       **extra})


def test_previous_checkpoint_is_kept_and_used_when_the_latest_is_unreadable(tmp_path, caplog):
    latest = tmp_path / "checkpoint.pt"
    _save(latest, 0)
    _save(latest, 1)
    assert previous_path(str(latest)) == str(tmp_path / "checkpoint.prev.pt")
    assert load_resumable(str(latest))["epoch"] == 1
    assert torch.load(tmp_path / "checkpoint.prev.pt", weights_only=True)["epoch"] == 0
    latest.write_bytes(latest.read_bytes()[:300])  # truncated
    with caplog.at_level(logging.WARNING):
        assert load_resumable(str(latest))["epoch"] == 0
    assert f"checkpoint {latest} is corrupt or truncated" in caplog.text and "checkpoint.prev.pt instead" in caplog.text
    latest.unlink()  # killed between the two renames of a save
    assert load_resumable(str(latest))["epoch"] == 0
    (tmp_path / "checkpoint.prev.pt").write_bytes(b"garbage")
    with pytest.raises(UnreadableCheckpointError, match="checkpoint.prev.pt"):
        load_resumable(str(latest))
    assert load_resumable(str(tmp_path / "none.pt")) is None


def test_a_foreign_latest_checkpoint_is_an_error_not_a_fallback(tmp_path):
    latest = tmp_path / "checkpoint.pt"
    _save(latest, 0)
    _save(latest, 1)
    with pytest.raises(CheckpointError, match="seed=0.*seed=3"):
        load_resumable(str(latest), expect={"seed": 3})


def test_unreadable_file_error_names_it_without_torch_advice(tmp_path):
    class Pickled:
        def __reduce__(self):
            return (os.getcwd, ())

    path = tmp_path / "checkpoint.pt"
    torch.save({"identity": {}, "payload": Pickled()}, path)
    with pytest.raises(UnreadableCheckpointError) as err:
        load_checkpoint(str(path))
    msg = str(err.value)
    assert str(path) in msg and "holds pickled Python objects" in msg and "posix.getcwd" in msg
    assert "weights_only" not in msg and "Re-running" not in msg


def test_recipe_keys_added_later_match_at_their_default(tmp_path):
    config = flatten(defaults())
    old = {k: v for k, v in config.items() if not k.startswith("ema.")}
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(str(path), {"identity": {"config": old}, "epoch": 0})
    load_checkpoint(str(path), expect={"config": config})
    with pytest.raises(CheckpointError, match="ema.decay=None there, ema.decay=0.9 here"):
        load_checkpoint(str(path), expect={"config": {**config, "ema.decay": 0.9}})


def test_size_report_counts_shared_storage_once():
    flat = torch.zeros(1_000_000)  # 4 MB; the model's tensors are views of it, as GSA's flattened parameters are
    state = {"identity": {}, "model": {"a": flat[:500_000], "b": flat[500_000:]},
             "optimizer": {"state": {0: {"m": torch.zeros(250_000)}}},
             "method": {"bank": {"0": torch.zeros(500_000)}, "anchors": torch.zeros(250_000), "rows": []}}
    assert size_report(state, 8_100_000) == "8.1 MB: model 4.0, optimizer 1.0, method 3.0 (bank 2.0, anchors 1.0)"
