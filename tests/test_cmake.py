"""The CMake build: libdin_ops.so for C++ programs, checked by tests/cpp/run_op.cpp.

Configures and builds the project into a temporary directory against the installed torch's
libtorch, then runs the C++ checks (attention_pooling against the DIN formula in plain loops;
dice too once it has a CPU kernel), and examples/serve_din.cpp (din_ops_serve) running an
AOTInductor package of ``DIN.serving()``. Only that last test needs the Python extension (to
make the package).
"""
import importlib.util
import os
import shutil
import subprocess

import pytest
import torch
import torch.utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _missing_tool():
    if shutil.which("cmake") is None:
        return "cmake is not installed"
    compilers = [os.environ.get("CXX")] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    if not any(shutil.which(c) for c in compilers):
        return "no C++ compiler (c++, g++, clang++ or $CXX) found"
    return None


pytestmark = pytest.mark.skipif(_missing_tool() is not None, reason=str(_missing_tool()))


def _run(cmd, timeout):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    build = tmp_path_factory.mktemp("cmake_build")
    configure = _run(
        ["cmake", "-S", ".", "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
         "-DCMAKE_BUILD_TYPE=Release"],
        timeout=120,
    )
    assert configure.returncode == 0, configure.stdout + configure.stderr
    made = _run(["cmake", "--build", str(build), "-j2"], timeout=600)
    assert made.returncode == 0, made.stdout + made.stderr
    return build


def test_cmake_dlopen(build_dir):
    lib = build_dir / "libdin_ops.so"
    assert lib.is_file()
    r = _run([str(build_dir / "din_ops_run"), str(lib)], timeout=120)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "ok", r.stdout + r.stderr


def test_cmake_linked(build_dir):
    # Linked through the din_ops target: its --no-as-needed keeps the library, whose static
    # initializers register the operators, although the program uses none of its symbols.
    r = _run([str(build_dir / "din_ops_run_linked")], timeout=120)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "ok", r.stdout + r.stderr


def test_cmake_run_without_library_fails(build_dir):
    # Without the library the operators are not registered: the program must say so and fail.
    r = _run([str(build_dir / "din_ops_run")], timeout=120)
    assert r.returncode != 0
    assert "not registered" in r.stdout


def test_cmake_serve_package(build_dir, tmp_path):
    # examples/serve_din.py makes the package; the C++ program builds the same request from C and T
    # (vocabulary sizes from the package metadata) and prints one logit a line.
    spec = importlib.util.spec_from_file_location("serve_din", os.path.join(ROOT, "examples", "serve_din.py"))
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    model = serve.build_model()
    path = serve.package(model, str(tmp_path / "din.pt2"))
    for C, T in [(8, 20), (1, 1), (37, 113)]:
        r = _run([str(build_dir / "din_ops_serve"), path, str(C), str(T)], timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        got = torch.tensor([float(x) for x in r.stdout.split()])
        with torch.no_grad():
            want = model.score(*serve.request(C, T))
        assert got.shape == want.shape, (C, T, r.stdout)
        assert (got - want).abs().max().item() <= 1e-5, (C, T, got, want)
    usage = _run([str(build_dir / "din_ops_serve"), path], timeout=60)
    assert usage.returncode == 2 and "usage" in usage.stderr
