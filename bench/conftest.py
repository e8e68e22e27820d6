"""pytest-benchmark suites, one file per op (``bench_<op>.py``), not part of the CI test run:

    pytest bench/ --benchmark-only                               # every op, providers side by side
    pytest bench/bench_attention_pooling.py --benchmark-only -k "fwd+bwd"
    pytest bench/ --benchmark-only --bench-T 10,100,1000 --benchmark-json=bench/out/bench.json

The providers and the cases come from din_ops/bench/<op>.py, shared with the main job
(``python -m din_ops.bench``). Every measurement is first checked against the reference.
Without a GPU the Triton kernels would only run in the interpreter, far too slowly to time, so
the suites time the C++ kernels on the CPU, and the Triton kernels on CUDA when present (float32
and bfloat16; float32 matmuls in TF32 for every provider, as din_ops' Triton kernels use).
"""
import pytest
import torch


def pytest_addoption(parser):
    g = parser.getgroup("din_ops benchmarks")
    g.addoption("--bench-T", default="100", help="comma-separated history lengths (default 100)")
    g.addoption("--bench-B", default="2048", help="comma-separated batch sizes (default 2048)")


def pytest_collect_file(file_path, parent):
    """``pytest bench/`` collects the ``bench_*.py`` files (a path given explicitly is collected
    by pytest itself)."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") \
            and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_generate_tests(metafunc):
    if "shape_tb" in metafunc.fixturenames:
        Ts = [int(t) for t in metafunc.config.getoption("--bench-T").split(",")]
        Bs = [int(b) for b in metafunc.config.getoption("--bench-B").split(",")]
        metafunc.parametrize("shape_tb", [(t, b) for b in Bs for t in Ts], ids=[f"B{b}-T{t}" for b in Bs for t in Ts])


def pytest_configure(config):
    torch.manual_seed(0)
    from din_ops.bench.machine import keep_freed_memory

    keep_freed_memory()  # as the main job: no page faults on every large output (machine.py)
    if torch.cuda.is_available():
        from din_ops.bench.common import use_tf32_on_cuda
        from din_ops.bench.runner import _load_gpu_kernels

        _load_gpu_kernels("cuda")  # CUDA tensors run the Triton kernels, registered on import
        use_tf32_on_cuda()  # float32 matmuls in TF32 for every provider, as din_ops' kernels
