"""The README's results and benchmark tables are exactly what the tools generate from the committed result files."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_results_and_benchmark_blocks_are_generated():
    for tool in ("tools/collect_results.py", "tools/bench_report.py"):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, tool), "--check"], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, f"{tool} --check: {proc.stderr[-2000:]}"


def test_readme_starts_with_the_two_commands():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    assert [line.split("#")[0].strip() for line in block.strip().splitlines()] == \
        ["bash tools/main.sh", "bash tools/test.sh"]
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert "bash tools/test.sh" in f.read()
