"""What the per-op benchmark modules share: the interface the runner and the pytest-benchmark
suites drive, timing, and the comparison with the reference.

An op module (``attention_pooling``, ``dice``, ``mba``) defines a subclass of :class:`OpBench`:
its providers (``eager``, ``compile``, ... , ``din_ops``: each a function of a case), its modes,
how to build a case from a sweep shape, the reference, and the useful FLOPs and bytes of a case.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# Relative L2 error a provider may have against the float32 (float64 for fp64 inputs) reference.
# Half precisions: plain PyTorch runs every layer in that precision and some backward passes sum
# hundreds of positions in it (indexing's backward), so a few percent is expected in bfloat16;
# a wrong formulation is off by O(1).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}
# float32 on CUDA: matmuls with TF32 operands (10-bit mantissa) for every provider (use_tf32_on_cuda)
TF32_TOLERANCE = 5e-3


def tolerance(dtype: torch.dtype, device) -> float:
    if dtype == torch.float32 and torch.device(device).type == "cuda" and torch.get_float32_matmul_precision() != "highest":
        return TF32_TOLERANCE
    return TOLERANCE[dtype]


def use_tf32_on_cuda() -> None:
    """float32 on CUDA: every provider's matmuls take TF32 operands (cuBLAS for eager and
    torch.compile via ``torch.set_float32_matmul_precision("high")``), as din_ops' Triton kernels
    do by default, so float32 rows compare equal precision. The calibration's float32 matmul
    rate is then the TF32 rate."""
    torch.set_float32_matmul_precision("high")


class ProviderUnavailable(RuntimeError):
    """The provider cannot run here (e.g. an op not built for this device)."""


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def rel_err(got: torch.Tensor, want: torch.Tensor, floor: float = 0.0) -> float:
    """``||got - want|| / max(||want||, floor)`` in float64 (inf on a shape mismatch or a NaN)."""
    if got is None or want is None:
        return 0.0 if got is None and want is None else math.inf
    if tuple(got.shape) != tuple(want.shape):
        return math.inf
    g, w = got.detach().double(), want.detach().double()
    d = float(torch.linalg.vector_norm(g - w))
    if not math.isfinite(d):
        return math.inf
    return d / max(float(torch.linalg.vector_norm(w)), floor, 1e-30)


def max_rel_err(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], half: bool = False) -> float:
    """The worst :func:`rel_err` of a list of tensors (an output and its input gradients). A
    tensor whose reference is (near) zero, like the output bias gradient under softmax (zero
    exactly: softmax ignores a shift), is compared at 1% of the largest reference norm instead
    of its own, so rounding noise does not count as a mismatch; 10% for half precisions, where
    a sum of terms that cancel (a bias gradient) keeps few correct bits."""
    if len(got) != len(want):
        return math.inf
    norms = [float(torch.linalg.vector_norm(w.detach().double())) for w in want if w is not None]
    floor = (1e-1 if half else 1e-2) * max(norms, default=0.0)
    return max((rel_err(g, w, floor) for g, w in zip(got, want)), default=0.0)


def upcast(t: torch.Tensor) -> torch.Tensor:
    """A leaf copy in the reference precision (float32, or float64 for float64 inputs)."""
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    return t.detach().to(dtype).requires_grad_(t.requires_grad)


def _device_of(case) -> torch.device:
    for v in vars(case).values():
        if isinstance(v, torch.Tensor):
            return v.device
    return torch.device("cpu")


class OpBench:
    """Base class: differentiable ops with modes ``inference`` (no grad), ``fwd`` (inputs
    require grad, the autograd graph is built) and ``fwd+bwd`` (forward and the gradients of
    every input for a fixed random output gradient)."""

    name = ""
    modes: Tuple[str, ...] = ("inference", "fwd", "fwd+bwd")
    train_modes: Tuple[str, ...] = ("fwd+bwd",)  # where peak memory is measured by default
    providers: Dict[str, Callable] = {}
    baseline = "eager"

    # --- what an op defines -------------------------------------------------------------
    def case_key(self, shape: dict) -> tuple:
        """The part of a sweep shape this op uses (identical keys are run once)."""
        raise NotImplementedError

    def make_case(self, shape: dict, dtype: torch.dtype, device, seed: int = 0):
        raise NotImplementedError

    def shape_str(self, case) -> str:
        raise NotImplementedError

    def shape_dict(self, case) -> dict:
        raise NotImplementedError

    def forward(self, fn: Callable, case, mode: str) -> torch.Tensor:
        """The provider's output for ``mode`` (e.g. Dice runs in eval mode for ``inference``)."""
        return fn(case)

    def inputs(self, case) -> List[torch.Tensor]:
        """The tensors whose gradients ``fwd+bwd`` computes."""
        raise NotImplementedError

    def reference(self, case, mode: str, kind: str = "spec"):
        """``(out, grads)`` of the reference on upcast copies of the case's inputs (grads only
        for ``fwd+bwd``). ``kind`` names the semantics (see :meth:`reference_kind`)."""
        raise NotImplementedError

    def reference_kind(self, provider: str, mode: str) -> str:
        """The semantics a provider implements: ``"spec"`` (SPEC.md), or another name the op's
        :meth:`reference` knows (e.g. DeepCTR's Dice, whose statistics include padding)."""
        return "spec"

    def flops(self, case, mode: str) -> float:
        raise NotImplementedError

    def bytes_moved(self, case, mode: str) -> float:
        raise NotImplementedError

    def available(self, provider: str, device) -> Optional[str]:
        """None if ``provider`` can run on ``device``, else why not."""
        return None

    # --- shared machinery ----------------------------------------------------------------
    def step(self, provider: str, case, mode: str) -> Callable[[], Any]:
        """A zero-argument function doing one timed unit of work."""
        fn = self.providers[provider]
        if mode == "inference":
            def run():
                with torch.no_grad():
                    return self.forward(fn, case, mode)
        elif mode == "fwd":
            def run():
                return self.forward(fn, case, mode)
        elif mode == "fwd+bwd":
            inputs, grad_out = self.inputs(case), case.grad_out

            def run():
                out = self.forward(fn, case, mode)
                return torch.autograd.grad(out, inputs, grad_out)
        else:
            raise ValueError(f"{self.name}: unknown mode {mode!r}")
        return run

    def check(self, provider: str, case, mode: str) -> Tuple[float, float]:
        """``(error, tolerance)``: the provider's output (and gradients for ``fwd+bwd``) against
        the reference, as the largest relative L2 error. Also serves as the warm-up call."""
        fn = self.providers[provider]
        ref_out, ref_grads = self._reference_cached(case, mode, self.reference_kind(provider, mode))
        if mode == "fwd+bwd":
            out = self.forward(fn, case, mode)
            grads = torch.autograd.grad(out, self.inputs(case), case.grad_out)
            half = case.dtype in (torch.float16, torch.bfloat16)
            err = max(rel_err(out, ref_out), max_rel_err(grads, ref_grads, half))
        elif mode == "inference":
            with torch.no_grad():
                err = rel_err(self.forward(fn, case, mode), ref_out)
        else:
            err = rel_err(self.forward(fn, case, mode), ref_out)
        return err, tolerance(case.dtype, _device_of(case))

    def reference_group(self, mode: str) -> str:
        """Modes whose reference is the same computation share one: ``train`` (computed with the
        gradients, once for ``fwd`` and ``fwd+bwd``) and ``eval`` (``inference``)."""
        return "eval" if mode == "inference" else "train"

    def _reference_cached(self, case, mode, kind):
        cache = case.__dict__.setdefault("_ref_cache", {})
        group = self.reference_group(mode)
        if (group, kind) not in cache:
            ref_mode = "fwd+bwd" if group == "train" else mode
            cache[(group, kind)] = (self.reference(case, ref_mode, kind) if kind != "spec"
                                    else self.reference(case, ref_mode))
        return cache[(group, kind)]


