"""Tools: the epoch benchmark's synthetic CIFAR and projection; the results grid's and sweep's recipes."""
import pytest

from lt_recipes.config import load_config, load_recipe
from lt_recipes.data import build_data
from lt_recipes.labels import method_label
from lt_recipes.sections import GSAConfig, Recipe, ReleasedConfig
from toolload import load_tool

def _bench_epoch():
    return load_tool("bench_epoch")


def test_projection_hand_computed():
    # epochs: 0 start-up, 1-2 base (median 5), 3 grouping (10), 4-6 grouped (median 8)
    p = _bench_epoch().project([9.0, 5.0, 5.0, 10.0, 7.0, 8.0, 9.0], 3, epochs=200, group_start=20, interval=20)
    assert (p["t_base_s"], p["t_grouping_epoch_s"], p["t_grouped_s"], p["regroups"]) == (5.0, 10.0, 8.0, 9)
    # 20 * 5 + 180 * 8 + 9 * (10 - 8) = 1558 s; base alone 200 * 5 = 1000 s
    assert p["projected_method_h"] == pytest.approx(1558 / 3600) and p["projected_base_h"] == pytest.approx(1000 / 3600)
    assert p["method_over_base"] == pytest.approx(1.558)
    assert _bench_epoch().project([9.0, 5.0, 10.0, 8.0], 2, 10, 4, 0)["regroups"] == 1  # grouped once


def test_synthetic_cifar100_loads_as_cifar100_lt(tmp_path):
    _bench_epoch().write_synthetic_cifar(str(tmp_path), "cifar100")
    r = load_recipe("cifar100_lt_resnet32", [f"data.root={tmp_path}"])
    data = build_data(r.data, r.seed)
    assert data.num_classes == 100 and sum(data.lt_counts) == 10847  # the CIFAR-100-LT r=100 profile
    assert data.lt_counts[0] == 500 and data.lt_counts[-1] == 5 and len(data.test) == 10000


def test_every_grid_run_is_a_valid_recipe_with_its_label():
    """Every grid cell and extra loads as a valid recipe whose results.json label is the folder's label without
    its variant, and a variant's keys are applied."""
    grid = load_tool("run_grid")
    for name, g in grid.GRIDS.items():
        ratios = sorted(g.cells)
        for label, ratio, seed in grid.jobs_of(name, ratios, [2]):
            cfg = load_config(g.recipe, grid.overrides(label, ratio, seed, g.bases))
            assert method_label(Recipe.from_dict(cfg)) == label.partition("#")[0], label
            assert cfg["data"]["imbalance_ratio"] == ratio and cfg["seed"] == 2
    cfg = load_config("fmnist_lt_resnet8_long", grid.overrides("bcl+gkp+gsa@sam#G2", 100, 0))
    assert cfg["groups"]["num_groups"] == 2 and cfg["gsa"]["direction"] == "sam" and cfg["loss"]["name"] == "bcl"
    # a variant that sets a reading keeps the label's direction (the reading presets gsa.direction)
    label = f"bcl+gkp+gsa@gsa_proj#{grid.DEFAULT_VARIANT}_G6"
    cfg = load_config("fmnist_lt_resnet8_long", grid.overrides(label, 100, 0))
    assert cfg["groups"]["num_groups"] == 6 and cfg["gsa"]["direction"] == "gsa_proj"
    assert cfg["gsa"]["rho_clamp"] == [0.0002, 0.0003]
    assert load_config("fmnist_lt_resnet8", grid.overrides("la#cosine", 10, 0))["model"]["classifier"] == "cosine"


def grid_list(grid, argv: list[str], capsys) -> list[str]:
    """The lines of run_grid --list."""
    assert grid.main(argv + ["--list"]) == 0
    return capsys.readouterr().out.splitlines()


