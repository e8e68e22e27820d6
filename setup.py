"""Builds din_ops' C++ extension (CPU kernels; CUDA kernels when torch has CUDA).

Install with `pip install --no-build-isolation -e .` so the build uses the torch already
installed instead of fetching another one into an isolated environment.
"""
import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

here = os.path.dirname(os.path.abspath(__file__))


def extension():
    sources = ["csrc/din_ops.cpp", "csrc/autograd.cpp", "csrc/python.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp", "-std=c++20", "-Wall", "-Wno-unused-function"]
    # Baseline flags, so the binary runs on any x86-64: the kernels' hot loops are built again
    # for AVX2 and AVX-512 and chosen at run time (csrc/cpu/common.h, cpu_isa). DIN_OPS_NATIVE=1
    # tunes everything for the building CPU instead; that binary may not run on an older one.
    if os.environ.get("DIN_OPS_NATIVE", "0") == "1":
        cxx += ["-march=native"]
    extra = {"cxx": cxx}
    # CUDA sources only where torch itself was built with CUDA: the CPU wheel cannot link them.
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    use_cuda = (torch.version.cuda is not None and cuda_sources
                and os.environ.get("DIN_OPS_NO_CUDA", "0") != "1")
    if use_cuda:
        sources += cuda_sources
        extra["nvcc"] = ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]
        return CUDAExtension(
            "din_ops._C", sources, extra_compile_args=extra, extra_link_args=["-fopenmp"],
            define_macros=[("DIN_OPS_WITH_CUDA", "1")],
        )
    return CppExtension("din_ops._C", sources, extra_compile_args=extra, extra_link_args=["-fopenmp"])


setup(
    name="din_ops",
    version="0.1.0",
    description="Fused PyTorch operators for the Deep Interest Network (attention pooling, Dice, MBA)",
    packages=find_packages(include=["din_ops", "din_ops.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "triton"],
)