# --- timing -----------------------------------------------------------------------------------
class Timer:
    """Median and 20th/80th percentiles of repeated runs of a step, in milliseconds.

    CPU: wall clock per run. CUDA: CUDA events around each run; before each run the L2 cache is
    flushed by writing a buffer larger than it (outside the events), like triton's do_bench, so
    a small working set is not timed from cache.
    """

    def __init__(self, device, budget_s: float = 1.0, min_reps: int = 5, max_reps: int = 100,
                 warmup_s: float = 0.05):
        self.device = torch.device(device)
        self.budget_s, self.min_reps, self.max_reps, self.warmup_s = budget_s, min_reps, max_reps, warmup_s
        self._flush = None
        if self.device.type == "cuda":
            self._flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device=self.device)

    def __call__(self, step: Callable[[], Any]) -> Dict[str, float]:
        if self.device.type == "cuda":
            ts = self._cuda(step)
        else:
            ts = self._cpu(step)
        ts.sort()
        return dict(median=statistics.median(ts), p20=_quantile(ts, 0.2), p80=_quantile(ts, 0.8),
                     reps=len(ts))

    def _reps(self, one_s: float) -> int:
        return int(min(self.max_reps, max(self.min_reps, self.budget_s / max(one_s, 1e-7))))

    def _cpu(self, step) -> List[float]:
        """The caller has run the step once already (the correctness check is the warm-up). A
        slow step's next run counts; a fast step runs untimed for ``warmup_s`` first."""
        t0 = time.perf_counter()
        step()
        one = time.perf_counter() - t0
        ts = []
        if one >= 0.05:
            ts.append(one * 1e3)
        else:
            while time.perf_counter() - t0 < self.warmup_s:
                t1 = time.perf_counter()
                step()
                one = min(one, time.perf_counter() - t1)
        for _ in range(self._reps(one) - len(ts)):
            t1 = time.perf_counter()
            step()
            ts.append((time.perf_counter() - t1) * 1e3)
        return ts

    def _cuda(self, step) -> List[float]:
        step()
        torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        n_warm = 0
        while True:
            step()
            n_warm += 1
            torch.cuda.synchronize(self.device)
            if time.perf_counter() - t0 >= self.warmup_s or n_warm >= 100:
                break
        one = (time.perf_counter() - t0) / n_warm
        n = self._reps(one)
        start = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        end = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            self._flush.zero_()
            start[i].record()
            step()
            end[i].record()
        torch.cuda.synchronize(self.device)
        return [s.elapsed_time(e) for s, e in zip(start, end)]


