"""Loads the C++ extension (which registers the ``din_ops::*`` schemas and CPU kernels) and
holds what every op module shares: the backend switch and the input checks common to all ops.

Backends. CPU tensors run the C++ kernels; CUDA tensors run the Triton kernels. The Triton
kernels can also run on CPU tensors under ``TRITON_INTERPRET=1`` (set before din_ops is
imported): ``with din_ops.backend("triton"):`` sends CPU tensors through the Triton launchers,
which is how CI tests the GPU code on a machine without a GPU.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Callable, Dict, Optional

import torch

from . import _C  # noqa: F401  (loads the library: registers the schemas and CPU kernels)

NAMESPACE = "din_ops"

# op name -> Triton implementation (a Python function with the op's signature)
_triton_impls: Dict[str, Callable] = {}
_cpu_override: Optional[torch.library.Library] = None
_backend = "cpp"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton is a dependency, but keep CPU use working
        return False
    return True


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def config_context(config, name: str):
    """``configure(**fields)`` for a kernel module's dataclass ``config``: a context manager that
    sets the fields (an unknown one raises) and restores them on exit (tests, tuning)."""

    @contextlib.contextmanager
    def configure(**kwargs):
        old = {k: getattr(config, k) for k in kwargs}
        for k, v in kwargs.items():
            if not hasattr(config, k):
                raise AttributeError(f"unknown {name} config field {k!r}")
            setattr(config, k, v)
        try:
            yield config
        finally:
            for k, v in old.items():
                setattr(config, k, v)

    configure.__doc__ = f"Temporarily changes ``CONFIG`` fields of {name} (tests, tuning)."
    return configure


def register_triton(name: str):
    """Decorator: ``fn`` implements ``din_ops::<name>`` with Triton; it serves CUDA tensors."""

    def deco(fn):
        _triton_impls[name] = fn
        torch.library.register_kernel(f"{NAMESPACE}::{name}", "cuda", fn)
        return fn

    return deco


def _fix_interpreter_scalar_index() -> None:
    """Triton < 3.7's interpreter turns a kernel scalar (a 1-element array) into a Python int with
    ``int(array)``: deprecated for arrays of one dimension since NumPy 1.25, an error in current
    NumPy (2.4: "only 0-dimensional arrays can be converted to Python scalars"). Every loop with
    a runtime bound, as ``range(pid, n_jobs, nprog)``, then fails under the interpreter. Triton
    3.7 converts ``array.squeeze()``; this gives older interpreters the same conversion.
    Compiled kernels are not affected."""
    try:
        import triton
        from triton.runtime import interpreter
    except Exception:  # pragma: no cover
        return
    version = tuple(int(p) for p in triton.__version__.split(".")[:2] if p.isdigit())
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if version >= (3, 7) or patch is None or getattr(patch, "_din_ops_index_fix", False):
        return

    def _patch_lang_tensor(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    _patch_lang_tensor._din_ops_index_fix = True
    interpreter._patch_lang_tensor = _patch_lang_tensor


def _load_triton():
    if triton_interpret():
        _fix_interpreter_scalar_index()
    from . import triton as _triton_pkg  # noqa: F401  (registers the Triton kernels)


def load_triton_if_usable() -> None:
    """Registers the Triton kernels when they can run: a CUDA device, or the interpreter."""
    if triton_available() and (torch.cuda.is_available() or triton_interpret()):
        try:
            _load_triton()
        except Exception as e:  # keep the CPU path importable whatever the Triton version does
            warnings.warn(f"din_ops: the Triton kernels could not be loaded ({type(e).__name__}: {e}); "
                          "CUDA tensors have no din_ops kernel")


def set_backend(name: str) -> None:
    """``"cpp"`` (default): CPU tensors run the C++ kernels. ``"triton"``: CPU tensors run the
    Triton kernels under the interpreter (needs ``TRITON_INTERPRET=1`` before import)."""
    global _cpu_override, _backend
    if name not in ("cpp", "triton"):
        raise ValueError(f"backend must be 'cpp' or 'triton', got {name!r}")
    if _cpu_override is not None:
        _cpu_override._destroy()
        _cpu_override = None
    if name == "triton":
        if not triton_interpret():
            raise RuntimeError(
                "backend('triton') on CPU tensors needs TRITON_INTERPRET=1 in the environment "
                "before din_ops is imported")
        _load_triton()
        lib = torch.library.Library(NAMESPACE, "IMPL")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
            for op, fn in _triton_impls.items():
                lib.impl(op, fn, "CPU", allow_override=True)
        _cpu_override = lib
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def backend(name: str):
    """Context manager form of :func:`set_backend`."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


