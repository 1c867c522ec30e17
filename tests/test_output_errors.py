"""Write failures: an unwritable output folder is named before any data or model is built (train.py, validate.py,
tools/export.py), and a write that fails midway (a full disk) is exit 2 naming the path, with the checkpoints intact."""
import errno
import importlib.util
import os

import pytest
import torch

from lt_recipes import engine
from lt_recipes.checkpoint import atomic_write_yaml, load_resumable, save_checkpoint
from lt_recipes.cli import run_recipe
from lt_recipes.config import flatten, load_config
from toolload import ROOT, load_tool


def _entry(script):
    spec = importlib.util.spec_from_file_location(f"{script}_entry", ROOT / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _not_built(*args, **kwargs):
    raise AssertionError("data or model built before the output folder was checked")


class _FullDisk:
    """A file whose write stores the first `room` bytes and then fails as a full disk does."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        self.f.write(data[:self.room])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_checkpoint_write_failing_midway_keeps_both_checkpoints(tmp_path, monkeypatch, caplog):
    latest = tmp_path / "checkpoint.pt"
    for epoch in (0, 1):
        save_checkpoint(str(latest), {"identity": {}, "epoch": epoch, "w": torch.full((100_000,), float(epoch))})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_fdopen = os.fdopen

    def body(cfg):
        with monkeypatch.context() as m:
            m.setattr(os, "fdopen", lambda fd, *a, **kw: _FullDisk(real_fdopen(fd, *a, **kw), 4096))
            save_checkpoint(str(latest), {"identity": {}, "epoch": 2, "w": torch.full((100_000,), 2.0)})
        return 0

    assert run_recipe("digits_lt", [], body) == 2
    assert f"cannot write {latest}: No space left on device (0.4 MB needed, " in caplog.text
    assert "MB free); free some space; the file there before, if any, is unchanged" in caplog.text
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary file left either
    assert load_resumable(str(latest))["epoch"] == 1


@pytest.fixture
def under_a_file(tmp_path):
    """An output path whose parent is a regular file: unwritable for root too (chmod does not stop root)."""
    (tmp_path / "file").write_text("not a folder")
    return tmp_path / "file" / "run"


def test_train_names_an_unwritable_output_before_building_anything(under_a_file, monkeypatch, caplog):
    monkeypatch.setattr(engine, "build_data", _not_built)
    assert _entry("train")(["--output", str(under_a_file)]) == 2
    assert "cannot write" in caplog.text and f"{under_a_file}" in caplog.text  # the folder or its train.log
    assert os.strerror(errno.ENOTDIR) in caplog.text


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
def test_permission_and_read_only_errors_are_named(tmp_path, monkeypatch, caplog, code):
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(engine, "build_data", _not_built)
    monkeypatch.setattr("tempfile.mkstemp", refuse)
    assert _entry("train")(["--output", str(tmp_path / "run")]) == 2
    assert f"cannot write {tmp_path / 'run'}: {os.strerror(code)}" in caplog.text


def _digits_run(folder):
    """args.yaml and a checkpoint whose identity fits the digits recipe (no weights: nothing gets that far)."""
    cfg = load_config("digits_lt")
    atomic_write_yaml(str(folder / "args.yaml"), cfg)
    save_checkpoint(str(folder / "checkpoint.pt"), {
        "identity": {"dataset": "digits", "num_classes": 10, "model": cfg["model"]["name"], "config": flatten(cfg)},
        "epoch": 0, "model": {}})
    return folder / "checkpoint.pt"


def test_validate_names_an_unwritable_output_before_building_anything(tmp_path, under_a_file, monkeypatch, caplog):
    monkeypatch.setattr(engine, "build_data", _not_built)
    assert _entry("validate")(["--checkpoint", str(_digits_run(tmp_path)), "--output", str(under_a_file)]) == 2
    assert f"cannot write {under_a_file}: {os.strerror(errno.ENOTDIR)}" in caplog.text


def test_export_names_an_unwritable_output_before_building_anything(tmp_path, under_a_file, monkeypatch, caplog):
    _digits_run(tmp_path)
    tool = load_tool("export")
    monkeypatch.setattr(tool, "create_lt_model", _not_built)
    assert tool.main([str(tmp_path), "--out", str(under_a_file / "digits.safetensors")]) == 2
    assert f"cannot write {under_a_file}: {os.strerror(errno.ENOTDIR)}" in caplog.text
