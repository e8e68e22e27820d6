"""pytest-benchmark suites: `pytest bench/ --benchmark-only` (not part of the CI test run).

Without a GPU the Triton kernels would run in the interpreter, far too slowly to time, so the
benchmarks time the C++ kernels on CPU and the Triton kernels on CUDA.
"""
import torch


def pytest_configure(config):
    torch.manual_seed(0)