# --- input checks shared by the ops ------------------------------------------------------------
# Value checks (lengths/offsets ranges, index ranges, NaN frequencies) read tensor data. On CPU
# tensors they run on the host and raise a ValueError that names the argument and the values
# found, before any kernel runs. On CUDA tensors a host read is a device synchronization (and
# makes CUDA-graph capture impossible), so there the checks follow one switch:
#
# * ``"async"`` (default): device-side asserts (``torch._assert_async``): no synchronization;
#   a failing check stops the process's CUDA context at the next synchronization with a message
#   that names the argument (the values are not reported);
# * ``"off"``: no value checks (the kernels still clamp or skip out-of-range values, so nothing
#   is read or written out of bounds; results for such rows are unspecified);
# * ``"sync"``: the CPU behaviour (host reads, a ValueError with the values), for debugging.
#
# Set it with :func:`set_cuda_value_checks` / the :func:`cuda_value_checks` context manager, or
# before import with the environment variable ``DIN_OPS_CUDA_VALUE_CHECKS``. Under
# ``torch.compile`` value checks are skipped (fake tensors hold no data).
CUDA_VALUE_CHECK_MODES = ("async", "off", "sync")
_ENV_VALUE_CHECKS = "DIN_OPS_CUDA_VALUE_CHECKS"


def _initial_cuda_value_checks() -> str:
    mode = os.environ.get(_ENV_VALUE_CHECKS, "async").strip().lower() or "async"
    if mode not in CUDA_VALUE_CHECK_MODES:
        warnings.warn(f"din_ops: {_ENV_VALUE_CHECKS}={mode!r} is not one of {CUDA_VALUE_CHECK_MODES}; "
                      "using 'async'")
        mode = "async"
    return mode


_cuda_value_checks = _initial_cuda_value_checks()
# Tests: CPU tensors take the CUDA checks (device-side asserts raise at once on CPU tensors).
_ASYNC_CHECKS_ON_CPU = False


def set_cuda_value_checks(mode: str) -> None:
    """How the input value checks treat CUDA tensors: ``"async"`` (default; device-side
    asserts, no host synchronization), ``"off"`` (none) or ``"sync"`` (read on the host: a
    ValueError with the values, one synchronization per check). CPU tensors are always checked
    on the host. The initial mode comes from ``DIN_OPS_CUDA_VALUE_CHECKS`` (default ``async``)."""
    global _cuda_value_checks
    if mode not in CUDA_VALUE_CHECK_MODES:
        raise ValueError(f"mode must be one of {CUDA_VALUE_CHECK_MODES}, got {mode!r}")
    _cuda_value_checks = mode


def get_cuda_value_checks() -> str:
    return _cuda_value_checks


@contextlib.contextmanager
def cuda_value_checks(mode: str):
    """Context manager form of :func:`set_cuda_value_checks`."""
    previous = _cuda_value_checks
    set_cuda_value_checks(mode)
    try:
        yield
    finally:
        set_cuda_value_checks(previous)


def value_check_mode(t: torch.Tensor) -> str:
    """``"sync"`` (host reads, ValueError), ``"async"`` (device-side asserts) or ``"off"`` for the
    value checks of tensor ``t``."""
    if torch.compiler.is_compiling():
        return "off"
    if t.device.type == "cuda":
        return _cuda_value_checks
    if _ASYNC_CHECKS_ON_CPU and t.device.type == "cpu":
        return "async"
    return "sync"


_ASYNC_NOTE = " (device-side check: values not reported; din_ops.set_cuda_value_checks('sync') reports them)"


def assert_async(cond: torch.Tensor, msg: str) -> None:
    """Device-side assert of the one-element ``cond`` (no host synchronization on CUDA; raises a
    RuntimeError at once on CPU tensors). ``msg`` names the argument."""
    msg = "din_ops: " + msg
    if len(msg) + len(_ASYNC_NOTE) < 250:
        msg += _ASYNC_NOTE
    torch._assert_async(cond, msg[:250])


def _fits(dtype: torch.dtype, bound: int) -> bool:
    info = torch.iinfo(dtype)
    return info.min <= bound <= info.max


def _aminmax(t: torch.Tensor, bound: int):
    """``(min, max)`` of ``t`` as device scalars, in int64 when ``bound`` is past ``t``'s dtype
    (a Python int compared with an int32 tensor is cast to int32, and would wrap)."""
    lo, hi = torch.aminmax(t)
    if not _fits(t.dtype, bound):
        lo, hi = lo.to(torch.int64), hi.to(torch.int64)
    return lo, hi


def _on_host(t: torch.Tensor) -> bool:
    """A plain int32/int64 CPU tensor whose values the C++ helpers can read (not a fake or other
    subclass)."""
    return type(t) is torch.Tensor and t.device.type == "cpu" and t.dtype in (torch.int32, torch.int64)


def _host_range(t: torch.Tensor):
    """``(min, max)`` of a non-empty integer tensor as Python ints, read on the host."""
    if _on_host(t):
        return _C._int_range(t)
    return int(t.min()), int(t.max())


