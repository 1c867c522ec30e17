"""tools/setup_env.sh on a machine with a GPU, rehearsed with fakes: a fake `nvidia-smi`, `nvcc` a link into a fake
toolkit or a wrapper script that execs it (as /usr/local/bin/nvcc is on the project's machines), and a fake `.venv`
whose pip records how it was called and fails the CUDA build on request. No GPU, compiler or registry is used."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAILED_LINE = "the CUDA kernels did not build"


@pytest.fixture
def machine(tmp_path: Path) -> dict:
    """A copy of the set-up's inputs, a fake toolkit with nvcc linked from bin/, and fake nvidia-smi, python, pip."""
    repo = tmp_path / "repo"
    (repo / "tools").mkdir(parents=True)
    for name in ("tools/setup_env.sh", "tools/cuda_env.sh", "requirements.txt", "setup.py"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / "csrc", repo / "csrc")
    toolkit = tmp_path / "cuda-12.8"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    (toolkit / "include" / "cuda_runtime.h").touch()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    venv = repo / ".venv" / "bin"
    venv.mkdir(parents=True)
    scripts = {
        toolkit / "bin" / "nvcc": 'echo "#$ _HERE_=$(dirname "$0")"',  # what nvcc --dryrun prints first
        bin_dir / "nvidia-smi": f'[ -e "{tmp_path}/gpu" ]',  # runs (a GPU) only while the file `gpu` exists
        bin_dir / "apt-get": "exit 1",  # the optional dataset step must not reach a registry
        venv / "python": "exit 0",  # torch, torchvision and lt_recipes._C all "import"
        # records every call; the CUDA build fails while the file `fail_cuda` exists
        venv / "pip": f'echo "$* | NO_CUDA=${{NO_CUDA:-}} FORCE_CUDA=${{FORCE_CUDA:-}} CUDA_HOME=${{CUDA_HOME:-}}" '
                      f'>> "{tmp_path}/pip.log"\n'
                      f'case "$*" in *"-e ."*) if [ "${{FORCE_CUDA:-}}" = 1 ] && [ -e "{tmp_path}/fail_cuda" ]; then\n'
                      f'  echo "ld: cannot find -lcudart" >&2; exit 1; fi;; esac',
    }
    for path, body in scripts.items():
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    os.symlink(toolkit / "bin" / "nvcc", bin_dir / "nvcc")
    return {"tmp": tmp_path, "repo": repo, "toolkit": toolkit, "bin": bin_dir}


def _env(m: dict, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "NO_CUDA", "FORCE_CUDA")}
    env["PATH"] = f"{m['bin']}:{env['PATH']}"
    return {**env, **extra}


def _setup(m: dict, **extra: str) -> tuple[str, list[str]]:
    """Run the set-up; its output and the pip calls it made (the log is emptied)."""
    proc = subprocess.run(["bash", "tools/setup_env.sh"], cwd=m["repo"], env=_env(m, **extra), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = m["tmp"] / "pip.log"
    calls = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return proc.stdout + proc.stderr, [c for c in calls if "-e ." in c]


def _shell(m: dict, command: str, **extra: str) -> str:
    proc = subprocess.run(["bash", "-c", f"source tools/cuda_env.sh; {command}"], cwd=m["repo"],
                          env=_env(m, **extra), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip()


def test_cuda_home_is_found_from_nvcc_s_real_location_or_taken_from_cuda_home(machine: dict) -> None:
    assert _shell(machine, "cuda_home") == str(machine["toolkit"])
    assert _shell(machine, "cuda_home", CUDA_HOME="/opt/my-cuda") == "/opt/my-cuda"
    wrapper = machine["bin"] / "nvcc"
    wrapper.unlink()
    wrapper.write_text(f'#!/bin/sh\nexec {machine["toolkit"]}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    assert _shell(machine, "cuda_home") == str(machine["toolkit"])


def test_a_failing_cuda_build_falls_back_to_cpu_only_with_one_line(machine: dict) -> None:
    (machine["tmp"] / "gpu").touch()
    (machine["tmp"] / "fail_cuda").touch()
    out, builds = _setup(machine)
    assert [line for line in out.splitlines() if FAILED_LINE in line] == [
        f"[setup] the CUDA kernels did not build (CUDA_HOME={machine['toolkit']}; log "
        ".venv/lt-recipes-cuda-build.log); building CPU-only"]
    assert [b.split(" | ")[1] for b in builds] == [f"NO_CUDA= FORCE_CUDA=1 CUDA_HOME={machine['toolkit']}",
                                                   "NO_CUDA=1 FORCE_CUDA= CUDA_HOME="]
    assert "cannot find -lcudart" in (machine["repo"] / ".venv" / "lt-recipes-cuda-build.log").read_text()
    stamp = (machine["repo"] / ".venv" / ".lt-recipes-stamp").read_text().split()
    assert stamp[1:] == [f"cuda-failed:{machine['toolkit']}"]
    # the failed toolkit is not retried on every set-up; a toolkit given by CUDA_HOME is
    assert _setup(machine)[1] == []
    out, builds = _setup(machine, CUDA_HOME=str(machine["tmp"] / "other"))
    assert builds[0].endswith(f"FORCE_CUDA=1 CUDA_HOME={machine['tmp'] / 'other'}") and len(builds) == 2


def test_the_stamp_records_the_cuda_kernels_so_a_cpu_only_venv_is_rebuilt_on_a_gpu(machine: dict) -> None:
    out, builds = _setup(machine)  # no GPU: CPU-only, as before
    assert [b.split(" | ")[1] for b in builds] == ["NO_CUDA=1 FORCE_CUDA= CUDA_HOME="] and FAILED_LINE not in out
    stamp = machine["repo"] / ".venv" / ".lt-recipes-stamp"
    assert len(stamp.read_text().split()) == 1
    assert _setup(machine)[1] == []  # unchanged machine: nothing rebuilt
    (machine["tmp"] / "gpu").touch()  # the same .venv on a GPU machine: rebuilt with the CUDA kernels
    out, builds = _setup(machine)
    assert [b.split(" | ")[1] for b in builds] == [f"NO_CUDA= FORCE_CUDA=1 CUDA_HOME={machine['toolkit']}"]
    assert stamp.read_text().split()[1:] == ["cuda"] and FAILED_LINE not in out
    assert _setup(machine)[1] == []
    (machine["tmp"] / "gpu").unlink()  # and back on a CPU machine: CPU-only again
    assert [b.split(" | ")[1] for b in _setup(machine)[1]] == ["NO_CUDA=1 FORCE_CUDA= CUDA_HOME="]