def test_paper_grids_run_the_paper_rows_on_its_recipes(tmp_path, capsys):
    """The paper's grids: Table 1's four labels at r = 100/50/10 on both CIFAR recipes, CE rows as plain CE (no
    contrastive views, projection head or cosine classifier), BCL rows the recipe itself, the list-file datasets at
    their own long tail, and `--grid table1` / `paper` naming the grids they stand for."""
    grid = load_tool("run_grid")
    for name in ("table1_cifar100", "table1_cifar10"):
        g = grid.GRIDS[name]
        assert {r: set(labels) for r, labels in g.cells.items()} == {
            r: {"ce", "ce+gkp+gsa", "bcl", "bcl+gkp+gsa"} for r in (100, 50, 10)}
    ce = load_config("cifar100_lt_resnet32", grid.overrides("ce+gkp+gsa", 50, 1, grid.PAPER_BASES))
    assert (ce["loss"]["name"], ce["data"]["contrastive_views"], ce["model"]["proj_head"], ce["model"]["classifier"],
            ce["data"]["augment"], ce["method"]) == ("ce", 0, None, "linear", "basic", "gkp_gsa")
    bcl = load_config("cifar100_lt_resnet32", grid.overrides("bcl", 100, 0, grid.PAPER_BASES))
    recipe = load_config("cifar100_lt_resnet32")
    assert {k: v for k, v in bcl.items() if k != "method"} == {k: v for k, v in recipe.items() if k != "method"}
    assert bcl["method"] == "none"
    assert load_config("imagenet_lt_resnet50", grid.overrides("bcl", None, 0, grid.PAPER_BASES))["data"][
        "imbalance_ratio"] is None
    assert grid.grid_names("table1") == ["table1_cifar100", "table1_cifar10"]
    assert grid.grid_names("paper") == list(grid.PAPER_GRIDS)
    # a run two grids share trains once: bcl r=100 is in Tables 1, 4 and 5 and the G sweep
    jobs = grid.select_jobs(grid.grid_names("paper"), None, [0, 1])
    shared = [j for j in jobs if j[1:] == ("bcl", 100, 0) and grid.GRIDS[j[0]].folder == "cifar100"]
    assert shared == [("table1_cifar100", "bcl", 100, 0)]
    assert [j[3] for j in jobs] == sorted(j[3] for j in jobs)  # seed 0 of every grid first
    assert ("imagenet_lt_resnext50", "bcl+gkp+gsa", None, 1) in jobs
    # shards split the one list: disjoint, and together the whole list, whichever machine lists them
    everything = grid_list(grid, ["--grid", "paper", "--seeds", "0,1", "--results", str(tmp_path)], capsys)
    parts = [grid_list(grid, ["--grid", "paper", "--seeds", "0,1", "--results", str(tmp_path), "--shard", f"{k}/3"],
                       capsys) for k in (1, 2, 3)]
    assert len(everything) == len(jobs) and all(parts) and sorted(sum(parts, [])) == sorted(everything)
    assert grid.shard_of("2/3") == (2, 3)
    with pytest.raises(SystemExit, match="k/n"):
        grid.shard_of("3/2")
    with pytest.raises(SystemExit, match="no grid or set named 'tabel1'"):
        grid.grid_names("tabel1")


def _resolved(cfg: dict) -> dict:
    """The config with the step's own radius scale and clamp written out (null / "auto": GSAConfig.radius)."""
    gsa = dict(cfg["gsa"])
    z, clamp = GSAConfig.radius(gsa["scale"], gsa["z"], gsa["rho_clamp"])
    gsa["z"], gsa["rho_clamp"] = z, (list(clamp) if clamp else None)
    return {**cfg, "gsa": gsa}


