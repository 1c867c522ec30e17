"""Build lt-recipes and its extension `lt_recipes._C` (the fused ops of csrc/).

The CPU extension is always built. The CUDA sources (csrc/*.cu) are added when torch was built with CUDA and a
CUDA toolkit is found (torch.utils.cpp_extension.CUDA_HOME); FORCE_CUDA=1 adds them regardless, NO_CUDA=1 leaves
them out. TORCH_CUDA_ARCH_LIST defaults to 8.6;8.9;9.0 (RTX 3090, RTX 4090, H100/H200).
torch must already be installed: `pip install --no-build-isolation -e .`
"""
import glob
import os
import re

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _version() -> str:
    with open(os.path.join(HERE, "lt_recipes", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cxx = ["-O3", "-fopenmp", "-Wno-psabi"]
    with_cuda = not _flag("NO_CUDA") and (_flag("FORCE_CUDA") or (torch.version.cuda is not None and CUDA_HOME))
    if not with_cuda:
        return CppExtension("lt_recipes._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.6;8.9;9.0")
    return CUDAExtension("lt_recipes._C", sources + sorted(glob.glob(os.path.join("csrc", "*.cu"))),
                         extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
                         extra_link_args=["-fopenmp"])


setup(
    name="lt-recipes",
    version=_version(),
    description="timm recipes for long-tailed image classification with GKP + GSA (loss landscape geometry)",
    packages=find_packages(include=["lt_recipes", "lt_recipes.*"]),
    python_requires=">=3.11",
    install_requires=["timm", "accelerate", "scikit-learn", "safetensors", "tqdm", "matplotlib", "pyyaml", "numpy"],
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
