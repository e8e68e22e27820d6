"""The CMake build: libdin_ops.so for C++ programs, checked by tests/cpp/run_op.cpp.

Configures and builds the project into a temporary directory against the installed torch's
libtorch, then runs the C++ checks (attention_pooling against the DIN formula in plain loops;
dice too once it has a CPU kernel). Needs no Python extension.
"""
import os
import shutil
import subprocess

import pytest
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