def test_the_default_variant_spells_out_the_current_defaults():
    """The tables let `<base>+gkp+gsa#<DEFAULT_VARIANT>` stand for the default step: its keys must change nothing on
    every grouped label of the readings grid's recipe (and a different variant must change something)."""
    grid = load_tool("run_grid")
    recipe = grid.GRIDS["readings"].recipe
    for base in ("ce", "la", "bcl"):
        plain = _resolved(load_config(recipe, grid.overrides(f"{base}+gkp+gsa", 100, 0)))
        default = load_config(recipe, grid.overrides(f"{base}+gkp+gsa#{grid.DEFAULT_VARIANT}", 100, 0))
        assert _resolved(default) == plain
    others = [v for v in ("paper", "paper_exact", "released") if v != grid.DEFAULT_VARIANT]
    assert all(_resolved(load_config(recipe, grid.overrides(f"bcl+gkp+gsa#{v}", 100, 0))) != plain for v in others)


def test_the_default_variant_is_read_from_the_sections(monkeypatch):
    """run_grid takes the default step's variant from the schema: with the released clamp as the adaptive scaling's
    default, the variant spelling the exact step at that clamp becomes the default one; with two variants spelling
    the defaults out, it refuses to choose."""
    grid = load_tool("run_grid")
    assert grid.default_variant() == grid.DEFAULT_VARIANT == "paper_exact_rho_div10"
    monkeypatch.setattr(GSAConfig, "SCALE_DEFAULTS", {**GSAConfig.SCALE_DEFAULTS,
                                                      "adaptive": (0.1, ReleasedConfig.rho_clamp)})
    assert grid.default_variant() == "paper_exact"
    monkeypatch.undo()
    monkeypatch.setitem(grid.VARIANTS, "spelled_twice", list(grid.VARIANTS[grid.DEFAULT_VARIANT]))
    with pytest.raises(RuntimeError, match="2 variants spell out"):
        grid.default_variant()


def test_long_recipe_has_the_paper_schedule_shape():
    """64 epochs: 5% warm-up, x0.1 at 80% and 90% (the paper's 160/180 of 200), groups from 10%, refreshed every 10%."""
    cfg = load_config("fmnist_lt_resnet8_long")
    short = load_config("fmnist_lt_resnet8")
    assert cfg["epochs"] == 64 and cfg["sched"]["warmup_epochs"] == round(0.05 * 64)
    assert cfg["sched"]["sched"] == "multistep" and cfg["sched"]["decay_milestones"] == [round(0.8 * 64),
                                                                                       round(0.9 * 64)]
    assert cfg["groups"]["start_epoch"] == cfg["groups"]["interval"] == round(0.1 * 64)
    for section in ("data", "model", "optim", "gkp", "gsa"):
        assert cfg[section] == short[section], section


def test_cifar_shaped_recipe_takes_the_paper_cifar_protocol():
    """fmnist_lt_resnet32: cifar100_lt_resnet32's model, optimiser, schedule and grouping on the full 28-px profile."""
    cfg, paper = load_config("fmnist_lt_resnet32"), load_config("cifar100_lt_resnet32")
    for section in ("optim", "sched", "groups", "gkp", "gsa"):
        assert cfg[section] == paper[section], section
    assert (cfg["epochs"], cfg["model"]["name"], cfg["data"]["batch_size"]) == (200, "resnet32_cifar", 256)
    assert (cfg["data"]["img_size"], cfg["data"]["max_per_class"]) == (28, None)


def test_grid_jobs_order_and_only_names_an_unknown_label(tmp_path):
    import subprocess
    import sys
    grid = load_tool("run_grid")
    jobs = grid.jobs_of("fmnist64", [100], [0, 1])
    g2, g6 = (f"bcl+gkp+gsa#{grid.DEFAULT_VARIANT}_G{g}" for g in (2, 6))
    assert jobs[0] == ("ce", 100, 0) and jobs[-1] == (g6, 100, 1)
    assert jobs.index((g2, 100, 0)) < jobs.index((g2, 100, 1))  # extras: seed 0 first
    proc = subprocess.run([sys.executable, grid.ROOT + "/tools/run_grid.py", "--only", "ce,no_such_run",
                           "--results", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode != 0 and "grid fmnist16 has no run labelled no_such_run" in proc.stderr
