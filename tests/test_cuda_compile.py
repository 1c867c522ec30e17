"""CI's "CUDA compiles" check: the CUDA sources of csrc/ compile for one architecture (sm_90) with torch's headers.

The kernels cannot run on a machine without a GPU (tests/test_ops.py runs them where one is present, see
tools/device_check.sh), but this catches a broken .cu file on every machine that has nvcc. Skipped without nvcc.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

CSRC = Path(__file__).resolve().parent.parent / "csrc"


def _nvcc() -> str | None:
    """nvcc of $CUDA_HOME, else /usr/local/cuda, else the one on PATH."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    return os.path.realpath(found) if found else None


@pytest.mark.skipif(_nvcc() is None, reason="no CUDA toolkit (nvcc) on this machine")
def test_cuda_sources_compile_for_sm90(tmp_path):
    sources = sorted(CSRC.glob("*.cu"))
    assert sources, f"no .cu files in {CSRC}"
    includes = cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]
    for source in sources:
        obj = tmp_path / f"{source.stem}.o"
        cmd = [_nvcc(), "-c", str(source), "-o", str(obj), "-std=c++20", "-O3", "-Xcompiler", "-fPIC",
               "-gencode=arch=compute_90,code=sm_90",
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
               *cpp_extension.COMMON_NVCC_FLAGS, *(f"-I{p}" for p in includes)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{source.name} failed to compile:\n{result.stderr[-6000:]}"
        assert obj.stat().st_size > 0
        cuobjdump = Path(_nvcc()).with_name("cuobjdump")
        if cuobjdump.is_file():
            listing = subprocess.run([str(cuobjdump), "--list-elf", str(obj)], capture_output=True, text=True)
            assert "sm_90" in listing.stdout, f"{source.name}: no sm_90 code in the object:\n{listing.stdout}"