def check_tensor(t, name: str, *, dims=None, dtype=None, device=None, floating=False):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if dims is not None and t.dim() not in ((dims,) if isinstance(dims, int) else dims):
        raise ValueError(f"{name} must have {dims} dimension(s), got shape {tuple(t.shape)}")
    if floating and t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype} (like the other inputs), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")


def check_lengths(lengths, B: int, T: int, device, name: str = "lengths"):
    """``lengths [B]`` int32/int64 with ``0 <= lengths[b] <= T``."""
    check_tensor(lengths, name, dims=1, device=device)
    if lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {lengths.dtype}")
    if lengths.shape[0] != B:
        raise ValueError(f"{name} must have shape [{B}] (one length per row), got {tuple(lengths.shape)}")
    if B == 0:
        return
    mode = value_check_mode(lengths)
    if mode == "sync":
        lo, hi = _host_range(lengths)
        if lo < 0:
            raise ValueError(f"{name} must be non-negative, got a minimum of {lo}")
        if hi > T:
            raise ValueError(f"{name} must not exceed the padded length T={T}, got a maximum of {hi}")
    elif mode == "async":
        lo, hi = _aminmax(lengths, T)
        assert_async((lo >= 0) & (hi <= T), f"{name} must lie in [0, T={T}]")


def check_offsets(offsets, B: int, N: int, device, name: str = "offsets"):
    """``offsets [B+1]`` int64, starting at 0, non-decreasing, ending at N."""
    check_tensor(offsets, name, dims=1, device=device)
    if offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int64 (or int32), got {offsets.dtype}")
    if B is not None and offsets.shape[0] != B + 1:
        raise ValueError(f"{name} must have shape [{B + 1}] (B + 1 entries), got {tuple(offsets.shape)}")
    if offsets.shape[0] == 0:
        raise ValueError(f"{name} must have at least one entry (offsets[0] == 0)")
    mode = value_check_mode(offsets)
    if mode == "sync":
        if _on_host(offsets):
            first, last, monotone = _C._offsets_summary(offsets)
        else:
            first, last = int(offsets[0]), int(offsets[-1])
            monotone = offsets.shape[0] == 1 or not bool((offsets[1:] < offsets[:-1]).any())
        if first != 0:
            raise ValueError(f"{name}[0] must be 0, got {first}")
        if last != N:
            raise ValueError(f"{name}[-1] must equal the number of values N={N}, got {last}")
        if not monotone:
            raise ValueError(f"{name} must be non-decreasing")
    elif mode == "async":
        last = offsets[-1] if _fits(offsets.dtype, N) else offsets[-1].to(torch.int64)
        ok = (offsets[0] == 0) & (last == N)
        if offsets.shape[0] > 1:
            ok = ok & (offsets[1:] >= offsets[:-1]).all()
        assert_async(ok, f"{name} must start at 0, be non-decreasing and end at N={N}")


def check_index_range(indices, num: int, name: str = "indices"):
    if indices.numel() == 0:
        return
    mode = value_check_mode(indices)
    if mode == "sync":
        lo, hi = _host_range(indices)
        if lo < 0 or hi >= num:
            raise ValueError(f"{name} must lie in [0, {num}), got values in [{lo}, {hi}]")
    elif mode == "async":
        lo, hi = _aminmax(indices.reshape(-1), num)
        assert_async((lo >= 0) & (hi < num), f"{name} must lie in [0, {num})")


def update_running_stats(running_mean, running_var, mean, var, n, momentum):
    """BatchNorm1d's update with the unbiased variance; nothing changes for an empty batch."""
    with torch.no_grad():
        n = n.to(mean.dtype)
        unbiased = var * torch.where(n > 1, n / (n - 1).clamp_min(1), torch.ones_like(n))
        new_mean = running_mean + momentum * (mean.to(running_mean.dtype) - running_mean)
        new_var = running_var + momentum * (unbiased.to(running_var.dtype) - running_var)
        running_mean.copy_(torch.where(n > 0, new_mean, running_mean))
        running_var.copy_(torch.where(n > 0, new_var, running_var))