def _quantile(sorted_ts: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    if len(sorted_ts) == 1:
        return sorted_ts[0]
    pos = q * (len(sorted_ts) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(sorted_ts) - 1)
    return sorted_ts[lo] + (sorted_ts[hi] - sorted_ts[lo]) * (pos - lo)


def compile_fn(fn: Callable, dynamic: bool = False) -> Callable:
    """``torch.compile`` with room for every shape of a sweep. ``dynamic=False`` (one static
    graph per shape: the fastest code for each benchmarked shape) fits ops whose shapes are
    fixed from batch to batch (padded histories); ``dynamic=True`` fits shapes that change every
    batch (the number of distinct rows of an MBA update)."""
    import torch._dynamo as dynamo

    for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(dynamo.config, knob):
            setattr(dynamo.config, knob, max(getattr(dynamo.config, knob), 1024))
    return torch.compile(fn, dynamic=dynamic)


# --- pytest-benchmark -------------------------------------------------------------------------
_CASES: Dict[tuple, Any] = {}


def suite_params(bench: "OpBench", providers: Optional[Sequence[str]] = None):
    """``(provider, mode, device, dtype)`` for ``pytest.mark.parametrize``: every provider and mode,
    float32 on the CPU, float32 and bfloat16 on CUDA when present."""
    devs = [("cpu", "fp32")]
    if torch.cuda.is_available():
        devs = [("cuda", "fp32"), ("cuda", "bf16")] + devs
    return [(p, m, d, dt) for d, dt in devs for m in bench.modes for p in (providers or bench.providers)]


def run_benchmark(benchmark, bench: "OpBench", shape: dict, provider: str, mode: str, device: str,
                  dtype: str, budget_s: float = 1.0):
    """One pytest-benchmark measurement: the case (built once per shape, device and dtype and
    shared by the providers), the check against the reference (a mismatch fails the test, an
    unavailable provider skips it), then ``benchmark.pedantic`` of the step. The group holds
    every provider of one op, shape, mode, dtype and device, side by side."""
    import pytest

    why = bench.available(provider, device)
    if why:
        pytest.skip(why)
    key = (bench.name, tuple(sorted((k, str(v)) for k, v in shape.items())), device, dtype)
    if key not in _CASES:
        _CASES.clear()  # one case alive at a time: they can be large
        _CASES[key] = bench.make_case(shape, DTYPES[dtype], device)
    case = _CASES[key]
    err, tol = bench.check(provider, case, mode)
    assert err <= tol, f"{provider} {mode}: relative error {err:.2e} against the reference > {tol:.0e}"
    step = bench.step(provider, case, mode)

    def run():
        r = step()
        sync(device)
        return r

    run()
    t0 = time.perf_counter()
    run()
    one = time.perf_counter() - t0
    rounds = int(min(100, max(5, budget_s / max(one, 1e-6))))
    benchmark.group = f"{bench.name} {bench.shape_str(case)} {mode} {dtype} {device}"
    benchmark.extra_info.update(op=bench.name, provider=provider, mode=mode, dtype=dtype, device=device,
                                **bench.shape_dict(case))
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
