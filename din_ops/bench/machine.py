"""The machine's limits, measured in the same run as the benchmarks.

- Peak FLOP/s: the best rate of ``torch.mm`` on square matrices (CPU: float32, sizes 1024 and
  2048; CUDA: 8192, bfloat16 and float32, the latter with TF32 operands as the runner sets for
  every provider on CUDA).
- Memory bandwidth: the best rate of a large tensor copy (read + write), larger than the
  last-level cache (CPU: 2 x 512 MiB; CUDA: 2 x 1 GiB).

These are what each result is compared with ("% of limit"): achieved useful FLOP/s over the
matmul rate of the same dtype (float32 for float64 and float32 rows), achieved bytes/s over the
copy rate.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import time
from typing import Dict

import torch


@dataclasses.dataclass
class Machine:
    device: str                  # "cpu" / "cuda"
    name: str                    # CPU model or GPU name
    threads: int
    flops: Dict[str, float]      # dtype name -> FLOP/s of torch.mm
    bandwidth: float             # bytes/s of a large copy

    def peak_flops(self, dtype_name: str) -> float:
        return self.flops.get(dtype_name, self.flops["fp32"])

    def summary(self) -> str:
        tf32 = self.device == "cuda" and torch.get_float32_matmul_precision() != "highest"
        f = ", ".join(f"{k}{' (TF32)' if tf32 and k == 'fp32' else ''} {v / 1e9:.0f} GFLOP/s"
                      for k, v in self.flops.items())
        return f"{self.name}, {self.threads} threads: matmul {f}; copy {self.bandwidth / 1e9:.1f} GB/s"


def cpu_name() -> str:
    """Model name, logical CPUs and the widest vector extension (a VM may hide the model)."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not name:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    name = name or platform.processor() or platform.machine()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
    return f"{name} ({os.cpu_count()} CPUs{', ' + isa if isa else ''})"


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def _best(fn, reps: int, sync) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def _cuda_best(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        best = min(best, s.elapsed_time(e) / 1e3)
    return best


def calibrate(device, scale: float = 1.0) -> Machine:
    """Measures the limits; ``scale < 1`` shrinks the problems (the tiny preset)."""
    device = torch.device(device)
    if device.type == "cuda":
        return _calibrate_cuda(device, scale)
    return _calibrate_cpu(scale)


def _calibrate_cpu(scale: float) -> Machine:
    def noop():
        pass

    # best of several runs: on a shared machine the best run is the one nobody interrupted
    rate = 0.0
    for n, reps in (((1024, 10), (2048, 5)) if scale >= 1 else ((512, 10),)):
        a, b = torch.randn(n, n), torch.randn(n, n)
        c = torch.empty(n, n)
        t = _best(lambda: torch.mm(a, b, out=c), reps, noop)
        rate = max(rate, 2 * n ** 3 / t)
    numel = int(512 * 2 ** 20 * scale) // 4
    x = torch.randn(numel)
    y = torch.empty_like(x)
    t = _best(lambda: y.copy_(x), 5 if scale >= 1 else 10, noop)
    bw = 2 * x.numel() * 4 / t
    del x, y
    return Machine("cpu", cpu_name(), torch.get_num_threads(), {"fp32": rate}, bw)


def _calibrate_cuda(device, scale: float) -> Machine:
    with torch.cuda.device(device):
        flops = {}
        n = 8192 if scale >= 1 else 1024
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            c = torch.empty(n, n, device=device, dtype=dtype)
            t = _cuda_best(lambda: torch.mm(a, b, out=c), 10)
            flops[name] = 2 * n ** 3 / t
            del a, b, c
        numel = int(2 ** 30 * scale) // 4
        x = torch.randn(numel, device=device)
        y = torch.empty_like(x)
        t = _cuda_best(lambda: y.copy_(x), 10)
        bw = 2 * x.numel() * 4 / t
        del x, y
        torch.cuda.empty_cache()
    props = torch.cuda.get_device_properties(device)
    return Machine("cuda", torch.cuda.get_device_name(device), props.multi_processor_count, flops, bw)


def keep_freed_memory() -> str:
    """Makes glibc keep freed memory for reuse instead of returning it to the OS.

    By default glibc serves every allocation above 32 MiB with a fresh ``mmap`` and unmaps it on
    free, so each large output a step allocates is faulted in page by page on first touch (a
    65 MB output: 10-30 ms on this kind of VM, more than din_ops' Dice kernel itself), and how
    much of that a measurement pays depended on what ran before it in the process. With the
    ``mmap`` threshold at 1 GiB and trimming off, freed buffers are reused (what a caching
    allocator such as jemalloc or tcmalloc, the usual advice for PyTorch on CPU, gives), and
    every provider's time is its compute and memory traffic. Returns a description of the
    setting for the results ("glibc default" where it could not be applied).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1 and libc.mallopt(m_trim_threshold, 1 << 31) == 1
    except (OSError, AttributeError):
        ok = False
    return "glibc mmap threshold 1 GiB, no trim" if ok else "allocator default"

