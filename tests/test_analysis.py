"""Analysis tools: power iteration, filter normalization, collect_results tables, plot_run and landscape outputs."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from matplotlib.image import imread
from torch import nn

from lt_recipes.checkpoint import atomic_write_csv, save_checkpoint
from lt_recipes.sections import Recipe
from toolload import load_tool

# tools/'s sibling module, importable once toolload has put tools/ on sys.path
from analysis import (AnalysisError, analysis_groups, balanced_indices, filter_normalized_direction, group_means,
                      hessian_vector_product, read_summary, split_boundaries, top_hessian_eigenvalue)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin-waiting on the shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- Hessian power iteration ----------------------------------------------------------------------------------
def _quadratic(eigs: list[float], seed: int = 0) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((len(eigs), len(eigs))))
    return q @ np.diag(eigs) @ q.T


def test_power_iteration_finds_top_eigenvalue_of_quadratic() -> None:
    a = _quadratic([4.0, 2.5, 1.0, 0.5, 0.1, -0.3])
    A = torch.tensor(a)
    # theta split over two parameter tensors, loss split into two terms: both must be summed correctly
    x1 = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def terms():
        for weight in (0.25, 0.75):
            x = torch.cat([x1.reshape(-1), x2])
            yield weight * 0.5 * x @ A @ x

    lam = top_hessian_eigenvalue(terms, [x1, x2], iters=200, seed=3, tol=1e-12)
    assert abs(lam - np.linalg.eigvalsh(a).max()) < 1e-3


def test_hessian_vector_product_matches_matrix_and_ignores_unused_params() -> None:
    a = _quadratic([3.0, 1.0, 0.2], seed=1)
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    unused = torch.randn(2, dtype=torch.float64, requires_grad=True)
    v = [torch.randn(3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)]
    hv = hessian_vector_product(lambda: [0.5 * x @ torch.tensor(a) @ x], [x, unused], v)
    np.testing.assert_allclose(hv[0].numpy(), a @ v[0].numpy(), rtol=1e-12, atol=1e-12)
    assert torch.equal(hv[1], torch.zeros(2, dtype=torch.float64))


def test_power_iteration_on_small_network_matches_dense_hessian() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 3, (16,))
    params = list(net.parameters())
    shapes = [p.shape for p in params]

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        chunks, off = [], 0
        for s in shapes:
            chunks.append(flat[off:off + math.prod(s)].view(s))
            off += math.prod(s)
        h = torch.tanh(x @ chunks[0].T + chunks[1])
        return F.cross_entropy(h @ chunks[2].T + chunks[3], y)

    dense = torch.autograd.functional.hessian(loss_of, torch.cat([p.detach().reshape(-1) for p in params]))
    eig = torch.linalg.eigvalsh(dense)
    top = float(eig[eig.abs().argmax()])
    lam = top_hessian_eigenvalue(lambda: [F.cross_entropy(net(x), y)], params, iters=500, tol=1e-12)
    assert abs(lam - top) < 1e-3 * max(1.0, abs(top))


# ---- filter-normalized directions -----------------------------------------------------------------------------
def _small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 3))


def test_filter_normalized_direction_has_weight_filter_norms() -> None:
    torch.manual_seed(0)
    net = _small_net()
    with torch.no_grad():
        net[0].weight[1].mul_(7.0)  # filters of very different sizes
    direction = filter_normalized_direction(net, seed=5)
    for (name, p), d in zip(net.named_parameters(), direction):
        assert d.shape == p.shape and d.dtype == p.dtype
        if p.dim() <= 1:
            assert torch.count_nonzero(d) == 0, name
            continue
        w_norms = p.detach().double().reshape(p.shape[0], -1).norm(dim=1)
        d_norms = d.double().reshape(p.shape[0], -1).norm(dim=1)
        torch.testing.assert_close(d_norms, w_norms, rtol=1e-5, atol=0)


def test_same_seed_gives_same_direction_across_runs() -> None:
    torch.manual_seed(0)
    a, b = _small_net(), _small_net()  # two "runs": same architecture, different weights
    da, db = filter_normalized_direction(a, 2), filter_normalized_direction(b, 2)
    dc = filter_normalized_direction(a, 3)
    for pa, pb, xa, xb, xc in zip(a.parameters(), b.parameters(), da, db, dc):
        if pa.dim() <= 1:
            continue
        # same random draw: the unit filters agree, only the per-filter scale follows each run's weights
        ua = xa.reshape(pa.shape[0], -1) / pa.detach().reshape(pa.shape[0], -1).norm(dim=1, keepdim=True)
        ub = xb.reshape(pb.shape[0], -1) / pb.detach().reshape(pb.shape[0], -1).norm(dim=1, keepdim=True)
        torch.testing.assert_close(ua, ub)
        assert not torch.allclose(xa, xc)


# ---- groups and samples ---------------------------------------------------------------------------------------
def test_group_means_balanced_indices_and_splits() -> None:
    targets = torch.tensor([0, 0, 1, 2, 2, 2])
    values = torch.tensor([1.0, 3.0, 5.0, 0.0, 3.0, 6.0], dtype=torch.float64)
    means = group_means(values, targets, {"a": [0, 1], "b": [2], "empty": [7]})
    assert means["a"] == pytest.approx(3.0) and means["b"] == pytest.approx(3.0) and math.isnan(means["empty"])
    t = np.array([0] * 10 + [1] * 3 + [2] * 1)
    idx = balanced_indices(t, per_class=4, seed=0)
    assert np.bincount(t[idx]).tolist() == [4, 3, 1] and len(set(idx.tolist())) == len(idx)
    assert np.array_equal(idx, balanced_indices(t, per_class=4, seed=0))
    counts = [150, 120, 60, 30, 10, 5]
    assert split_boundaries(counts) == [("many", 0, 1), ("medium", 2, 3), ("few", 4, 5)]
    assert analysis_groups(None, counts) == {"all": list(range(6)), "many": [0, 1], "medium": [2, 3], "few": [4, 5]}
    assert analysis_groups({"groups": [list(range(6))]}, counts) == analysis_groups(None, counts)
    assert analysis_groups({"groups": [[0, 2], [1, 3, 4, 5]]}, counts) == {
        "all": list(range(6)), "g0": [0, 2], "g1": [1, 3, 4, 5]}


def test_read_summary_names_bad_cell(tmp_path: Path) -> None:
    path = tmp_path / "summary.csv"
    path.write_text("epoch,lr,alpha\n0,0.1,\n1,0.05,oops\n")
    with pytest.raises(AnalysisError, match=r"line 3, column 'alpha': value 'oops'"):
        read_summary(str(path))
    path.write_text("epoch,lr,alpha\n0,0.1,\n1,0.05,0.9\n")
    cols = read_summary(str(path))
    assert math.isnan(cols["alpha"][0]) and cols["alpha"][1] == 0.9 and cols["epoch"].tolist() == [0.0, 1.0]


# ---- collect_results ------------------------------------------------------------------------------------------
COUNTS = [300, 150, 80, 40, 15, 5]  # many: 0-1, medium: 2-3, few: 4-5
RUNS = {  # method: [(top1, many, medium, few) per seed]
    "ce": [(39.0, 80.0, 30.0, 5.0), (41.0, 82.0, 34.0, 7.0)],
    "ce+gkp+gsa": [(43.0, 80.0, 40.0, 9.0), (44.0, 81.0, 41.0, 10.0)],
    "ce+gkp+gsa@sam": [(40.5, 81.0, 35.0, 6.0)],
}


def _write_results(root: Path) -> None:
    for method, seeds in RUNS.items():
        for seed, (top1, many, medium, few) in enumerate(seeds):
            d = root / "fmnist_r100" / method / f"seed{seed}"
            d.mkdir(parents=True)
            per_class = [many, many, medium, medium, few, few]
            (d / "results.json").write_text(json.dumps({
                "recipe": "fmnist_lt_resnet8", "method": method, "dataset": "fmnist", "imbalance_ratio": 100.0,
                "seed": seed, "epochs": 2, "top1": top1, "many": many, "medium": medium, "few": few,
                "per_class": per_class, "train_counts": COUNTS, "num_test_evaluated": 60}))
            (d / "args.yaml").write_text(yaml.safe_dump({"groups": {"num_groups": 4}}))


def _row(text: str, label: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| `{label}` |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_collect_results_tables_check_and_plot(tmp_path: Path) -> None:
    tool = load_tool("collect_results")
    _write_results(tmp_path / "results")
    doc, readme = tmp_path / "docs" / "results.md", tmp_path / "README.md"
    doc.parent.mkdir()
    head, tail = "# Title\n\nintro text\n\n", "\n\n## After\nkept as is\n"
    doc.write_text(head + "<!-- results:begin -->\nold\n<!-- results:end -->" + tail)
    readme.write_text("# Front\n\n<!-- headline:begin -->\n<!-- headline:end -->\n")
    argv = ["--results", str(tmp_path / "results"), "--doc", str(doc), "--readme", str(readme), "--docs",
            str(tmp_path / "docs")]
    assert tool.main(argv) == 0
    text = doc.read_text()
    assert text.startswith(head) and text.endswith(tail) and "old" not in text
    # hand-computed: ce top1 39, 41 -> 40 +- sqrt(2); ce+gkp+gsa 43, 44 -> 43.5 +- sqrt(0.5)
    assert _row(text, "ce") == ["`ce`", "2", "40.00 ± 1.41", "81.00 ± 1.41", "32.00 ± 2.83", "6.00 ± 1.41",
                                "—", "—"]
    # delta 3.5 > 1.41 + 0.71: beyond the seed spread
    assert _row(text, "ce+gkp+gsa") == ["`ce+gkp+gsa`", "2", "43.50 ± 0.71", "80.50 ± 0.71", "40.50 ± 0.71",
                                        "9.50 ± 0.71", "+3.50", "yes"]
    # one seed: no std, spread undecidable
    assert _row(text, "ce+gkp+gsa@sam")[2:] == ["40.50", "81.00", "35.00", "6.00", "+0.50", "n/a"]
    comp = next(ln for ln in text.splitlines() if ln.startswith("| `ce` | 40.00"))
    assert "43.50 ± 0.71 (+3.50, yes)" in comp
    direction_rows = [ln for ln in text.splitlines() if ln.startswith(("| SAM", "| GSA"))]
    assert [r.split("|")[2].strip() for r in direction_rows] == ["`ce+gkp+gsa@sam`", "`ce+gkp+gsa`"]
    assert direction_rows[0].rstrip(" |").endswith("52.1") and direction_rows[1].rstrip(" |").endswith("53.2")
    png = tmp_path / "docs" / "per_class_fmnist_r100.png"
    assert imread(str(png)).ndim == 3 and "](per_class_fmnist_r100.png)" in text
    front = readme.read_text()
    assert "| fmnist r=100, 2 ep | `ce` | 40.00 ± 1.41 (6.00) | 43.50 ± 0.71 (9.50) | +3.50 | yes | 2 |" in front
    # regenerating is a no-op and --check agrees; an edited number in either block is detected
    assert tool.main(argv) == 0 and doc.read_text() == text and readme.read_text() == front
    assert tool.main(argv + ["--check"]) == 0
    doc.write_text(text.replace("43.50 ± 0.71", "45.00 ± 0.71", 1))
    assert tool.main(argv + ["--check"]) == 1
    doc.write_text(text)
    readme.write_text(front.replace("+3.50", "+4.50"))
    assert tool.main(argv + ["--check"]) == 1
    doc.write_text("no markers here\n")
    assert tool.main(argv) == 2 and doc.read_text() == "no markers here\n"


def _write_run(root: Path, folder: str, label: str, seed: int, metrics: tuple, groups: int = 4) -> Path:
    d = root / folder / label / f"seed{seed}"
    d.mkdir(parents=True)
    top1, many, medium, few = metrics
    (d / "results.json").write_text(json.dumps({
        "recipe": "fmnist_lt_resnet8", "method": label.partition("#")[0], "dataset": "fmnist",
        "imbalance_ratio": 100.0, "seed": seed, "epochs": 2, "top1": top1, "many": many, "medium": medium,
        "few": few, "per_class": [many, many, medium, medium, few, few], "train_counts": COUNTS,
        "num_test_evaluated": 60}))
    (d / "args.yaml").write_text(yaml.safe_dump({"groups": {"num_groups": groups}}))
    if "#" in label:
        (d / "variant.json").write_text(json.dumps({"name": label.partition("#")[2], "overrides": ["x=1"]}))
    return d


def test_collect_results_variants_groups_history_and_empty_split(tmp_path: Path) -> None:
    tool = load_tool("collect_results")
    root = tmp_path / "results"
    _write_results(root)
    _write_run(root, "fmnist_r100", "ce+gkp+gsa#G2", 0, (50.0, 70.0, 45.0, 20.0), groups=2)
    _write_run(root, "fmnist_r100", "ce+gkp+gsa#euclidean", 0, (30.0, 60.0, 20.0, 1.0))
    _write_run(root / "history" / "v1", "fmnist_r100", "ce+gkp+gsa", 0, (20.0, 60.0, 5.0, 0.0))
    # a ratio without Few classes: null in results.json, a dash in the table
    d = root / "fmnist_r10" / "ce" / "seed0"
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({
        "recipe": "fmnist_lt_resnet8", "method": "ce", "dataset": "fmnist", "imbalance_ratio": 10.0, "seed": 0,
        "epochs": 2, "top1": 70.0, "many": 75.0, "medium": 60.0, "few": None, "per_class": [75.0, 60.0],
        "train_counts": [100, 40], "num_test_evaluated": 20}))
    block = tool.build_block(str(root), str(tmp_path / "README.md"), str(tmp_path / "docs"), False)
    assert "### fmnist r=100, 2 epochs" in block
    assert "| `ce` | 1 | 70.00 | 75.00 | 60.00 | — |" in block
    # a variant is compared with its base loss alone: 30 - 40 = -10, beyond 1.41 (one seed: n/a)
    assert _row(block, "ce+gkp+gsa#euclidean")[2:] == ["30.00", "60.00", "20.00", "1.00", "-10.00", "n/a"]
    groups = [ln for ln in block.splitlines() if ln.startswith("| `ce+gkp+gsa` | ")][-2:]
    assert [r.split("|")[2:5] for r in groups] == [[" 2 ", " 1 ", " 50.00 "], [" 4 ", " 2 ", " 43.50 ± 0.71 "]]
    # the v1 history: base now, v1, now
    assert "| fmnist_r100 | `ce+gkp+gsa` | 40.00 ± 1.41 | 20.00 | 43.50 ± 0.71 |" in block
    (root / "fmnist_r100" / "ce+gkp+gsa#G2" / "seed0" / "variant.json").unlink()
    with pytest.raises(AnalysisError, match="a '#G2' run needs a variant.json naming it"):
        tool.build_block(str(root), str(tmp_path / "README.md"), str(tmp_path / "docs"), False)


def test_collect_results_rejects_mislabelled_run(tmp_path: Path) -> None:
    tool = load_tool("collect_results")
    _write_results(tmp_path / "results")
    bad = tmp_path / "results" / "fmnist_r100" / "ce" / "seed1" / "results.json"
    bad.write_text(bad.read_text().replace('"method": "ce"', '"method": "la"'))
    with pytest.raises(AnalysisError, match=r"seed1/results.json: method 'la' does not match its folder 'ce'"):
        tool.build_block(str(tmp_path / "results"), str(tmp_path / "README.md"), str(tmp_path / "docs"), False)


# ---- plot_run ---------------------------------------------------------------------------------------------------
def _digits_cfg(method: str = "gkp_gsa") -> dict:
    from lt_recipes.config import load_config
    return load_config("digits_lt", [f"method={method}", "epochs=3", "groups.start_epoch=1",
                                     "data.eval_batch_size=32"])


def test_plot_run_writes_pngs(tmp_path: Path) -> None:
    tool = load_tool("plot_run")
    run = tmp_path / "run"
    run.mkdir()
    (run / "args.yaml").write_text(yaml.safe_dump(_digits_cfg()))  # train counts are rebuilt from it
    nan = float("nan")
    rows = [{"epoch": 0, "lr": 0.05, "train_loss": 2.1, "val_top1": 30.0, "time": 1.0, "skipped_steps": 0,
             "alpha": nan, "num_groups": 0, "bank_snapshots": 1, "loss_g0": nan, "rho_g0": nan, "cos_g0": nan,
             "loss_g1": nan, "rho_g1": nan, "cos_g1": nan, "gkp": nan}]
    for e in (1, 2):
        rows.append({"epoch": e, "lr": 0.05 / e, "train_loss": 1.5 / e, "val_top1": 40.0 + e, "time": 1.0,
                     "skipped_steps": 0, "alpha": 0.95 - 0.1 * e, "num_groups": 2, "bank_snapshots": 2,
                     "loss_g0": 1.0, "rho_g0": 0.01, "cos_g0": 0.9, "loss_g1": 2.0, "rho_g1": 0.02, "cos_g1": 0.2,
                     "gkp": 0.1 * e})
    atomic_write_csv(str(run / "summary.csv"), rows)
    (run / "quality.json").write_text(json.dumps({"epochs": [0, 1, 2], "q": [[float(c + e) for c in range(10)]
                                                                            for e in range(3)]}))
    out = tmp_path / "plots"
    assert tool.main([str(run), "--out", str(out)]) == 0
    for name in ("curves.png", "groups.png", "quality.png"):
        assert imread(str(out / name)).ndim == 3, name
    plain = tmp_path / "plain"
    plain.mkdir()
    atomic_write_csv(str(plain / "summary.csv"), [{k: r[k] for k in ("epoch", "lr", "train_loss", "val_top1")}
                                                   for r in rows])
    assert tool.plot_run(str(plain)) == [str(plain / "curves.png")]
    (plain / "quality.json").write_text(json.dumps({"epochs": [0, 1], "q": [[1.0, 2.0]]}))
    with pytest.raises(AnalysisError, match="2 epochs but q has shape"):
        tool.plot_run(str(plain))


# ---- landscape --------------------------------------------------------------------------------------------------
def _trained_run(path: Path, data, groups: list[list[int]] | None, steps: int, seed: int) -> None:
    """A hand-made run directory: args.yaml, a few SGD steps of the real model on digits-LT, checkpoint.pt."""
    from lt_recipes.models import create_lt_model
    cfg = _digits_cfg("gkp_gsa" if groups else "none")
    path.mkdir()
    (path / "args.yaml").write_text(yaml.safe_dump(cfg))
    torch.manual_seed(seed)  # the batches below and the initial weights
    model = create_lt_model(Recipe.from_dict(cfg).model, data.num_classes, data.in_chans)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = torch.utils.data.DataLoader(data.train, batch_size=64, shuffle=True)
    for _, (x, y) in zip(range(steps), loader):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    save_checkpoint(str(path / "checkpoint.pt"), {"identity": {"recipe": cfg["name"]}, "model": model.state_dict()})
    label = "ce+gkp+gsa" if groups else "ce"
    (path / "results.json").write_text(json.dumps({"method": label, "seed": seed}))
    if groups:
        (path / "groups.json").write_text(json.dumps({"groups": groups}))


def test_landscape_writes_plots_and_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from lt_recipes.data import build_data
    from lt_recipes.models import create_lt_model
    tool = load_tool("landscape")
    cfg = _digits_cfg("none")
    recipe = Recipe.from_dict(cfg)
    data = build_data(recipe.data, recipe.seed)
    groups = [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]]
    _trained_run(tmp_path / "base", data, None, steps=8, seed=0)
    _trained_run(tmp_path / "method", data, groups, steps=8, seed=1)
    out = tmp_path / "plots"
    argv = [str(tmp_path / "base"), str(tmp_path / "method"), "--points", "5", "--span", "0.5", "--two-d",
            "--batches", "1", "--hessian-iters", "4", "--out", str(out), "--json"]
    assert tool.main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for name in ("landscape_1d.png", "sharpness.png", "landscape_2d.png"):
        assert imread(str(out / name)).ndim == 3, name
    assert set(result) == {str(tmp_path / "base"), str(tmp_path / "method")}
    # the groups of the run that has them are used for every run, plus "all"
    for run in result.values():
        assert list(run) == ["all", "g0", "g1", "g2"]
        for g in run.values():
            assert len(g["slice"]) == 5 and np.asarray(g["surface"]).shape == (5, 5)
            assert math.isfinite(g["lambda_max"]) and g["lambda_max"] > 0
            assert g["slice"][2] == pytest.approx(g["surface"][2][2], rel=1e-9)
    # the centre of the slice is the trained model's loss on the seeded balanced sample, group by group
    model = create_lt_model(recipe.model, data.num_classes, data.in_chans)
    model.load_state_dict(torch.load(tmp_path / "method" / "checkpoint.pt", weights_only=True)["model"])
    model.eval()
    idx = balanced_indices(np.asarray(data.train_targets), cfg["data"]["eval_batch_size"] // 10, seed=0)
    x = torch.stack([data.train_eval[i][0] for i in idx])
    y = torch.tensor([data.train_eval[i][1] for i in idx])
    with torch.no_grad():
        losses = F.cross_entropy(model(x).double(), y, reduction="none")
    for k, classes in enumerate(groups):
        mask = torch.isin(y, torch.tensor(classes))
        assert result[str(tmp_path / "method")][f"g{k}"]["slice"][2] == pytest.approx(float(losses[mask].mean()),
                                                                                      rel=1e-6)
    assert not os.path.exists(tmp_path / "base" / "landscape_1d.png")


def test_collect_results_readings_gkp_strength_and_averaged_history(tmp_path: Path) -> None:
    """The readings grid's folder gets the readings table (the ascent share and minimum from summary.csv, hand
    counted), the GKP strength table (the logged ratio's median and range) and the averaged runs' history table;
    the default step's variant stands for `<base>+gkp+gsa` in the headline."""
    tool = load_tool("collect_results")
    root = tmp_path / "results"
    default = f"bcl+gkp+gsa#{tool.DEFAULT_VARIANT}"
    _write_run(root, "fmnist64_r100", "bcl", 0, (60.0, 80.0, 50.0, 30.0))
    d = _write_run(root, "fmnist64_r100", default, 0, (62.0, 80.0, 52.0, 35.0))
    # groups 0 and 1 after grouping (epoch 0 is before it): ascents +0.5, -0.25, +2 and +1 -> 3 of 4 positive
    (d / "summary.csv").write_text("epoch,ascent_g0,ascent_g1,gkp_grad_ratio\n0,,,\n1,0.5,-0.25,0.01\n2,2,1,0.03\n")
    d = _write_run(root, "fmnist64_r100", "bcl+gkp#lam1e4", 0, (61.0, 80.0, 51.0, 32.0))
    (d / "summary.csv").write_text("epoch,gkp_grad_ratio\n0,\n1,0.1\n2,0.3\n3,0.2\n")
    _write_run(root / "history" / "averaged", "fmnist64_r100", "bcl+gkp+gsa", 0, (59.0, 80.0, 45.0, 30.0))
    stopped = root / "fmnist64_r100" / "bcl+gkp#lam1e6" / "seed0"  # a run that diverged: its log, no results
    stopped.mkdir(parents=True)
    (stopped / "train.log").write_text("2026 INFO x: epoch 0\n2026 ERROR lt_recipes: weights became non-finite\n")
    (stopped / "variant.json").write_text(json.dumps({"name": "lam1e6", "overrides": ["gkp.lam=1e6"]}))
    stopped_reading = root / "fmnist64_r100" / "bcl+gkp+gsa#released" / "seed0"
    stopped_reading.mkdir(parents=True)
    (stopped_reading / "train.log").write_text("2026 ERROR lt_recipes: non-finite gradients\n")
    # seeds 1 and 2 of the default step diverged: the row counts its finished seed and names the stopped ones
    for seed in (1, 2):
        log = root / "fmnist64_r100" / default / f"seed{seed}" / "train.log"
        log.parent.mkdir(parents=True)
        log.write_text("2026 ERROR lt_recipes: non-finite values\n")
    block = tool.build_block(str(root), str(tmp_path / "README.md"), str(tmp_path / "docs"), False)
    readings, strength = block.split("#### Readings of the grouped step")[1].split("#### GKP's strength")
    assert _row(readings, default)[2:] == ["1 (seeds 1, 2 stopped)", "62.00", "80.00", "52.00", "35.00", "+2.00",
                                           "n/a", "75%", "-0.25"]
    assert _row(strength, "bcl+gkp#lam1e4")[2:] == ["1", "61.00", "32.00", "+1.00", "n/a", "0.2 (0.1-0.3)"]
    assert _row(readings, "bcl+gkp+gsa#released")[1:4] + _row(readings, "bcl+gkp+gsa#released")[-1:] == [
        "(recipe)", "0 (seed 0 stopped)", "stopped", "non-finite gradients"]
    assert _row(strength, "bcl+gkp#lam1e6")[1:] == ["`gkp.lam=1e6`", "0 (seed 0 stopped)", "stopped", "—", "—", "—",
                                                   "weights became non-finite"]
    assert f"| fmnist64_r100 | `bcl+gkp+gsa` | 60.00 | 59.00 | 1 | 62.00 (`{default}`) |" in block
    assert f"| `bcl` | 60.00 (30.00) | 62.00 (35.00) | +2.00 |" in tool.headline_block(str(root))


def test_collect_results_ablations_read_the_spelled_out_default_step(tmp_path: Path) -> None:
    """Component, direction and group tables take `<label>#<DEFAULT_VARIANT>` (the current default step) over the
    plain label of an older default, and the default's group-number runs `#<DEFAULT_VARIANT>_G<n>`."""
    tool = load_tool("collect_results")
    root, d = tmp_path / "results", tool.DEFAULT_VARIANT
    _write_results(root)  # ce, plain ce+gkp+gsa (43.5) and ce+gkp+gsa@sam (40.5): an older default's family
    _write_run(root, "fmnist_r100", f"ce+gsa#{d}", 0, (41.0, 80.0, 33.0, 8.0))
    _write_run(root, "fmnist_r100", f"ce+gkp+gsa#{d}", 0, (46.0, 80.0, 44.0, 12.0))
    _write_run(root, "fmnist_r100", f"ce+gkp+gsa@sam#{d}", 0, (42.0, 80.0, 36.0, 9.0))
    _write_run(root, "fmnist_r100", f"ce+gkp+gsa@gsa_proj#{d}", 0, (38.0, 80.0, 30.0, 4.0))
    _write_run(root, "fmnist_r100", f"ce+gkp+gsa#{d}_G2", 0, (45.0, 80.0, 42.0, 11.0), groups=2)
    block = tool.build_block(str(root), str(tmp_path / "README.md"), str(tmp_path / "docs"), False)
    comp = next(ln for ln in block.splitlines() if ln.startswith("| `ce` | 40.00"))
    assert [c.strip() for c in comp.strip("|").split("|")][3:] == ["41.00 (+1.00, n/a)", "46.00 (+6.00, n/a)"]
    direction_rows = [ln for ln in block.splitlines() if ln.startswith(("| SAM", "| GSA"))]
    assert [r.split("|")[2].strip() for r in direction_rows] == [f"`ce+gkp+gsa@sam#{d}`",
                                                                 f"`ce+gkp+gsa@gsa_proj#{d}`", f"`ce+gkp+gsa#{d}`"]
    groups = [ln for ln in block.splitlines() if ln.startswith(f"| `ce+gkp+gsa#{d}` | ") and ln.count("|") == 7]
    assert [r.split("|")[2:5] for r in groups] == [[" 2 ", " 1 ", " 45.00 "], [" 4 ", " 1 ", " 46.00 "]]
    # the README headline compares the base with the default step
    assert "| fmnist r=100, 2 ep | `ce` | 40.00 ± 1.41 (6.00) | 46.00 (12.00) | +6.00 | n/a | 1 |" in \
        tool.headline_block(str(root))


def test_collect_results_peers_table_and_headline(tmp_path: Path) -> None:
    """The peers grid's folder gets "Sharpness-aware methods on the same bases": each base, its peers in grid order,
    the default grouped step, with the step cost over SAM read from the committed step benchmark; the README block
    gets a method-by-base table of the same runs."""
    tool = load_tool("collect_results")
    root = tmp_path / "results"
    folder = "fmnist64_r100"
    for seed, top1 in enumerate((40.0, 42.0)):
        _write_run(root, folder, "la", seed, (top1, 80.0, 30.0, 5.0))
    for seed, top1 in enumerate((46.0, 47.0)):
        _write_run(root, folder, "la+imbsam", seed, (top1, 80.0, 40.0, 10.0))
    _write_run(root, folder, "la+sam", 0, (41.0, 80.0, 33.0, 6.0))
    _write_run(root, folder, "la+gkp+gsa#paper_exact_rho_div10", 0, (43.0, 80.0, 35.0, 8.0))
    (root / "bench").mkdir()
    (root / "bench" / "step_cpu_resnet32.json").write_text(json.dumps(
        {"sam_ms": 100.0, "imbsam_ms": 125.0, "none_ms": 50.0, "gkp_gsa_masked_ms": 350.0}))
    block = tool.build_block(str(root), str(tmp_path / "README.md"), str(tmp_path / "docs"), False)
    table = block.split("#### Sharpness-aware methods on the same bases", 1)[1].split("\n\n")[1]
    labels = [ln.split("|")[1].strip() for ln in table.splitlines() if ln.startswith("| `")]
    assert labels == ["`la`", "`la+sam`", "`la+imbsam`", "`la+gkp+gsa#paper_exact_rho_div10`"]
    # hand-computed: la 41 +- 1.41, imbsam 46.5 +- 0.71: +5.50 beyond 2.12; cost 125 / 100
    assert _row(table, "la+imbsam") == ["`la+imbsam`", "2", "46.50 ± 0.71", "80.00 ± 0.00", "40.00 ± 0.00",
                                        "10.00 ± 0.00", "1.25x", "+5.50", "yes"]
    assert _row(table, "la")[6:] == ["0.50x", "—", "—"]
    assert _row(table, "la+gkp+gsa#paper_exact_rho_div10")[6:] == ["3.50x", "+2.00", "n/a"]
    head = tool.headline_block(str(root))
    assert "| +imbsam | 46.50 ± 0.71 (+5.50, yes) [2] |" in head and "| base alone | 41.00 ± 1.41 [2] |" in head


def test_groups_png_tells_equal_radii_apart_and_keeps_the_legend_off_the_data() -> None:
    """The adaptive scale's radii are often equal for every group: they used to draw one line. Each group has its own
    marker and a sideways shift; the GKP penalty (0 before the grouping, then decades) is on a log axis; legends sit
    beside the panels."""
    tool = load_tool("plot_run")
    nan = float("nan")
    summary = {"epoch": np.arange(4.0), "alpha": np.array([nan, 0.9, 0.85, 0.8]),
               "gkp": np.array([0.0, 1e-4, 1e-2, 1.0])}
    for g in range(4):
        summary[f"rho_g{g}"] = np.array([nan, 0.05, 0.05, 0.05])
        summary[f"loss_g{g}"] = np.array([nan, 1.0, 0.9, 0.8]) + g
    fig = tool.groups_figure(summary)
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    radii = axes["GSA radius rho*_g"].get_lines()
    assert len(radii) == 4 and len({line.get_marker() for line in radii}) == 4
    assert len({tuple(line.get_xdata()) for line in radii}) == 4  # shifted apart along the epoch axis
    assert axes["mean GKP penalty"].get_yscale() == "log"
    fig.canvas.draw()
    for ax in axes.values():
        legend = ax.get_legend()
        if legend is not None:
            assert legend.get_window_extent().x0 >= ax.get_window_extent().x1