# --- autocast --------------------------------------------------------------------------------
# The attention unit is matmul-like: under autocast it runs in the autocast dtype (fp32
# accumulation inside the kernels), as torch.nn.Linear does; float64 is left alone, as autocast
# does. Dice follows BatchNorm: it runs in the dtype of its input x, its parameters cast to it.
# MBA ops are not cast. Dice statistics (norm_mean / norm_var) always stay in float32.
AUTOCAST_DEVICES = ("cpu", "cuda")


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The active autocast dtype for ``device_type``, or None when autocast is off there."""
    if device_type not in AUTOCAST_DEVICES or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_to(value, dtype: Optional[torch.dtype]):
    """Casts a tensor (or each tensor of a list) to ``dtype`` the way autocast does: floating,
    not float64, not already ``dtype``; anything else is returned as it is."""
    if dtype is None:
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(autocast_to(v, dtype) for v in value)
    if (isinstance(value, torch.Tensor) and value.is_floating_point()
            and value.dtype not in (torch.float64, dtype)):
        return value.to(dtype)
    return value


def register_autocast(name: str, cast_args: Callable) -> None:
    """Registers ``din_ops::<name>``'s autocast kernel on CPU and CUDA.

    ``cast_args(args, device_type)`` returns the arguments cast as the op's policy says; the op
    then runs with autocast disabled for that device (its casts are recorded by autograd, so
    gradients reach the original parameters in their own dtype).
    """
    for device_type in AUTOCAST_DEVICES:
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))
        op = getattr(getattr(torch.ops, NAMESPACE), name).default

        def kernel(*args, _op=op, _device=device_type, _excluded=excluded):
            args = cast_args(args, _device)  # before the guard: it turns autocast off
            with torch._C._ExcludeDispatchKeyGuard(_excluded):
                return _op(*args)

        _autocast_lib.impl(name, kernel, key)


_autocast_lib = torch.library.Library(NAMESPACE, "IMPL")


# --- second-order gradients ------------------------------------------------------------------
# The fused backward kernels are not differentiable themselves. A backward that runs with
# create_graph=True instead differentiates the op's reference computation (plain torch ops), so
# its gradients carry a graph and every higher derivative is exact.
def vjp_with_graph(fn: Callable, inputs, grad_outputs):
    """``sum_i <grad_outputs[i], fn(*inputs)[i]>`` differentiated w.r.t. every tensor of ``inputs``
    that requires grad, with ``create_graph=True``.

    ``inputs`` holds tensors, lists of tensors and other values; the result has the same
    structure (lists for lists), None where no gradient flows. ``None`` grad_outputs are skipped.
    """
    def alias(x):
        if isinstance(x, (list, tuple)):
            return [alias(t) for t in x]
        if isinstance(x, torch.Tensor) and x.requires_grad:
            return x.view_as(x)  # one node per argument: a tensor passed twice gets each partial
        return x

    def wanted(x):
        return isinstance(x, torch.Tensor) and x.requires_grad

    args = [alias(x) for x in inputs]
    flat = [t for x in args for t in (x if isinstance(x, list) else [x]) if wanted(t)]
    device = next(t for x in inputs for t in (x if isinstance(x, (list, tuple)) else [x])
                  if isinstance(t, torch.Tensor)).device.type
    # the saved inputs already carry the autocast casts; recompute at the op's own precision
    autocast_off = (torch.autocast(device, enabled=False) if device in AUTOCAST_DEVICES
                    else contextlib.nullcontext())
    with torch.enable_grad(), autocast_off:
        outputs = fn(*args)
        pairs = [(o, g.to(o.dtype)) for o, g in zip(outputs, grad_outputs)
                 if g is not None and o.requires_grad]
        grads = iter(torch.autograd.grad([o for o, _ in pairs], flat, [g for _, g in pairs],
                                         create_graph=True, allow_unused=True)
                     if flat and pairs else [None] * len(flat))

    def back(x):
        if isinstance(x, list):
            return [back(t) for t in x]
        return next(grads) if wanted(x) else None

    return [back(x) for x in args]


_GRAPH_BACKWARDS: dict = {}


def register_graph_backward(name: str, fn: Callable) -> None:
    """``fn(tensors, list_sizes, strs, nums)`` computes the gradients of ``din_ops::<name>`` with
    a graph when its C++ autograd node (csrc/autograd.cpp) runs under ``create_graph=True``:
    ``tensors`` holds the output gradients (None where none flows) and the op's tensor inputs with
    its lists flattened (their lengths in ``list_sizes``); it returns the gradients of query, keys
    and every list element, in order."""
    _GRAPH_BACKWARDS[name] = fn


def _graph_backward(op, tensors, list_sizes, strs, nums):
    return _GRAPH_BACKWARDS[op](tensors, list_sizes, strs, nums)


_C._set_graph_backward(_graph_backward)


def below_autograd():
    """Calls a fused backward without its autograd kernel: the plain backward runs with grad
    mode off, where that kernel would only add Python overhead."""
    return torch._C._AutoDispatchBelowAutograd()


def register_not_differentiable(name: str) -> None:
    """Differentiating through ``din_ops::<name>`` (a fused backward) raises instead of yielding
    zeros; the forward op's own backward never records it."""
    def backward(ctx, *grads):
        raise RuntimeError(
            f"din_ops::{name} is not differentiable; differentiate the forward op with "
            f"create_graph=True instead (its backward then builds an exact graph)")

    torch.library.register_autograd(f"{NAMESPACE}::{name}", backward)
