"""Peak memory a step allocates above what was allocated before it (inputs excluded, outputs and
gradients included).

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
- CPU: the PyTorch profiler's memory events (every allocation and free through PyTorch's CPU
  allocator, with its size), replayed in time order; the peak of the running sum. No
  tracemalloc (which sees only Python's allocations). Memory a kernel takes outside PyTorch's
  allocator (din_ops' C++ kernels keep per-thread tiles of a few tens of KiB in std::vector)
  is not counted.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Callable

import torch


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side logs start/stop lines to fd 2; keep them out of the output."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_bytes(step: Callable[[], Any], device) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del result
        return int(peak)
    return _cpu_peak(step)


def _cpu_peak(step) -> int:
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = step()
            del result
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return int(peak)
