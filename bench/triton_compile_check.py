"""Compile check of the din_ops Triton kernels for Hopper (sm_90a: H100, H200) and Ampere (sm_80:
A100) on a machine without a GPU.

Every kernel variant the launchers in ``din_ops/triton/*.py`` launch for a set of configurations
(activation x hidden layers x layout x dtype x candidates x normalization, Dice x layout x dtype,
MBA optimizer x width, embedding_attention_pooling layout x dtype) is compiled with
``triton.compile(ASTSource(...), target=GPUTarget(...))``, ptxas included (triton's bundled one),
and its registers, spills and shared memory are reported.
No CUDA driver is touched: ``triton.runtime.driver`` is never asked for a device.

How the variants are found: the launchers run on CPU tensors with ``JITFunction.run``
replaced, so each ``kernel[grid](...)`` is recorded instead of launched; the few decisions the
launchers take from the device (operand dtype of fp16/bf16 products, deterministic mode,
interpreter tile sizes) are made as on a CUDA device. The recorded arguments go through the JIT's
own binder (``create_function_from_signature`` / ``JITFunction._pack_args``), so signature,
constexprs, divisibility attributes and options are the ones a launch on the GPU compiles.
A second pass replays every configuration against the compiled variants as a GPU would: a
variant above the target's shared memory raises ``OutOfResources``, and
``attention_pooling._launch`` falls back as it does on the device (3xTF32 -> TF32, then half the
tile's rows); the variants it falls back to are compiled and reported too.

Reported per variant: ``regs`` (ptxas), ``spill B`` (bytes of spill stores per thread, ptxas
-v), ``n_spills`` (what ``CompiledKernel.n_spills`` gives on a GPU: local memory per thread / 4),
``smem`` (``compiled.metadata.shared``) and the compile time. Runtime integers equal to 1 show up
among a variant's constexprs (``C=1``, ``n_cblk=1``): the JIT specializes them, so does the check.

Fails (exit status 1) on a compile error (front end, LLVM or ptxas), on a variant whose shared
memory is above the target's limit (227 KiB per block on H100/H200, 163 KiB on A100) when the
launcher has no fallback for it, and with ``--strict`` on any variant above the limit. SIGTERM
or SIGINT stops it with a report of what had compiled (and exit status 1).

    python bench/triton_compile_check.py --quick            # CI subset, both targets
    python bench/triton_compile_check.py                    # every configuration (long; use -j)
    python bench/triton_compile_check.py --targets sm90a --out report.md --json report.json -j 16
    python bench/triton_compile_check.py --list             # count the variants, compile nothing

Time: ``--quick`` is 13 configurations, 96 variants (48 per target) and one fallback, about 180
CPU-seconds of compilation: 100-190 s on 2 shared cores; the longest variant alone (the
(200, 80, 40) fp32 backward) takes 30-60 s, so more cores stop helping there. The full set is
551 configurations, about 2600 variants: several CPU-hours, for a manual run with ``-j``.

Needs the built extension (``python setup.py build_ext --inplace``) and triton with its NVIDIA
backend; works with triton 3.6 and 3.7. ``TRITON_INTERPRET`` is ignored (removed from the
environment when run as a script; an importer must not have set it before din_ops was imported).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: real JIT functions
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

KIB = 1024


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    arch: int  # compute capability as GPUTarget takes it; triton adds the "a" of sm_90a itself
    shared_limit: int  # bytes: cudaDevAttrMaxSharedMemoryPerBlockOptin, what triton checks at load
    gpus: str
    sms: int  # multiprocessors: the launchers size persistent grids by them


TARGETS = {
    "sm90a": Target("sm90a", 90, 227 * KIB, "H100/H200", 132),
    "sm80": Target("sm80", 80, 163 * KIB, "A100", 108),
}


# ------------------------------------------------------------------------------------------------
# availability
# ------------------------------------------------------------------------------------------------
def unavailable_reason() -> Optional[str]:
    """Why the check cannot run here (no triton, no NVIDIA backend, no ptxas), else None."""
    try:
        import triton  # noqa: F401
        from triton.backends import backends
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the installation
        return f"triton is not importable ({type(e).__name__}: {e})"
    if "nvidia" not in backends:
        return "triton has no NVIDIA backend (triton.backends.backends lacks 'nvidia')"
    try:
        from triton import knobs
        ptxas = knobs.nvidia.ptxas.path
    except Exception as e:  # pragma: no cover
        return f"ptxas not found ({type(e).__name__}: {e})"
    if not ptxas or not os.access(ptxas, os.X_OK):
        return f"ptxas not found or not executable: {ptxas!r}"
    return None


# ------------------------------------------------------------------------------------------------
# configurations
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class APCase:
    """One attention_pooling configuration: a training step (Dice: statistics per hidden layer,
    forward, backward, statistics backward) or, with ``train=False``, the forward alone."""
    activation: str  # sigmoid relu identity prelu dice
    hidden: Tuple[int, ...]
    layout: str  # padded (no lengths), lengths, jagged
    dtype: str  # fp32 fp16 bf16
    C: int  # candidates per row (1: query [B, D])
    normalization: str = "none"
    D: int = 32  # 2 * embed_dim of the DIN model
    T: int = 100  # padded history length (jagged: the mean row length)
    B: int = 64
    train: bool = True

    @property
    def label(self):
        h = "x".join(map(str, self.hidden)) or "0"
        extra = "".join(f" {k}={getattr(self, k)}" for k in ("D", "T", "B")
                        if getattr(self, k) != APCase.__dataclass_fields__[k].default)
        return (f"ap {self.activation} h={h} {self.layout} {self.dtype} C={self.C} {self.normalization}"
                f"{'' if self.train else ' eval'}{extra}")


@dataclasses.dataclass(frozen=True)
class DiceCase:
    layout: str  # flat [N, C], padded [B, T, C], lengths [B, T, C] with lengths
    dtype: str
    C: int
    affine: bool = True
    train: bool = True
    R: int = 4096  # rows (flat) or B * T

    @property
    def label(self):
        return (f"dice {self.layout} {self.dtype} C={self.C} {'affine' if self.affine else 'plain'}"
                f"{'' if self.train else ' eval'}")


@dataclasses.dataclass(frozen=True)
class MBACase:
    optimizer: str  # sgd adagrad adagrad_rowwise
    dtype: str
    D: int
    hot: bool = True  # a row hit more than PIECE times: the two-level sum's pieces kernel

    @property
    def label(self):
        return f"mba {self.optimizer} {self.dtype} D={self.D}{' hot' if self.hot else ''}"


@dataclasses.dataclass(frozen=True)
class EmbCase:
    """One embedding_attention_pooling configuration (two tables of width D/2, hidden (80, 40)):
    forward and backward (Dice: the statistics ops too). Its attention variants are those of the
    APCase with the same axes; new here are the gather and the per-id sum of key gradients."""
    layout: str  # padded, lengths, jagged
    dtype: str
    C: int
    activation: str = "sigmoid"
    normalization: str = "none"
    D: int = 32
    T: int = 100
    B: int = 64

    @property
    def label(self):
        return f"emb {self.activation} {self.layout} {self.dtype} C={self.C} {self.normalization}"


ACTIVATIONS = ("sigmoid", "relu", "identity", "prelu", "dice")
DTYPES = ("fp32", "fp16", "bf16")
LAYOUTS = ("padded", "lengths", "jagged")


def full_cases() -> List[Any]:
    """Every activation x (80, 40) / (200, 80, 40) x layout x dtype x one / 32 candidates x
    normalization in training, plus the other depths (0, 1, 4 hidden layers), 4 candidates, short
    histories, serving forwards, Dice (layout x dtype x width x affine) and MBA (optimizer x dtype
    x width). Long: thousands of variants (``--list`` counts them); run it with ``-j``."""
    A = APCase
    cases: List[Any] = []
    for act, hidden, layout, dt, C, norm in itertools.product(
            ACTIVATIONS, ((80, 40), (200, 80, 40)), LAYOUTS, DTYPES, (1, 32), ("none", "softmax")):
        cases.append(A(act, hidden, layout, dt, C, norm))
    for hidden, act, dt, C in itertools.product(((), (80,), (256, 128, 64, 32)), ("sigmoid", "dice"), DTYPES,
                                                (1, 4)):
        cases.append(A(act, hidden, "lengths", dt, C))
    for act, dt in itertools.product(ACTIVATIONS, DTYPES):
        cases.append(A(act, (80, 40), "lengths", dt, 4, "softmax"))  # CB = 4
        cases.append(A(act, (80, 40), "lengths", dt, 1, T=20))  # short histories: smaller BT
        cases.append(A(act, (80, 40), "jagged", dt, 1, D=36))  # DP = 64 (padded channels)
    for act, dt, C in itertools.product(("sigmoid", "dice"), DTYPES, (1, 32)):
        cases.append(A(act, (80, 40), "lengths", dt, C, train=False))  # serving: forward only
    for layout, dt, C, affine in itertools.product(("flat", "padded", "lengths"), DTYPES, (36, 80, 200),
                                                   (True, False)):
        cases.append(DiceCase(layout, dt, C, affine))
    for dt in DTYPES:
        cases.append(DiceCase("flat", dt, 80, train=False))
    for opt, dt, D in itertools.product(("sgd", "adagrad", "adagrad_rowwise"), DTYPES, (16, 64, 2048)):
        cases.append(MBACase(opt, dt, D, hot=D != 64))
    for layout, dt in itertools.product(LAYOUTS, DTYPES):
        cases.append(EmbCase(layout, dt, 1))
    cases.append(EmbCase("lengths", "fp32", 4, "dice", "softmax"))
    return cases + [c for c in quick_cases() if c not in cases]


def quick_cases() -> List[Any]:
    """The CI subset (about 2.5 minutes for both targets on 2 cores): the backward of every
    activation, depths 1 to 3, every layout, dtype, candidate count (1, 4, 32: CB 1, 4, 16) and
    normalization at least once (not every combination), the Dice statistics kernels, the widest
    layers (200, 80, 40) in fp32 training (the largest shared memory: on sm80 the backward falls
    back to half the rows), the Dice op in each layout and every MBA optimizer and code path
    (one chunk or several, hot rows or not)."""
    A = APCase
    return [
        A("sigmoid", (80, 40), "lengths", "fp32", 1),  # the DIN default
        A("identity", (80, 40), "jagged", "bf16", 32, "softmax"),
        A("dice", (80, 40), "padded", "fp16", 4),
        A("prelu", (200, 80, 40), "lengths", "fp32", 1),
        A("relu", (80,), "lengths", "fp32", 4, "softmax"),
        DiceCase("lengths", "bf16", 80),
        DiceCase("flat", "fp32", 200, affine=False),
        DiceCase("padded", "fp16", 36, train=False),
        MBACase("adagrad", "fp32", 16),
        MBACase("adagrad_rowwise", "bf16", 2048),
        MBACase("sgd", "fp16", 64, hot=False),
        EmbCase("lengths", "fp32", 1),  # the attention variants of the DIN default case
        EmbCase("jagged", "bf16", 32, "identity", "softmax"),
    ]


# ------------------------------------------------------------------------------------------------
# running the launchers with JITFunction.run replaced
# ------------------------------------------------------------------------------------------------
def _torch_dtype(name):
    import torch
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}[name]


@contextlib.contextmanager
def _as_on_cuda(target: Target):
    """The launchers' device-dependent decisions, taken as for CUDA tensors on ``target`` (the
    kernels see CPU tensors here): fp16/bf16 product operands in the input dtype, atomics outside
    deterministic mode, GPU tile sizes and grids (sized by the GPU's multiprocessors)."""
    import torch
    from din_ops.triton import attention_pooling as tap
    from din_ops.triton import dice as tdice
    from din_ops.triton import embedding_attention_pooling as temb
    from din_ops.triton import mba as tmba
    cuda = torch.device("cuda")
    saved = [(tap, "_types", tap._types), (tap, "_deterministic", tap._deterministic),
             (tdice, "triton_interpret", tdice.triton_interpret), (tmba, "_interpreted", tmba._interpreted),
             (temb, "_interpreted", temb._interpreted),
             (tap, "_FALLBACK", tap._FALLBACK), (tap, "_num_programs", tap._num_programs)]
    types = tap._types
    tap._types = lambda dtype, device, backward: types(dtype, cuda, backward)
    tap._num_programs = lambda jobs, device: 0 if jobs <= 0 else min(jobs, target.sms * tap.CONFIG.programs_per_sm)
    tap._deterministic = lambda device: torch.are_deterministic_algorithms_enabled()
    tdice.triton_interpret = lambda: False
    tmba._interpreted = lambda t: False
    temb._interpreted = lambda t: False
    tap._FALLBACK = {}  # fallbacks found for one target must not leak into another
    try:
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


@contextlib.contextmanager
def _launches_to(handler: Callable):
    """``kernel[grid](*args, **kwargs)`` calls ``handler(kernel, args, kwargs)`` instead of running."""
    from triton.runtime.jit import JITFunction
    run = JITFunction.run

    def fake_run(self, *args, grid, warmup, **kwargs):
        return handler(self, args, kwargs)

    JITFunction.run = fake_run
    try:
        yield
    finally:
        JITFunction.run = run


def _rand(*shape, dtype, scale=0.1, gen=None):
    import torch
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def _run_ap(case: APCase):
    import torch
    from din_ops.triton import attention_pooling as tap
    g = torch.Generator().manual_seed(0)
    dt = _torch_dtype(case.dtype)
    B, T, D, C = case.B, case.T, case.D, case.C
    q = _rand(*((B, D) if C == 1 else (B, C, D)), dtype=dt, gen=g)
    lengths = offsets = None
    if case.layout == "jagged":
        lens = torch.randint(1, 2 * T, (B,), generator=g)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
        keys = _rand(int(offsets[-1]), D, dtype=dt, gen=g)
    else:
        keys = _rand(B, T, D, dtype=dt, gen=g)
        if case.layout == "lengths":
            lengths = torch.randint(0, T + 1, (B,), generator=g)
    dims = [4 * D] + list(case.hidden) + [1]
    weights = [_rand(dims[i + 1], dims[i], dtype=dt, gen=g) for i in range(len(dims) - 1)]
    biases = [_rand(dims[i + 1], dtype=dt, gen=g) for i in range(len(dims) - 1)]
    n = len(case.hidden)
    act_w = []
    if case.activation in ("prelu", "dice"):
        act_w = [torch.full((h,), 0.25, dtype=dt) for h in case.hidden]
    acc = torch.float32
    mean = [torch.zeros(h, dtype=acc) for h in case.hidden] if case.activation == "dice" else []
    var = [torch.ones(h, dtype=acc) for h in case.hidden] if case.activation == "dice" else []
    gamma = [torch.ones(h, dtype=dt) for h in case.hidden] if case.activation == "dice" else []
    beta = [torch.zeros(h, dtype=dt) for h in case.hidden] if case.activation == "dice" else []
    eps, scale = 1e-8, 1.0
    rows = (q, keys, lengths, offsets)
    stats_train = case.train and case.activation == "dice"
    if stats_train:  # the training forward: statistics layer by layer (ops/attention_pooling.py)
        for layer in range(n):
            tap.attention_pooling_stats(*rows, weights[:layer + 1], biases[:layer + 1], act_w[:layer],
                                        mean[:layer], var[:layer], gamma[:layer], beta[:layer],
                                        case.activation, eps)
    args = (weights, biases, act_w, mean, var, gamma, beta, case.activation)
    out, attn = tap.attention_pooling(*rows, *args, case.normalization, scale, eps)
    if not case.train:
        return
    tap.attention_pooling_backward(torch.ones_like(out), None, attn, *rows, *args, case.normalization,
                                   scale, eps)
    if stats_train:
        for layer in range(n):
            h = case.hidden[layer]
            tap.attention_pooling_stats_backward(
                torch.ones(h, dtype=acc), torch.ones(h, dtype=acc), torch.zeros(h, dtype=acc), *rows,
                weights[:layer + 1], biases[:layer + 1], act_w[:layer], mean[:layer], var[:layer],
                gamma[:layer], beta[:layer], case.activation, eps)


def _run_dice(case: DiceCase):
    import torch
    from din_ops.triton import dice as tdice
    g = torch.Generator().manual_seed(0)
    dt = _torch_dtype(case.dtype)
    C = case.C
    lengths = None
    if case.layout == "flat":
        x = _rand(case.R, C, dtype=dt, gen=g)
    else:
        T = 64
        x = _rand(case.R // T, T, C, dtype=dt, gen=g)
        if case.layout == "lengths":
            lengths = torch.randint(0, T + 1, (case.R // T,), generator=g)
    alpha = torch.full((C,), 0.25, dtype=dt)
    gamma = torch.ones(C, dtype=dt) if case.affine else None
    beta = torch.zeros(C, dtype=dt) if case.affine else None
    rm, rv = torch.zeros(C), torch.ones(C)
    y, mean, var = tdice.dice(x, lengths, alpha, gamma, beta, None if case.train else rm,
                              None if case.train else rv, case.train, 1e-8)
    tdice.dice_backward(torch.ones_like(y), x, lengths, alpha, gamma, beta, mean, var, case.train, 1e-8)


def _run_mba(case: MBACase):
    import torch
    from din_ops.triton import mba as tmba
    g = torch.Generator().manual_seed(0)
    dt = _torch_dtype(case.dtype)
    N, M = 5000, 4096
    weight = _rand(N, case.D, dtype=dt, gen=g)
    idx = torch.randint(0, N, (M,), generator=g)
    if case.hot:
        idx[: M // 2] = 7  # one row hit 2048 times: pieces of PIECE occurrences
    grad = _rand(M, case.D, dtype=dt, gen=g)
    freq = torch.ones(N)
    state = None
    if case.optimizer == "adagrad":
        state = torch.zeros(N, case.D, dtype=dt)
    elif case.optimizer == "adagrad_rowwise":
        state = torch.zeros(N, dtype=dt)
    tmba.mba_sparse_update_triton(weight, idx, grad, freq, state, 0.01, 1e-4, case.optimizer, 0, 1e-10)
    tmba.mba_penalty_triton(weight, idx, freq, 1e-4, 0)
    tmba.mba_penalty_backward_triton(torch.ones((), dtype=dt), weight, idx, freq, 1e-4, 0)


def _run_emb(case: EmbCase):
    import torch
    from din_ops.triton import embedding_attention_pooling as temb
    g = torch.Generator().manual_seed(0)
    dt = _torch_dtype(case.dtype)
    B, T, D, C = case.B, case.T, case.D, case.C
    q = _rand(*((B, D) if C == 1 else (B, C, D)), dtype=dt, gen=g)
    tables = [_rand(1000, D // 2, dtype=dt, gen=g), _rand(50, D - D // 2, dtype=dt, gen=g)]
    lengths = offsets = None
    if case.layout == "jagged":
        lens = torch.randint(1, 2 * T, (B,), generator=g)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
        ids = [torch.randint(0, t.shape[0], (int(offsets[-1]),), generator=g) for t in tables]
    else:
        ids = [torch.randint(0, t.shape[0], (B, T), generator=g) for t in tables]
        if case.layout == "lengths":
            lengths = torch.randint(0, T + 1, (B,), generator=g)
    dims = [4 * D, 80, 40, 1]
    weights = [_rand(dims[i + 1], dims[i], dtype=dt, gen=g) for i in range(3)]
    biases = [_rand(dims[i + 1], dtype=dt, gen=g) for i in range(3)]
    dice = case.activation == "dice"
    act_w = [torch.full((h,), 0.25, dtype=dt) for h in (80, 40)] if case.activation in ("prelu", "dice") else []
    mean = [torch.zeros(h) for h in (80, 40)] if dice else []
    var = [torch.ones(h) for h in (80, 40)] if dice else []
    rows = (q, tables, ids, lengths, offsets)
    lists = (act_w, mean, var, [], [])
    pad = [0, -1]
    if dice:
        temb.embedding_attention_pooling_stats(*rows, pad, weights[:2], biases[:2], act_w[:1], mean[:1], var[:1], [],
                                               [], case.activation, 1e-8)
        temb.embedding_attention_pooling_stats_backward(torch.ones(40), torch.ones(40), torch.zeros(40), *rows, pad,
                                                        weights[:2], biases[:2], act_w[:1], mean[:1], var[:1], [], [],
                                                        case.activation, 1e-8)
    out, attn = temb.embedding_attention_pooling(*rows, pad, weights, biases, *lists, case.activation,
                                                 case.normalization, 1.0, 1e-8)
    temb.embedding_attention_pooling_backward(torch.ones_like(out), None, attn, *rows, pad, weights, biases, *lists,
                                              case.activation, case.normalization, 1.0, 1e-8)


def run_case(case):
    {APCase: _run_ap, DiceCase: _run_dice, MBACase: _run_mba, EmbCase: _run_emb}[type(case)](case)


# ------------------------------------------------------------------------------------------------
# specialization (as the JIT does it) and compilation
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Spec:
    """Everything ``triton.compile`` needs for one variant on one target (picklable)."""
    module: str
    kernel: str
    arch: int
    signature: Dict[str, str]
    constexprs: Dict[Tuple[int, ...], Any]
    attrs: Dict[Tuple[int, ...], Any]
    options: Dict[str, Any]

    def key(self):
        return (self.module, self.kernel, self.arch, repr(sorted(self.signature.items())),
                repr(sorted((k, str(v)) for k, v in self.constexprs.items())),
                repr(sorted(self.attrs.items())), repr(sorted((k, str(v)) for k, v in self.options.items())))

    def summary(self, arg_names):
        """The constexprs (and num_warps/num_stages) in the kernel's own names."""
        parts = []
        for path, v in sorted(self.constexprs.items()):
            name = arg_names[path[0]]
            if name.endswith("_ptr") or v is None:
                continue
            parts.append(f"{name}={_short(v)}")
        parts.append(f"warps={self.options.get('num_warps')}")
        parts.append(f"stages={self.options.get('num_stages')}")
        return " ".join(parts)


def _short(v):
    if isinstance(v, bool):
        return int(v)
    return str(v)


_BACKENDS: Dict[int, Any] = {}


def _backend(arch):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    if arch not in _BACKENDS:
        _BACKENDS[arch] = make_backend(GPUTarget("cuda", arch, 32))
    return _BACKENDS[arch]


_BINDERS: Dict[Tuple[int, int], Callable] = {}


def specialize(kernel, args, kwargs, arch) -> Spec:
    """What ``JITFunction.run`` computes before it compiles: through the JIT's own binder, so
    pointer alignment (tt.divisibility), integer specialization and options are the JIT's."""
    from triton import knobs
    from triton.runtime.jit import JITFunction, create_function_from_signature
    if not isinstance(kernel, JITFunction):
        raise RuntimeError(f"{kernel!r} is not a JITFunction: was TRITON_INTERPRET=1 set when din_ops "
                           "was imported? The compile check needs the real JIT functions")
    backend = _backend(arch)
    bkey = (id(kernel), arch)
    if bkey not in _BINDERS:
        _BINDERS[bkey] = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    if hasattr(knobs.compilation, "instrumentation_mode"):
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, specialization, options = _BINDERS[bkey](*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return Spec(kernel.fn.__module__, kernel.fn.__name__, arch, dict(signature), dict(constexprs), dict(attrs),
                dict(options.__dict__))


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _resources_from_cubin(cubin: bytes):
    """(registers, stack bytes) of a cubin through triton's bundled cuobjdump."""
    from triton import knobs
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def compile_spec(spec: Spec) -> Dict[str, Any]:
    """Compiles one variant; returns its resources or its error (never raises)."""
    import importlib
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    res: Dict[str, Any] = dict(regs=None, spill_stores=None, spill_loads=None, stack=None, n_spills=None,
                               shared=None, seconds=None, error=None)
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        fn = getattr(importlib.import_module(spec.module), spec.kernel)
        src = ASTSource(fn=fn, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.attrs)
        with knobs.nvidia.scope():
            knobs.nvidia.dump_ptxas_log = True  # ptxas -v output (regs, spills) is printed
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(src, target=GPUTarget("cuda", spec.arch, 32), options=spec.options)
    except Exception as e:
        msg = f"{type(e).__name__}: {e}"
        res.update(error=msg[:4000], seconds=round(time.perf_counter() - t0, 2))
        return res
    res["seconds"] = round(time.perf_counter() - t0, 2)
    res["shared"] = int(compiled.metadata.shared)
    text = log.getvalue()
    m, s = _PTXAS_REGS.search(text), _PTXAS_SPILL.search(text)
    if m and s:
        res.update(regs=int(m.group(1)), stack=int(s.group(1)), spill_stores=int(s.group(2)),
                   spill_loads=int(s.group(3)))
    else:  # a cache hit prints no ptxas log
        res["regs"], res["stack"] = _resources_from_cubin(compiled.asm["cubin"])
    if res["stack"] is not None:
        # CompiledKernel.n_spills on a GPU: CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES / 4
        res["n_spills"] = res["stack"] // 4
    return res


# ------------------------------------------------------------------------------------------------
# the check
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    target: str
    kernel: str
    case: str  # first configuration that launches it
    variant: str  # constexprs
    regs: Optional[int]
    spill_stores: Optional[int]
    n_spills: Optional[int]
    shared: Optional[int]
    seconds: Optional[float]
    status: str  # ok | over limit, fell back | over limit | compile error | not compiled
    error: Optional[str] = None
    cases: int = 1  # configurations that launch it
    case_index: int = 0


@dataclasses.dataclass
class Report:
    rows: List[Row]
    failures: List[str]
    seconds: float
    triton_version: str
    ptxas: str
    cases: int

    def ok(self):
        return not self.failures


def _cost(spec: Spec) -> Tuple[int, int]:
    """A guess of a variant's compile time, to start the longest first: the attention backward,
    then the statistics and forward kernels, by the width of their layers."""
    rank = {"_bwd_kernel": 3, "_stats_kernel": 2, "_fwd_kernel": 2}.get(spec.kernel, 0)
    width = sum(v for (i,), v in spec.constexprs.items() if isinstance(v, int) and not isinstance(v, bool))
    return rank, width


_STOPPED = "not compiled: the check was stopped"


def _compile_all(specs: Sequence[Spec], jobs: int, progress) -> Tuple[List[Dict[str, Any]], Optional[str]]:
    """Results in the order of ``specs``, and why the compilation stopped early, if it did
    (SIGINT / SIGTERM, a compile process that died): the variants not compiled then carry the
    error ``_STOPPED``."""
    results: List[Optional[Dict[str, Any]]] = [None] * len(specs)
    stopped = None
    order = sorted(range(len(specs)), key=lambda i: _cost(specs[i]), reverse=True)
    if jobs <= 1 or len(specs) <= 1:
        try:
            for n, i in enumerate(order):
                results[i] = compile_spec(specs[i])
                progress(n + 1, len(specs), specs[i], results[i])
        except KeyboardInterrupt:
            stopped = "stopped by a signal"
    else:
        import concurrent.futures as cf
        import multiprocessing as mp
        from concurrent.futures.process import BrokenProcessPool
        # spawn: the workers start clean (no OpenMP state inherited from the torch work above)
        ex = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                                    initializer=_worker_init, initargs=(sys.path,))
        try:
            futs = {ex.submit(compile_spec, specs[i]): i for i in order}
            for n, f in enumerate(cf.as_completed(futs)):
                i = futs[f]
                results[i] = f.result()
                progress(n + 1, len(specs), specs[i], results[i])
        except KeyboardInterrupt:
            stopped = "stopped by a signal"
        except BrokenProcessPool as e:  # a worker killed (by the signal, or it crashed)
            stopped = f"a compile process died ({e})"
        finally:
            if stopped:
                for proc in list((getattr(ex, "_processes", None) or {}).values()):
                    proc.terminate()
            ex.shutdown(wait=not stopped, cancel_futures=True)
    for i, r in enumerate(results):
        if r is None:
            results[i] = dict(regs=None, spill_stores=None, spill_loads=None, stack=None, n_spills=None,
                              shared=None, seconds=None, error=_STOPPED)
    return results, stopped  # type: ignore[return-value]


def _worker_init(path):
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path[:] = path


def record_launches(cases: Sequence[Any], targets: Sequence[Target]):
    """The launches of every configuration on every target, as ``(case index, target, Spec)``
    (nothing is compiled), and the configurations whose launcher failed."""
    launches: List[Tuple[int, Target, Spec]] = []
    failed: Dict[Tuple[int, str], str] = {}
    for ci, case in enumerate(cases):
        for tg in targets:
            def record(kernel, args, kwargs, ci=ci, tg=tg):
                launches.append((ci, tg, specialize(kernel, args, kwargs, tg.arch)))
            try:
                with _as_on_cuda(tg), _launches_to(record):
                    run_case(case)
            except Exception as e:
                failed[(ci, tg.name)] = f"{tg.name} {case.label}: the launcher failed: {type(e).__name__}: {e}"
    return launches, failed


def _arg_names(spec: Spec) -> List[str]:
    import importlib
    return list(getattr(importlib.import_module(spec.module), spec.kernel).arg_names)


def check(cases: Sequence[Any], targets: Sequence[Target], jobs: int = 1, strict: bool = False,
          verbose: bool = False) -> Report:
    """Records every launch of ``cases``, compiles each distinct variant for each target, replays
    the cases against the results (fallbacks of ``attention_pooling._launch``) and reports."""
    import triton
    from triton import knobs
    from triton.runtime.errors import OutOfResources
    t_start = time.time()
    log = print if verbose else (lambda *a, **k: None)

    # 1. the launches of every configuration, per target
    launches, failed = record_launches(cases, targets)
    failures = list(failed.values())

    # 2. compile the distinct variants
    uniq: Dict[Any, Spec] = {}
    for _, _, spec in launches:
        uniq.setdefault(spec.key(), spec)
    keys = list(uniq)
    log(f"{len(cases)} configurations x {len(targets)} targets: {len(launches)} launches, {len(keys)} distinct "
        f"variants; compiling with {jobs} process(es)", flush=True)

    def progress(i, n, spec, res):
        what = res["error"].splitlines()[0][:160] if res["error"] else \
            f"regs {res['regs']}, spill {res['spill_stores']} B, smem {res['shared']} B, {res['seconds']} s"
        log(f"  [{i}/{n}] sm{spec.arch} {spec.kernel}: {what}", flush=True)

    compiled, stopped = _compile_all([uniq[k] for k in keys], jobs, progress)
    results = dict(zip(keys, compiled))
    first_case: Dict[Any, int] = {}
    users: Dict[Any, set] = {}  # key -> (case index, target) that launched it
    for ci, tg, spec in launches:
        first_case.setdefault(spec.key(), ci)
        users.setdefault(spec.key(), set()).add((ci, tg.name))
    if stopped:
        n = sum(r["error"] != _STOPPED for r in compiled)
        failures.append(f"{stopped} after {n} of {len(keys)} variants had compiled (the rest are not checked)")

    # 3. replay the launches a GPU of each target makes: OutOfResources where a variant needs more
    # shared memory than the target has, as at load time (attention_pooling._launch falls back)
    try:
        for ci, case in enumerate(cases):
            for tg in targets:
                if stopped or (ci, tg.name) in failed:
                    continue

                def replay(kernel, args, kwargs, ci=ci, tg=tg):
                    spec = specialize(kernel, args, kwargs, tg.arch)
                    k = spec.key()
                    if k not in results:  # a variant the launcher falls back to: compiled now
                        uniq[k] = spec
                        results[k] = compile_spec(spec)
                        progress("fallback", len(results), spec, results[k])
                    first_case.setdefault(k, ci)
                    users.setdefault(k, set()).add((ci, tg.name))
                    r = results[k]
                    if r["error"] is None and r["shared"] > tg.shared_limit:
                        raise OutOfResources(r["shared"], tg.shared_limit, "shared memory")
                try:
                    with _as_on_cuda(tg), _launches_to(replay):
                        run_case(case)
                except Exception as e:
                    msg = f"{tg.name} {case.label}: {type(e).__name__}: {str(e).splitlines()[0]}"
                    failed[(ci, tg.name)] = msg
                    failures.append(msg)
    except KeyboardInterrupt:
        stopped = "stopped by a signal"
        failures.append("stopped while replaying the configurations (fallback variants are not checked)")

    # 4. rows
    rows: List[Row] = []
    tg_of = {t.arch: t for t in targets}
    for k, spec in uniq.items():
        if k not in first_case:
            continue
        r, tg, label = results[k], tg_of[spec.arch], cases[first_case[k]].label
        if r["error"] == _STOPPED:
            status = "not compiled"
        elif r["error"]:
            status = "compile error"
            failures.append(f"{tg.name} {spec.kernel} ({label}): compile error: {r['error'].splitlines()[0]}")
        elif r["shared"] > tg.shared_limit:
            recovered = not any(u in failed for u in users[k])
            status = "over limit, fell back" if recovered else "over limit"
            if strict and recovered:
                failures.append(f"{tg.name} {spec.kernel} ({label}): shared memory {r['shared']} B > "
                                f"{tg.shared_limit} B (the launcher falls back)")
        else:
            status = "ok"
        rows.append(Row(tg.name, spec.kernel, label, spec.summary(_arg_names(spec)), r["regs"], r["spill_stores"],
                        r["n_spills"], r["shared"], r["seconds"], status, r["error"], len(users[k]),
                        first_case[k]))
    order = {t.name: i for i, t in enumerate(targets)}
    rows.sort(key=lambda r: (order[r.target], r.case_index, r.kernel))
    return Report(rows, failures, round(time.time() - t_start, 1), triton.__version__, knobs.nvidia.ptxas.path,
                  len(cases))


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------
def _fmt(v, unit=""):
    return "-" if v is None else f"{v}{unit}"


def table(report: Report, markdown: bool = False) -> str:
    """One row per compiled variant: resources first, then the first configuration that launches
    it (``+N``: N more do) and its constexprs."""
    head = ["target", "kernel", "regs", "spill B", "n_spills", "smem KiB", "compile s", "status",
            "first configuration", "variant"]
    body = []
    for r in report.rows:
        body.append([r.target, r.kernel, _fmt(r.regs), _fmt(r.spill_stores), _fmt(r.n_spills),
                     "-" if r.shared is None else f"{r.shared / KIB:.1f}", _fmt(r.seconds), r.status,
                     r.case + (f" (+{r.cases - 1})" if r.cases > 1 else ""), r.variant])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head] + body)


def summary(report: Report, targets: Sequence[Target]) -> str:
    n_err = sum(r.status == "compile error" for r in report.rows)
    n_over = sum(r.status.startswith("over limit") for r in report.rows)
    n_fell = sum(r.status == "over limit, fell back" for r in report.rows)
    lims = ", ".join(f"{t.name} ({t.gpus}) {t.shared_limit // KIB} KiB" for t in targets)
    worst = {}
    for r in report.rows:
        if r.shared is not None and r.status == "ok":
            w = worst.get(r.target)
            if w is None or r.shared > w.shared:
                worst[r.target] = r
    n_stopped = sum(r.status == "not compiled" for r in report.rows)
    s = [f"triton {report.triton_version}, ptxas {report.ptxas}",
         f"{report.cases} configurations, {len(report.rows)} variants"
         + (f" ({n_stopped} not compiled: stopped)" if n_stopped else "")
         + f", {n_err} compile errors, {n_over} above the shared-memory limit ({lims})"
         + (f" of which {n_fell} fell back to a variant that fits" if n_fell else "") + f", {report.seconds} s"]
    for t, r in worst.items():
        s.append(f"largest shared memory in use on {t}: {r.shared / KIB:.1f} KiB ({r.kernel}, {r.case})")
    max_spill = [r for r in report.rows if r.spill_stores]
    if max_spill:
        r = max(max_spill, key=lambda r: r.spill_stores)
        s.append(f"{len(max_spill)} variants spill; most: {r.spill_stores} B ({r.target} {r.kernel}, {r.case})")
    s.append("RESULT: " + ("ok" if report.ok() else f"FAILED ({len(report.failures)})"))
    s += [f"  {f}" for f in report.failures]
    return "\n".join(s)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the CI subset (quick_cases)")
    ap.add_argument("--targets", default="sm90a,sm80", help=f"comma-separated, of {', '.join(TARGETS)}")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    ap.add_argument("--strict", action="store_true",
                    help="fail on any variant above the shared-memory limit, even where the launcher falls back")
    ap.add_argument("--out", help="write the table (markdown) and the summary to this file")
    ap.add_argument("--json", help="write rows and failures as JSON to this file")
    ap.add_argument("--cache-dir", help="triton cache to use (default: a fresh temporary one, so every "
                                        "variant is really compiled and timed)")
    ap.add_argument("--match", help="only configurations whose label contains this string")
    ap.add_argument("--list", action="store_true",
                    help="count the configurations, launches and distinct variants; compile nothing")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)

    # SIGTERM (timeout's default) and SIGINT stop the check with a report of what compiled; SIGINT
    # is restored in case a caller started this in the background, where it is ignored. Once:
    # timeout signals the process and then its whole group, this process included.
    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    reason = unavailable_reason()
    if reason:
        print(f"triton_compile_check: cannot run: {reason}", file=sys.stderr)
        return 2
    targets = [TARGETS[t.strip()] for t in args.targets.split(",") if t.strip()]
    cases = quick_cases() if args.quick else full_cases()
    if args.match:
        cases = [c for c in cases if args.match in c.label]
    if args.list:
        launches, failed = record_launches(cases, targets)
        for tg in targets:
            mine = [sp for _, t, sp in launches if t is tg]
            kinds: Dict[str, set] = {}
            for sp in mine:
                kinds.setdefault(sp.kernel, set()).add(sp.key())
            print(f"{tg.name}: {len(cases)} configurations, {len(mine)} launches, "
                  f"{sum(len(v) for v in kinds.values())} distinct variants "
                  f"({', '.join(f'{k} {len(v)}' for k, v in sorted(kinds.items()))})")
        for msg in failed.values():
            print(f"  {msg}")
        return 1 if failed else 0
    tmp = None
    if args.cache_dir:
        os.environ["TRITON_CACHE_DIR"] = args.cache_dir
    else:
        tmp = tempfile.TemporaryDirectory(prefix="din_ops_compile_check_")
        os.environ["TRITON_CACHE_DIR"] = tmp.name
    try:
        report = check(cases, targets, jobs=args.jobs, strict=args.strict, verbose=not args.quiet)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(table(report))
    print()
    print(summary(report, targets))
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# Triton compile check ({'quick' if args.quick else 'full'})\n\n")
            f.write("```\n" + summary(report, targets) + "\n```\n\n")
            f.write(table(report, markdown=True) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(ok=report.ok(), failures=report.failures, seconds=report.seconds,
                           triton=report.triton_version, targets=[dataclasses.asdict(t) for t in targets],
                           cases=report.cases, rows=[dataclasses.asdict(r) for r in report.rows]), f, indent=1)
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
