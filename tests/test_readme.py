"""The README front page and the docs' result and benchmark tables: generated from the committed files, and short."""
import os
import subprocess

import preloaded

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_results_and_benchmark_blocks_are_generated():
    python, env = preloaded.command({**os.environ, "OMP_NUM_THREADS": "1"})
    for tool in ("tools/collect_results.py", "tools/bench_report.py"):
        proc = subprocess.run([*python, os.path.join(ROOT, tool), "--check"], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, env=env)
        assert proc.returncode == 0, f"{tool} --check: {proc.stderr[-2000:]}"


def test_readme_is_a_front_page_with_the_two_commands_first():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    assert len(text.splitlines()) <= 160
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    assert [line.split("#")[0].strip() for line in block.strip().splitlines()] == \
        ["bash tools/main.sh", "bash tools/test.sh"]
    for page in ("docs/method.md", "docs/results.md", "docs/benchmarks.md", "docs/usage.md"):
        assert f"]({page})" in text and os.path.exists(os.path.join(ROOT, page)), page
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert "bash tools/test.sh" in f.read()


def test_the_project_cites_the_paper_not_a_private_spec():
    """Code, recipes, tools and docs explain the method in the project's own words (docs/method.md)."""
    hits = []
    for folder in ("lt_recipes", "tools", "tests", "recipes", "csrc", "docs"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith((".py", ".yaml", ".md", ".cpp", ".cu", ".h", ".sh")):
                    with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                        if "SPEC" + ".md" in f.read():
                            hits.append(os.path.relpath(os.path.join(dirpath, name), ROOT))
    for name in ("README.md", "train.py", "validate.py", "setup.py"):
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            if "SPEC" + ".md" in f.read():
                hits.append(name)
    assert hits == []


def test_the_training_commands_run_as_written():
    """Every command of README's Training block names an executable that the set-up creates (`torchrun` alone is not
    on PATH: only .venv/bin/torchrun is), and the torchrun line starts its processes (with --help: no data here)."""
    import shlex
    from importlib.metadata import entry_points

    with open(os.path.join(ROOT, "README.md")) as f:
        block = f.read().split("## Training", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    scripts = {e.name for e in entry_points(group="console_scripts")}
    lines = [shlex.split(line.split("#")[0]) for line in block.strip().splitlines()]
    for words in lines:
        assert words[0].startswith(".venv/bin/"), words
        name = words[0].removeprefix(".venv/bin/")
        assert name == "python" or name in scripts, words
    venv = os.path.join(ROOT, ".venv", "bin", "torchrun")
    if not os.path.exists(venv):
        return  # a checkout tested with another interpreter (PYTHON=...): the names are checked above
    torchrun = next(w for w in lines if w[0].endswith("torchrun"))
    proc = subprocess.run(torchrun[:torchrun.index("train.py") + 1] + ["--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and proc.stdout.count("usage: train.py") == 2, proc.stderr[-2000:]
