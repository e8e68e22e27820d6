"""Test set-up: without a GPU the Triton kernels run under the interpreter on CPU tensors.

TRITON_INTERPRET must be set before any @triton.jit function is decorated, so before din_ops
imports its Triton modules.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import din_ops  # noqa: E402


def devices():
    """CPU always; CUDA when present."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def triton_backends():
    """(device, backend) pairs that exercise the Triton kernels: interpreted on CPU, native on CUDA."""
    if torch.cuda.is_available():
        return [("cuda", "cpp")]
    return [("cpu", "triton")]
