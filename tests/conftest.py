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


def case_lengths(lengths, B, T, g):
    """The ``lengths`` of a Triton test case: ``"mixed"`` (random in 0..T, the first row full and
    the second empty), ``"full"``, or None."""
    if lengths == "mixed":
        lens = torch.randint(0, T + 1, (B,), generator=g)
        if B > 0:
            lens[0] = T
        if B > 1:
            lens[1] = 0
        return lens
    if lengths == "full":
        return torch.full((B,), T, dtype=torch.int64)
    return None


def triton_backends():
    """(device, backend) pairs that exercise the Triton kernels: interpreted on CPU, native on CUDA."""
    if torch.cuda.is_available():
        return [("cuda", "cpp")]
    return [("cpu", "triton")]
