"""timm interop and evaluation: validate.py reproduces training's results; tools/export.py writes a state dict that
timm.create_model(pretrained=True, pretrained_cfg_overlay=dict(file=...)) loads; model.pretrained_path reads it."""
import importlib.util
import json
import subprocess
import sys

import pytest
import timm
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from lt_recipes.checkpoint import CheckpointError, atomic_write_yaml, save_checkpoint
from lt_recipes.config import flatten, load_config, load_recipe
from lt_recipes.data import build_data, build_loaders
from lt_recipes.models import create_lt_model
from lt_recipes.sections import Recipe
from toolload import ROOT, load_tool

SETS = ["epochs=2", "method=none", "ema.decay=0.5", "sched.warmup_epochs=0"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from lt_recipes.engine import run

    out = tmp_path_factory.mktemp("run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(load_recipe("digits_lt", SETS), str(out))
    finally:
        torch.set_num_threads(threads)
    return out


def _identity(cfg, num_classes):
    """The parts of a training checkpoint's identity that evaluation and export compare."""
    return {"recipe": cfg["name"], "dataset": cfg["data"]["dataset"], "num_classes": num_classes,
            "model": cfg["model"]["name"], "config": flatten(cfg)}


def safe_open_metadata(path):
    with safe_open(path, "pt") as f:
        return f.metadata()


def _validate_main():
    spec = importlib.util.spec_from_file_location("validate_entry", ROOT / "validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _trained(run_dir, key="model"):
    cfg = load_config(str(run_dir / "args.yaml"))
    model = create_lt_model(Recipe.from_dict(cfg).model, 10, 1)
    model.load_state_dict(torch.load(run_dir / "checkpoint.pt", weights_only=True)[key])
    return model.eval(), cfg


def _test_batch(cfg):
    r = Recipe.from_dict(cfg)
    _, _, test = build_loaders(build_data(r.data, r.seed), r.data, r.seed)
    return next(iter(test))[0]


@pytest.mark.usefixtures("single_thread")
def test_validate_reproduces_the_training_results(run_dir, tmp_path, capsys):
    main = _validate_main()
    assert main(["--checkpoint", str(run_dir / "checkpoint.pt"), "--output", str(tmp_path)] +
                [a for s in SETS for a in ("--set", s)]) == 0
    got, want = json.loads((tmp_path / "results.json").read_text()), json.loads((run_dir / "results.json").read_text())
    for key in ("top1", "top5", "many", "medium", "few", "per_class", "num_test_evaluated", "train_counts", "ema"):
        assert got[key] == want[key], key
    assert got["epoch"] == 1 and f"top1={want['top1']:.2f}  top5={want['top5']:.2f}" in capsys.readouterr().out
    assert main(["--checkpoint", str(run_dir / "checkpoint.pt"), "--set", "model.name=resnet32_cifar"]) == 2
    assert main(["--checkpoint", str(tmp_path / "missing.pt")]) == 2


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("ema", [False, True])
def test_export_loads_in_timm_with_the_classifier(run_dir, tmp_path, capsys, ema):
    out = tmp_path / "digits.safetensors"
    assert load_tool("export").main([str(run_dir), "--out", str(out)] + (["--ema"] if ema else [])) == 0
    printed = capsys.readouterr().out
    assert "backbone and classifier" in printed and "pretrained_cfg_overlay={'file'" in printed
    assert set(load_file(out)) == set(timm.create_model("resnet8_cifar", in_chans=1).state_dict())
    model, cfg = _trained(run_dir, "ema" if ema else "model")
    timm_model = timm.create_model("resnet8_cifar", pretrained=True, num_classes=10, in_chans=1,
                                   pretrained_cfg_overlay=dict(file=str(out), num_classes=10)).eval()
    x = _test_batch(cfg)
    with torch.no_grad():
        torch.testing.assert_close(timm_model(x), model(x), rtol=1e-5, atol=1e-5)
    timm.models.load_checkpoint(timm.create_model("resnet8_cifar", num_classes=10, in_chans=1), str(out))


@pytest.mark.usefixtures("single_thread")
def test_pretrained_path_reads_an_export(run_dir, tmp_path):
    out = tmp_path / "digits.pth"
    assert load_tool("export").main([str(run_dir), "--best", "--out", str(out)]) == 0
    best = torch.load(run_dir / "model_best.pt", weights_only=True)["model"]
    cfg = load_config("digits_lt", [f"model.pretrained_path={out}"])
    model = create_lt_model(Recipe.from_dict(cfg).model, 10, 1)
    for k, v in model.encoder.state_dict().items():
        torch.testing.assert_close(v, best[f"encoder.{k}"], msg=k)


def test_cosine_classifier_and_bcl_heads_export_the_backbone_only(tmp_path, capsys):
    cfg = load_config("digits_lt", ["loss.name=bcl", "data.contrastive_views=2", "model.classifier=cosine",
                                    "model.proj_head=[32, 16]"])
    model = create_lt_model(Recipe.from_dict(cfg).model, 10, 1)
    atomic_write_yaml(str(tmp_path / "args.yaml"), cfg)
    save_checkpoint(str(tmp_path / "checkpoint.pt"), {"identity": _identity(cfg, 10), "epoch": 0,
                                                      "model": model.state_dict()})
    assert load_tool("export").main([str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "backbone only" in printed and "left out: classifier (CosineLinear), proj_head, proto_head" in printed
    features = timm.create_model("resnet8_cifar", pretrained=True, num_classes=0, in_chans=1,
                                 pretrained_cfg_overlay=dict(file=str(tmp_path / "checkpoint.safetensors"),
                                                             num_classes=0)).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(features(x), model.eval().forward_features(x))
    assert load_tool("export").main([str(tmp_path), "--ema"]) == 2  # no EMA weights in this checkpoint


def _resolved(res):
    """timm's data config of the model built by the call export printed, and of the pretrained_cfg beside the file."""
    namespace = {}
    exec(res["call"], namespace)  # the printed code, as a user pastes it
    model = namespace["model"]
    stored = json.loads(open(res["config"]).read())["pretrained_cfg"]
    return [{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()} for cfg in
            (timm.data.resolve_data_config(model=model), timm.data.resolve_data_config(pretrained_cfg=stored))]


@pytest.mark.usefixtures("single_thread")
def test_the_printed_load_code_works_in_a_fresh_interpreter(run_dir, tmp_path, capsys):
    """What export prints after "load it with:" is pasted into a new Python process: it must import what registers
    the CIFAR ResNets itself."""
    assert load_tool("export").main([str(run_dir), "--out", str(tmp_path / "w.safetensors")]) == 0
    code = capsys.readouterr().out.split("load it with:\n", 1)[1]
    proc = subprocess.run([sys.executable, "-c", code + "\nprint(sum(p.numel() for p in model.parameters()))"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout) == sum(p.numel() for p in _trained(run_dir)[0].parameters())


@pytest.mark.usefixtures("single_thread")
def test_export_carries_the_runs_preprocessing_for_a_grey_scale_run(run_dir):
    """digits: 1 channel and its own mean/std, resized whole, not CIFAR's 3-channel statistics."""
    res = load_tool("export").export(str(run_dir))
    want = {"input_size": (1, 8, 8), "interpolation": "bilinear", "mean": (0.3053,), "std": (0.3759,),
            "crop_pct": 1.0, "crop_mode": "center"}
    assert _resolved(res) == [want, want]
    assert json.loads(safe_open_metadata(res["path"])["pretrained_cfg"])["mean"] == [0.3053]


def test_export_carries_the_runs_preprocessing_for_a_list_file_run(image_list_root, tmp_path):
    """A list-file run at 24 px: timm's transforms from the exported model's data config give exactly the run's
    evaluation tensors (resize to 24 / 0.875, centre crop, the recipe's mean/std), not resnet18's 224 px bicubic."""
    from PIL import Image

    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    cfg = load_config("digits_lt", ["data.dataset=imagenet_lt", "data.imbalance_ratio=null", "model.name=resnet18",
                                    f"data.root={image_list_root}", "data.train_list=train.txt", "data.img_size=24",
                                    "data.val_list=val.txt", "data.test_list=test.txt", f"data.mean={mean}",
                                    f"data.std={std}"])
    run = tmp_path / "run"
    atomic_write_yaml(str(run / "args.yaml"), cfg)
    save_checkpoint(str(run / "checkpoint.pt"), {"identity": _identity(cfg, 3), "epoch": 0,
                                                 "model": create_lt_model(Recipe.from_dict(cfg).model, 3, 3).state_dict()})
    res = load_tool("export").export(str(run))
    for got in _resolved(res):
        assert got["input_size"] == (3, 24, 24) and got["interpolation"] == "bilinear" and got["crop_pct"] == 0.875
        assert got["mean"] == tuple(mean) and got["std"] == tuple(std)
    r = Recipe.from_dict(cfg)
    data = build_data(r.data, r.seed)
    transform = timm.data.create_transform(**_resolved(res)[0])
    with Image.open(data.test.paths[0]) as im:
        torch.testing.assert_close(transform(im.convert("RGB")), data.test[0][0])


@pytest.mark.usefixtures("single_thread")
def test_validate_and_export_refuse_a_checkpoint_of_other_data_naming_both_values(run_dir, tmp_path, caplog):
    """A digits checkpoint evaluated with the Fashion-MNIST recipe (10 classes, same model) used to print a Top-1
    with exit 0; the dataset and image size are compared now, before the data is built, and so is the class count."""
    main, ckpt = _validate_main(), str(run_dir / "checkpoint.pt")
    assert main(["--recipe", "fmnist_lt_resnet8", "--checkpoint", ckpt, "--output", str(tmp_path / "v")]) == 2
    assert (f"checkpoint {ckpt} was made with dataset='digits', data.img_size=8; this run has dataset='fmnist', "
            "data.img_size=16") in caplog.text
    caplog.clear()
    assert main(["--checkpoint", ckpt, "--set", "data.img_size=16", "--output", str(tmp_path / "v")]) == 2
    assert "data.img_size=8; this run has data.img_size=16" in caplog.text
    recipe = yaml.safe_load((run_dir / "args.yaml").read_text())
    (tmp_path / "renamed.yaml").write_text(yaml.safe_dump({**recipe, "name": "renamed"}))
    caplog.clear()
    assert main(["--recipe", str(tmp_path / "renamed.yaml"), "--checkpoint", ckpt, "--output", str(tmp_path / "v")]) == 0
    assert f"{ckpt} was trained with recipe digits_lt and is evaluated with recipe renamed" in caplog.text
    state = torch.load(ckpt, weights_only=True)
    state["identity"]["num_classes"] = 7
    torch.save(state, tmp_path / "seven.pt")
    assert main(["--checkpoint", str(tmp_path / "seven.pt"), "--output", str(tmp_path / "v")] +
                [a for s in SETS for a in ("--set", s)]) == 2
    assert "num_classes=7; this run has num_classes=10" in caplog.text
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes((run_dir / "checkpoint.pt").read_bytes())
    (run / "args.yaml").write_text(yaml.safe_dump({**recipe, "data": {**recipe["data"], "img_size": 16}}))
    caplog.clear()
    assert load_tool("export").main([str(run)]) == 2
    assert "data.img_size=8; this run has data.img_size=16" in caplog.text


@pytest.mark.usefixtures("single_thread")
def test_validate_and_export_read_the_runs_own_recipe(tmp_path, caplog):
    """The line a run ends with, `validate.py --checkpoint RUN/model_best.pt`, evaluates a run of any recipe: the
    run's args.yaml beside the checkpoint is the recipe (it was digits_lt's defaults, exit 2 for any other run); a
    --recipe still overrides it, checked against the checkpoint."""
    cfg = load_config("digits_lt", SETS + ["data.img_size=16", "name=sixteen"])
    run = tmp_path / "run"
    atomic_write_yaml(str(run / "args.yaml"), cfg)
    model = create_lt_model(Recipe.from_dict(cfg).model, 10, 1)
    save_checkpoint(str(run / "model_best.pt"), {"identity": _identity(cfg, 10), "epoch": 0,
                                                 "model": model.state_dict()})
    main = _validate_main()
    assert main(["--checkpoint", str(run / "model_best.pt")]) == 0, caplog.text
    assert json.loads((run / "validate-model_best" / "results.json").read_text())["recipe"] == "sixteen"
    assert main(["--checkpoint", str(run / "model_best.pt"), "--recipe", "digits_lt",
                 "--output", str(tmp_path / "v")]) == 2
    assert "data.img_size=16; this run has data.img_size=8" in caplog.text
    caplog.clear()
    assert load_tool("export").main([str(run), "--best", "--recipe", "digits_lt"]) == 2
    assert "data.img_size=16; this run has data.img_size=8" in caplog.text
    assert load_tool("export").main([str(run), "--best", "--out", str(tmp_path / "w.pth")]) == 0


@pytest.mark.usefixtures("single_thread")
def test_resume_refuses_a_checkpoint_of_other_data_naming_both_values(run_dir, tmp_path):
    from lt_recipes.engine import run

    (tmp_path / "checkpoint.pt").write_bytes((run_dir / "checkpoint.pt").read_bytes())
    with pytest.raises(CheckpointError, match="data.img_size=8 there, data.img_size=16 here"):
        run(load_recipe("digits_lt", SETS + ["data.img_size=16"]), str(tmp_path), resume=True)


def test_export_names_a_missing_run(tmp_path):
    assert load_tool("export").main([str(tmp_path / "nope")]) == 2
