"""The main job: ``python -m din_ops.bench`` checks every provider against the reference, then
times din_ops against eager PyTorch, ``torch.compile`` of it (and, for attention, the careful
plain-PyTorch version) over a sweep of shapes on whatever device is present.

For each op, shape, dtype, provider and mode it prints and records: the median time (and the
20th/80th percentiles), the speedup over ``eager`` and over ``compile``, the peak memory a
training step allocates, the achieved useful GFLOP/s and GB/s and the percent of the machine's
limit (matmul FLOP/s and copy bandwidth, measured in the same run). Outputs in ``--out``
(default ``bench/out``): ``<name>_bench.csv`` (one row per measurement), ``<name>_speedup.png``
(speedup against T per op and mode) and ``<name>_summary.md`` (the tables, markdown).

Before a row is timed, its provider's output (and, for ``fwd+bwd``, every input gradient) is
compared with the reference (din_ops/reference.py, float32; float64 for the small start-up
check). A mismatch is reported loudly and the row is not timed.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import math
import os
import signal
import subprocess
import sys
import time
import traceback
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import din_ops

from . import attention_pooling as _attention
from . import dice as _dice
from . import embedding_attention_pooling as _embedding
from . import mba as _mba
from .common import DTYPE_NAMES, DTYPES, OpBench, Timer, tolerance, use_tf32_on_cuda
from .machine import Machine, calibrate, device_name, keep_freed_memory
from .memory import peak_bytes

BENCHES: Dict[str, OpBench] = {b.name: b for b in (_attention.BENCH, _dice.BENCH, _mba.BENCH, _embedding.BENCH)}

HEADLINE = dict(B=2048, T=100, D=36, hidden=(80, 40))
T_VALUES = (10, 50, 100, 500, 1000)

# The issue's shapes for attention_pooling (D=36, hidden 80x40, sigmoid):
# serving: one user (B=1), a full history of T positions, C candidates scored against it
SERVING_C = (10, 100, 500, 2000)
SERVING_T = (50, 200, 1000)
SERVING_DEFAULT = ((100, 50), (500, 200), (2000, 1000))  # (C, T): the default preset's serving points
# sweep: B x T, lengths uniform in 1..T (all 1 for T=1), inference and fwd+bwd
SWEEP_T = (1, 5, 10, 50, 100, 500, 1000)
SWEEP_B = (1, 32, 256, 2048)
SWEEP_MODES = ("inference", "fwd+bwd")
# targets the summary checks (eager time over din_ops time)
TARGET_SERVING = 3.0
TARGET_SWEEP = 2.0


@dataclasses.dataclass
class Preset:
    """What a run measures. ``shapes`` are (sweep tag, shape) in the order they run (the most
    important first, so a run stopped by ``time_limit`` still has them). A shape may restrict
    its ``dtypes`` (to those of the run that it names; ``--dtypes`` overrides that: every shape in
    each given dtype), ``ops`` and ``modes``. An op's case is run once per dtype (the first shape
    that names it), with that shape's tag and modes."""
    shapes: List[Tuple[str, dict]]
    dtypes: Tuple[str, ...] = ("fp32",)
    gpu_dtypes: Tuple[str, ...] = ("fp32", "bf16")
    skip_providers: Tuple[str, ...] = ()
    budget_s: float = 0.5      # timing: runs per measurement until this much time...
    min_reps: int = 5          # ...but at least this many
    max_reps: int = 50
    calibration_scale: float = 1.0
    time_limit_s: Optional[float] = None
    memory_tags: Optional[Tuple[str, ...]] = None  # sweep tags whose peak memory is measured (None: all)
    doc: str = ""


def _shape(B, T, D=36, hidden=(80, 40), E=1_000_000, dtypes=None, C=None, min_len=None, ops=None,
           modes=None):
    """A sweep point; ``dtypes``, ``ops``, ``modes`` restrict it to some of the run's dtypes, ops
    and modes; ``C``: attention with C candidates per row (query ``[B, C, D]``); ``min_len``:
    lengths uniform in min_len..T (default 1; T: every history full)."""
    s = dict(B=B, T=T, D=D, hidden=tuple(hidden), E=E)
    for k, v in dict(dtypes=dtypes, ops=ops, modes=modes).items():
        if v:
            s[k] = tuple(v)
    if C is not None:
        s["C"] = C
    if min_len is not None:
        s["min_len"] = min_len
    return s


def _serving(C, T, dtypes=("fp32",), **kw):
    """A serving point: one user (B=1) with a full history of T, C candidates, inference only."""
    return ("serving", _shape(1, T, C=C, min_len=T, ops=("attention_pooling",), modes=("inference",),
                              dtypes=dtypes, **kw))


def _sweep(B, T, dtypes=("fp32",), **kw):
    return ("sweep", _shape(B, T, ops=("attention_pooling",), modes=SWEEP_MODES, dtypes=dtypes, **kw))


# The MBA update at the size of a production step: a 1M x 64 table, 200k lookups per batch,
# uniform ids and Zipf(1.05) ids (a few hot items occur thousands of times).
MBA_STEP = [(f"mba-{dist}", dict(B=2048, T=100, D=64, hidden=(80, 40), E=1_000_000, M=200_000, dist=dist,
                                 ops=("mba_update",), dtypes=("fp32",))) for dist in ("uniform", "zipf")]

# the headline shape: every op in fp32, attention also in bf16 (on CPU too: AVX-512/AMX bf16)
HEADLINE_SHAPES = [("headline", _shape(**HEADLINE, dtypes=("fp32",))),
                   ("headline", _shape(**HEADLINE, dtypes=("bf16",), ops=("attention_pooling",)))]

# the default preset's reduced sweep, (B, T): T=1000 at B=256 only (B=2048 x T=1000 alone takes a
# minute or more on 2 cores: eager's fwd+bwd is seconds a step); the sweep preset has every point
DEFAULT_SWEEP = ((2048, 10), (2048, 500), (256, 10), (256, 100), (256, 1000))

# embedding_attention_pooling against the lookups + attention_pooling pair: the issue's shape
# (B=2048, T=1000 full, two fields of 18), the headline, and a small batch
EMBEDDING_SHAPES = [("embedding", _shape(2048, 1000, min_len=1000, ops=("embedding_attention_pooling",),
                                         modes=SWEEP_MODES, dtypes=("fp32",))),
                    ("embedding", dict(_shape(2048, 1000, min_len=1000, ops=("embedding_attention_pooling",),
                                              modes=SWEEP_MODES, dtypes=("fp32",)), dist="uniform")),
                    ("embedding", _shape(2048, 100, ops=("embedding_attention_pooling",), modes=SWEEP_MODES,
                                         dtypes=("fp32",))),
                    ("embedding", _shape(256, 50, ops=("embedding_attention_pooling",), modes=SWEEP_MODES,
                                         dtypes=("fp32",)))]

PRESETS: Dict[str, Preset] = {
    "tiny": Preset(
        shapes=[("T", _shape(32, 10, 8, (16, 8), E=5000, dtypes=("fp32",))),
                ("T", _shape(32, 50, 8, (16, 8), E=5000, dtypes=("fp32",))),
                ("serving", _shape(1, 20, 8, (16, 8), C=5, min_len=20, ops=("attention_pooling",),
                                   modes=("inference",), dtypes=("fp32",))),
                ("sweep", _shape(32, 10, 8, (16, 8), ops=("attention_pooling",), modes=SWEEP_MODES,
                                 dtypes=("bf16",)))],
        dtypes=("fp32", "bf16"),
        skip_providers=("compile",), budget_s=0.02, min_reps=3, max_reps=10, calibration_scale=1 / 32,
        doc="seconds; no torch.compile (its first compilation alone takes 10+ s on a CPU): the CI smoke "
            "run (two T values for every op, one serving point with C=5 candidates, attention in bf16)"),
    "quick": Preset(
        shapes=HEADLINE_SHAPES + MBA_STEP,
        dtypes=("fp32", "bf16"),
        doc="the headline shape only (B=2048, T=100, D=36, hidden 80x40; attention in fp32 and bf16)"),
    "default": Preset(
        shapes=HEADLINE_SHAPES + MBA_STEP
        + [_serving(C, T) for C, T in SERVING_DEFAULT]
        + [_sweep(B, T) for B, T in DEFAULT_SWEEP],
        dtypes=("fp32", "bf16"),
        budget_s=0.3, min_reps=3, max_reps=30, memory_tags=("headline",),
        doc="the headline shape (B=2048, T=100; every op fp32, attention also bf16), serving points "
            "(B=1, C x T = 100x50, 500x200, 2000x1000, inference, fp32) and a reduced attention T sweep "
            "(B=2048: T=10, 100, 500; B=256: T=10, 100, 1000; inference and fwd+bwd, fp32); peak memory "
            "at the headline shape only; about 4 minutes on 2 idle CPU cores"),
    "serving": Preset(
        shapes=[_serving(C, T) for T in SERVING_T for C in SERVING_C],
        budget_s=0.3, min_reps=3, max_reps=30,
        doc=f"attention serving: one user (B=1) with a full history of T in {SERVING_T}, C in {SERVING_C} "
            "candidates (din_ops: query [1, C, D]; eager, compile, careful: the history expanded to C "
            "rows), inference only, fp32"),
    "sweep": Preset(
        shapes=[_sweep(B, T) for B in reversed(SWEEP_B) for T in SWEEP_T]
        + [_sweep(2048, T, dtypes=("bf16",)) for T in SWEEP_T],
        dtypes=("fp32", "bf16"),
        budget_s=0.2, min_reps=3, max_reps=30, memory_tags=(),
        doc=f"attention B x T sweep: T in {SWEEP_T} (lengths uniform in 1..T), B in {SWEEP_B}, inference "
            "and fwd+bwd, fp32, and bf16 at B=2048; every point kept, B=2048 x T=1000 included (eager "
            "fwd+bwd: seconds per step, GBs), so a measurement is 3 runs at least, 0.2 s otherwise; no "
            "peak memory"),
    "embedding": Preset(
        shapes=EMBEDDING_SHAPES, budget_s=0.3, min_reps=3, max_reps=30, memory_tags=("embedding",),
        doc="embedding_attention_pooling (ids in) against nn.Embedding(sparse=True) lookups + "
            "attention_pooling and eager: B=2048 x T=1000 (full histories; Zipf ids, and uniform ids, the "
            "worst case), B=2048 x T=100, B=256 x T=50, two fields of 18, E=1M, inference and fwd+bwd with "
            "peak memory, fp32"),
    "full": Preset(
        shapes=HEADLINE_SHAPES + MBA_STEP + EMBEDDING_SHAPES
        + [_serving(C, T) for T in SERVING_T for C in SERVING_C]
        + [_sweep(B, T) for B in reversed(SWEEP_B) for T in SWEEP_T]
        + [_sweep(2048, T, dtypes=("bf16",)) for T in SWEEP_T]
        # T <= 500: at T=1000 Dice's eager providers (x is 655 MB) outgrow 24 GiB with the runner's
        # kept-memory allocator
        + [("sweep", _shape(2048, T, ops=("dice", "mba_update"), dtypes=("fp32",))) for T in T_VALUES if T <= 500]
        + [("D", _shape(2048, 100, D, ops=("attention_pooling",), dtypes=("fp32",))) for D in (16, 64, 128)]
        + [("H", _shape(2048, 100, 36, H, ops=("attention_pooling",), dtypes=("fp32",)))
           for H in ((64, 16), (200, 80, 40))],
        dtypes=("fp32", "bf16"),
        budget_s=0.5, min_reps=3, max_reps=50, memory_tags=("headline", "sweep"),
        doc="everything, for the committed results: the headline (fp32 and bf16), the MBA step, all "
            "serving points, the full B x T sweep (fp32; bf16 at B=2048), Dice and MBA over T <= 500 "
            "at B=2048, and embedding width and hidden-size variations at the headline; peak memory "
            "of fwd+bwd at the headline and the sweep"),
    "gpu": Preset(
        shapes=[("T", _shape(2048, 100)), ("T", _shape(2048, 1000))]
        + [("T", _shape(2048, T, dtypes=("fp32",))) for T in (10, 500, 50)]
        + [("T", _shape(2048, T, dtypes=("bf16",))) for T in (10, 500, 50)],
        budget_s=0.2, min_reps=10, max_reps=200, time_limit_s=170,
        doc="for one H200: T sweep at B=2048, fp32 and bf16, the headline and T=1000 first; starts no "
            "new shape after 170 s (torch.compile warm-ups included) and writes what it has"),
}

CSV_COLUMNS = [
    "op", "provider", "mode", "dtype", "shape", "sweep", "B", "T", "D", "H", "C", "E", "M", "U",
    "median_ms", "p20_ms", "p80_ms", "reps", "speedup_vs_eager", "speedup_vs_compile",
    "peak_mem_bytes", "gflops", "gbps", "pct_peak_flops", "pct_peak_bw", "pct_limit", "limit",
    "check_err", "check_tol", "status", "device", "device_name", "threads", "peak_flops",
    "peak_bw", "allocator", "torch_version", "din_ops_version", "git_rev",
]


# --- small helpers ------------------------------------------------------------------------------
def _git_rev() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if not rev:
            return ""
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except Exception:
        return ""


def _fmt(x, spec: str, empty: str = "-") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return empty
    return format(x, spec)


def _load_gpu_kernels(device) -> None:
    """CUDA tensors run din_ops' Triton kernels, registered when din_ops.triton is imported."""
    if torch.device(device).type != "cuda":
        return
    try:
        din_ops._library._load_triton()
    except Exception as e:  # the din_ops rows then report the failure
        print(f"warning: could not load din_ops' Triton kernels: {e}", file=sys.stderr)


# --- the run ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    op: str
    provider: str
    mode: str
    dtype: str
    shape: dict
    shape_str: str
    sweep: str
    status: str = "ok"
    timing: Optional[dict] = None
    err: Optional[float] = None
    tol: Optional[float] = None
    mem: Optional[int] = None
    flops: float = 0.0
    bytes: float = 0.0
    speedup_eager: Optional[float] = None
    speedup_compile: Optional[float] = None

    @property
    def ms(self) -> Optional[float]:
        return self.timing["median"] if self.timing else None


class Runner:
    def __init__(self, device, preset: Preset, ops: Sequence[str], providers: Optional[Sequence[str]],
                 dtypes: Sequence[str], memory: bool, out: str, name: str, log=print,
                 allocator: str = "allocator default", dtypes_given: bool = False):
        self.device = torch.device(device)
        self.preset = preset
        self.ops = list(ops)
        self.providers = providers
        self.dtypes = list(dtypes)
        self.dtypes_given = dtypes_given  # --dtypes: every shape in these (the shapes' own lists ignored)
        self.memory = memory
        self.out = out
        self.name = name
        self.log = log
        self.rows: List[Row] = []
        self.failures = 0
        self.machine: Optional[Machine] = None
        self.timer = Timer(self.device, budget_s=preset.budget_s, min_reps=preset.min_reps,
                           max_reps=preset.max_reps)
        self.versions = dict(allocator=allocator, torch_version=torch.__version__,
                             din_ops_version=din_ops.__version__, git_rev=_git_rev())

    def provider_names(self, bench: OpBench) -> List[str]:
        """``--providers`` if given (it overrides the preset's skip list), else the preset's."""
        if self.providers:
            return [p for p in bench.providers if p in self.providers]
        return [p for p in bench.providers if p not in self.preset.skip_providers]

    # start-up check: small odd shapes, float64 on CPU (float32 on CUDA), both normalizations
    def self_check(self) -> Dict[Tuple[str, str], str]:
        """Returns {(op, provider): reason} for providers that must not be timed."""
        bad: Dict[Tuple[str, str], str] = {}
        dtype = torch.float64 if self.device.type == "cpu" else torch.float32
        shapes = {
            "attention_pooling": [dict(B=37, T=23, D=7, hidden=(9, 5), normalization=n)
                                  for n in ("none", "softmax")],
            "dice": [dict(B=37, T=23, D=7, hidden=(11,))],
            "mba_update": [dict(B=37, T=23, D=7, E=300)],
            "embedding_attention_pooling": [dict(B=37, T=23, D=7, hidden=(9, 5), E=300)],
        }
        self.log(f"self-check against din_ops/reference.py ({DTYPE_NAMES[dtype]}, tolerance "
                 f"{tolerance(dtype, self.device):.0e} relative):")
        for op in self.ops:
            bench = BENCHES[op]
            for provider in self.provider_names(bench):
                if provider == "compile":
                    continue  # checked on every timed row (its compilation is the warm-up there)
                why = bench.available(provider, self.device)
                if why:
                    bad[(op, provider)] = why
                    self.log(f"  {op:18s} {provider:12s} UNAVAILABLE: {why}")
                    continue
                worst, failure = 0.0, None
                for shape in shapes[op]:
                    case = bench.make_case(shape, dtype, self.device, seed=1)
                    for mode in bench.modes:
                        try:
                            err, tol = bench.check(provider, case, mode)
                        except Exception as e:
                            failure = f"{mode}: {type(e).__name__}: {e}"
                            break
                        worst = max(worst, err)
                        if not err <= tol:
                            failure = f"{mode} {shape.get('normalization', '')}: relative error {err:.1e} > {tol:.0e}"
                    if failure:
                        break
                if failure:
                    bad[(op, provider)] = "self-check failed: " + failure
                    self.log(f"  {op:18s} {provider:12s} *** MISMATCH *** {failure}")
                else:
                    self.log(f"  {op:18s} {provider:12s} ok (max relative error {worst:.1e})")
        return bad

    @staticmethod
    def modes_of(bench: OpBench, shape: dict) -> List[str]:
        """The op's modes a shape measures (its ``modes``, default all)."""
        return [m for m in bench.modes if m in shape.get("modes", bench.modes)]

    def cases(self):
        """(op, dtype, tag, shape) in run order, each op's identical cases once."""
        dtypes = self.dtypes
        seen = set()
        for tag, shape in self.preset.shapes:
            allowed = dtypes if self.dtypes_given else shape.get("dtypes", dtypes)
            for dt in [d for d in dtypes if d in allowed]:
                for op in self.ops:
                    if op not in shape.get("ops", (op,)) or not self.modes_of(BENCHES[op], shape):
                        continue
                    bench = BENCHES[op]
                    key = (op, dt, bench.case_key(shape))
                    if key in seen:
                        continue
                    seen.add(key)
                    yield op, dt, tag, shape

    def run(self) -> int:
        t_start = time.perf_counter()
        dev_name = device_name(self.device)
        self.log(f"din_ops {din_ops.__version__} benchmark on {self.device} ({dev_name}), torch "
                 f"{torch.__version__}, {torch.get_num_threads()} CPU threads")
        bad = self.self_check()
        self.log("calibrating the machine's limits ...")
        self.machine = calibrate(self.device, self.preset.calibration_scale)
        self.log("  " + self.machine.summary())

        cases = list(self.cases())
        total = sum(len(self.provider_names(BENCHES[op])) * len(self.modes_of(BENCHES[op], shape))
                    for op, _, _, shape in cases)
        from tqdm import tqdm

        bar = tqdm(total=total, desc="benchmark", unit="row", file=sys.stderr, dynamic_ncols=True,
                   mininterval=0.5)
        log = self.log
        self.log = lambda s="": bar.write(str(s), file=sys.stdout)
        skipped, stopped = 0, None
        csv_path = os.path.join(self.out, f"{self.name}_bench.csv")
        os.makedirs(self.out, exist_ok=True)
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            for op, dt, tag, shape in cases:
                bench = BENCHES[op]
                n_rows = len(self.provider_names(bench)) * len(self.modes_of(bench, shape))
                limit = self.preset.time_limit_s
                if stopped or (limit is not None and time.perf_counter() - t_start > limit):
                    stopped = stopped or f"time limit ({limit:.0f} s) reached"
                    skipped += n_rows
                    bar.update(n_rows)
                    continue
                t_case = time.perf_counter()
                try:
                    rows = self.run_case(bench, DTYPES[dt], tag, shape, bad, bar)
                except KeyboardInterrupt:  # also SIGTERM (a `timeout`): keep what was measured
                    stopped = "interrupted"
                    skipped += n_rows
                    continue
                except Exception as e:  # e.g. out of memory building the case: report, go on
                    self.log(f"*** {op} {shape} {dt}: {type(e).__name__}: {e}")
                    self.failures += 1
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                self.rows += rows
                for r in rows:
                    writer.writerow(self.csv_row(r))
                f.flush()
                self.log(self.case_table(rows, time.perf_counter() - t_case))
        bar.close()
        self.log = log
        if skipped:
            self.log(f"*** {stopped}: {skipped} rows not run")
        self.log(self.headline())
        tables = self.targets()
        if tables:
            self.log("\n" + "\n".join(tables))
        md_path = os.path.join(self.out, f"{self.name}_summary.md")
        with open(md_path, "w") as f:
            f.write(self.markdown())
        png_path = os.path.join(self.out, f"{self.name}_speedup.png")
        try:
            plot(csv_path, png_path)
        except Exception as e:
            self.log(f"*** could not draw the plot: {type(e).__name__}: {e}")
            png_path = None
        self.log(f"wrote {csv_path}" + (f", {png_path}" if png_path else "") + f", {md_path} "
                 f"({time.perf_counter() - t_start:.0f} s)")
        n_bad = sum(r.status.startswith(("MISMATCH", "error")) for r in self.rows)
        n_bad += sum(why.startswith("self-check failed") for why in bad.values()) + self.failures
        if n_bad:
            self.log(f"*** {n_bad} mismatches or errors: those rows were not timed (see the status column)")
        if stopped == "interrupted":
            return 130
        return 1 if n_bad else 0

    def run_case(self, bench: OpBench, dtype, tag, shape, bad, bar) -> List[Row]:
        dt = DTYPE_NAMES[dtype]
        case = bench.make_case(shape, dtype, self.device)
        sd, ss = bench.shape_dict(case), bench.shape_str(case)
        bar.set_description(f"{bench.name} {ss} {dt}")
        rows = []
        for provider in self.provider_names(bench):
            why = bad.get((bench.name, provider)) or bench.available(provider, self.device)
            for mode in self.modes_of(bench, shape):
                row = Row(bench.name, provider, mode, dt, sd, ss, tag,
                          flops=bench.flops(case, mode), bytes=bench.bytes_moved(case, mode))
                rows.append(row)
                if why:
                    row.status = "skipped: " + why
                    bar.update(1)
                    continue
                try:
                    row.err, row.tol = bench.check(provider, case, mode)
                except Exception as e:
                    row.status = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                    self.log(f"*** {bench.name} {ss} {dt} {provider} {mode}: {row.status}")
                    if os.environ.get("DIN_OPS_BENCH_DEBUG"):
                        traceback.print_exc()
                    bar.update(1)
                    continue
                if not row.err <= row.tol:
                    row.status = f"MISMATCH: relative error {row.err:.2e} > {row.tol:.0e}"
                    self.log(f"*** {bench.name} {ss} {dt} {provider} {mode}: {row.status}: NOT TIMED")
                    bar.update(1)
                    continue
                try:
                    step = bench.step(provider, case, mode)
                    row.timing = self.timer(step)
                    tags = self.preset.memory_tags
                    if self.memory and mode in bench.train_modes and (tags is None or tag in tags):
                        row.mem = peak_bytes(step, self.device)
                    del step
                except Exception as e:
                    row.status = f"error: {type(e).__name__}: {e}"[:300]
                    row.timing = None
                    self.log(f"*** {bench.name} {ss} {dt} {provider} {mode}: {row.status}")
                bar.update(1)
        del case
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        # speedups within the case
        by = {(r.provider, r.mode): r for r in rows}
        for r in rows:
            if r.ms is None:
                continue
            for base, attr in (("eager", "speedup_eager"), ("compile", "speedup_compile")):
                b = by.get((base, r.mode))
                if b is not None and b.ms is not None:
                    setattr(r, attr, b.ms / r.ms)
        return rows

    # --- reporting ------------------------------------------------------------------------------
    def derived(self, r: Row) -> dict:
        if r.ms is None:
            return {}
        gflops = r.flops / (r.ms * 1e-3) / 1e9
        gbps = r.bytes / (r.ms * 1e-3) / 1e9
        pf = 100 * gflops * 1e9 / self.machine.peak_flops(r.dtype)
        pb = 100 * gbps * 1e9 / self.machine.bandwidth
        return dict(gflops=gflops, gbps=gbps, pct_peak_flops=pf, pct_peak_bw=pb,
                    pct_limit=max(pf, pb), limit="flops" if pf >= pb else "bandwidth")

    def csv_row(self, r: Row) -> dict:
        d = dict(op=r.op, provider=r.provider, mode=r.mode, dtype=r.dtype, shape=r.shape_str, sweep=r.sweep,
                 status=r.status, check_err=r.err, check_tol=r.tol, peak_mem_bytes=r.mem,
                 speedup_vs_eager=r.speedup_eager, speedup_vs_compile=r.speedup_compile,
                 device=self.device.type, device_name=self.machine.name, threads=self.machine.threads,
                 peak_flops=self.machine.peak_flops(r.dtype), peak_bw=self.machine.bandwidth, **self.versions)
        for k in ("B", "T", "D", "H", "C", "E", "M", "U"):
            d[k] = r.shape.get(k)
        if r.timing:
            d.update(median_ms=r.timing["median"], p20_ms=r.timing["p20"], p80_ms=r.timing["p80"],
                     reps=r.timing["reps"])
        d.update(self.derived(r))
        return {k: ("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)) for k, v in d.items()}

    def table_lines(self, rows: List[Row], md: bool = False) -> List[str]:
        head = ["provider", "mode", "ms", "p20-p80", "vs eager", "vs compile", "peak MiB", "GFLOP/s",
                "GB/s", "% limit"]
        body = []
        for r in rows:
            d = self.derived(r)
            if r.ms is None:
                body.append([r.provider, r.mode, r.status if md else r.status[:60]] + [""] * 7)
                continue
            lim = f"{d['pct_limit']:.0f}% {'FLOP' if d['limit'] == 'flops' else 'BW'}"
            body.append([
                r.provider, r.mode, f"{r.ms:.3f}", f"{r.timing['p20']:.3f}-{r.timing['p80']:.3f}",
                _fmt(r.speedup_eager, ".2f") + ("x" if r.speedup_eager else ""),
                _fmt(r.speedup_compile, ".2f") + ("x" if r.speedup_compile else ""),
                _fmt(r.mem / 2 ** 20 if r.mem is not None else None, ".1f"),
                f"{d['gflops']:.1f}", f"{d['gbps']:.1f}", lim])
        if md:
            out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            out += ["| " + " | ".join(b) + " |" for b in body]
            return out
        timed = [b for b in body if b[3]]
        widths = [max([len(h)] + [len(b[i]) for b in timed]) for i, h in enumerate(head)]
        fmt_row = lambda cells: "  ".join(  # noqa: E731
            (c.ljust(w) if i < 2 else c.rjust(w)) for i, (c, w) in enumerate(zip(cells, widths)))
        lines = [fmt_row(head)]
        for b in body:
            if b[3] == "" and b[2]:  # a status line
                lines.append(f"{b[0].ljust(widths[0])}  {b[1].ljust(widths[1])}  {b[2]}")
            else:
                lines.append(fmt_row(b))
        return lines

    def case_table(self, rows: List[Row], seconds: float) -> str:
        r0 = rows[0]
        title = f"\n{r0.op}  {r0.shape_str}  {r0.dtype}  [{r0.sweep}, {seconds:.0f} s]"
        return "\n".join([title] + self.table_lines(rows))

    def _find(self, op, provider, mode, dtype="fp32", **shape) -> Optional[Row]:
        for r in self.rows:
            if (r.op, r.provider, r.mode, r.dtype) == (op, provider, mode, dtype) and r.ms is not None \
                    and all(r.shape.get(k) == v for k, v in shape.items()):
                return r
        return None

    def headline(self) -> str:
        """The numbers the README quotes: attention at B=2048, T=100, D=36, hidden (80, 40), Dice and
        MBA at the same batch."""
        lines = ["", "=== headline (B=2048, T=100, D=36, hidden 80x40; fp32 unless marked bf16) ==="]
        hs = dict(B=2048, T=100)
        att = dict(D=36, H="80x40", C=None, **hs)
        found = False
        for mode in ("inference", "fwd", "fwd+bwd"):
            d = self._find("attention_pooling", "din_ops", mode, **att)
            if d is None:
                continue
            found = True
            parts = [f"attention {mode:9s}: din_ops {d.ms:8.3f} ms"]
            for base in ("eager", "compile", "careful"):
                b = self._find("attention_pooling", base, mode, **att)
                if b is not None:
                    parts.append(f"{b.ms / d.ms:5.1f}x vs {base}")
            lim = self.derived(d)
            parts.append(f"{lim['pct_limit']:.0f}% of the {lim['limit']} limit")
            if d.mem is not None:
                e = self._find("attention_pooling", "eager", mode, **att)
                if e is not None and e.mem:
                    parts.append(f"peak memory {d.mem / 2 ** 20:.1f} MiB = {d.mem / e.mem:.3f} of eager's")
            lines.append(", ".join(parts))
        for mode in ("inference", "fwd", "fwd+bwd"):
            d = self._find("attention_pooling", "din_ops", mode, "bf16", **att)
            if d is None:
                continue
            found = True
            parts = [f"attention bf16 {mode:9s}: din_ops {d.ms:8.3f} ms"]
            for base in ("eager", "compile", "careful"):
                b = self._find("attention_pooling", base, mode, "bf16", **att)
                if b is not None:
                    parts.append(f"{b.ms / d.ms:5.1f}x vs {base} bf16")
            f = self._find("attention_pooling", "din_ops", mode, "fp32", **att)
            if f is not None:
                parts.append(f"{f.ms / d.ms:4.2f}x vs din_ops fp32 ({f.ms:.3f} ms)")
            e = self._find("attention_pooling", "eager", mode, "fp32", **att)
            if e is not None:
                parts.append(f"{e.ms / d.ms:5.1f}x vs eager fp32")
            lines.append(", ".join(parts))
        for op, shape in (("dice", dict(C=80, **hs)), ("mba_update", dict(D=36, **hs))):
            for mode in BENCHES[op].modes:
                d = self._find(op, "din_ops", mode, **shape)
                if d is None:
                    continue
                found = True
                parts = [f"{op} {mode}: din_ops {d.ms:8.3f} ms"]
                for base in ("eager", "eager_masked", "eager_sparse", "compile"):
                    b = self._find(op, base, mode, **shape)
                    if b is not None:
                        parts.append(f"{b.ms / d.ms:5.1f}x vs {base}")
                lim = self.derived(d)
                parts.append(f"{lim['pct_limit']:.0f}% of the {lim['limit']} limit")
                lines.append(", ".join(parts))
        for tag, _ in MBA_STEP:
            for mode in BENCHES["mba_update"].modes:
                rows = {r.provider: r for r in self.rows
                        if r.op == "mba_update" and r.sweep == tag and r.mode == mode and r.ms is not None}
                d = rows.get("din_ops")
                if d is None:
                    continue
                found = True
                parts = [f"mba_update {mode} ({d.shape_str}): din_ops {d.ms:8.3f} ms"]
                for base in ("eager", "eager_sparse", "compile"):
                    if base in rows:
                        parts.append(f"{rows[base].ms / d.ms:5.1f}x vs {base}")
                lim = self.derived(d)
                parts.append(f"{lim['pct_limit']:.0f}% of the {lim['limit']} limit")
                lines.append(", ".join(parts))
        return "\n".join(lines) if found else ""

    # --- the issue's targets: serving, sweep and bf16 ratios --------------------------------------
    def _att(self, provider, mode, dtype, **shape) -> Optional[Row]:
        return self._find("attention_pooling", provider, mode, dtype, **shape)

    def _ratio_cells(self, d: Row, mode: str, dtype: str, bases=("eager", "compile", "careful"), **shape):
        out = []
        for base in bases:
            b = self._att(base, mode, dtype, **shape)
            out.append(b.ms / d.ms if b is not None else None)
        return out

    def targets(self) -> List[str]:
        """Markdown tables of attention's serving, sweep and bf16 ratios (a provider's median time over
        din_ops'), with the issue's targets: serving >= 3x eager, sweep >= 2x eager (inference and
        fwd+bwd), bf16 against din_ops fp32 and eager bf16. Empty where the run has no such rows."""
        att = [r for r in self.rows if r.op == "attention_pooling" and r.ms is not None]
        out: List[str] = []
        x = lambda v: _fmt(v, ".2f") + ("x" if v is not None else "")  # noqa: E731

        serving = sorted({(r.shape["T"], r.shape["C"], r.shape["B"], r.dtype) for r in att
                          if r.shape.get("C") is not None and r.provider == "din_ops" and r.mode == "inference"})
        if serving:
            out += [f"## serving: C candidates against one user's full history of T (inference); target "
                    f"eager/din_ops >= {TARGET_SERVING:g}x", "",
                    "| B | C | T | dtype | din_ops ms | eager/din_ops | compile/din_ops | careful/din_ops | target |",
                    "|---:|---:|---:|---|---:|---:|---:|---:|---|"]
            for T, C, B, dt in serving:
                sh = dict(B=B, C=C, T=T)
                d = self._att("din_ops", "inference", dt, **sh)
                cells = self._ratio_cells(d, "inference", dt, **sh)
                ok = "" if cells[0] is None else ("met" if cells[0] >= TARGET_SERVING else "**missed**")
                out.append(f"| {B} | {C} | {T} | {dt} | {d.ms:.3f} | " + " | ".join(x(c) for c in cells) + f" | {ok} |")
            out.append("")

        sweep_tags = ("sweep", "headline", "T")
        sweep = [r for r in att if r.shape.get("C") is None and r.sweep in sweep_tags and r.mode in SWEEP_MODES
                 and r.provider == "din_ops"]
        for dt in [d for d in DTYPES if any(r.dtype == d for r in sweep)]:
            for mode in SWEEP_MODES:
                pts: Dict[Tuple[int, int], Row] = {}
                for r in sweep:
                    if r.dtype == dt and r.mode == mode:
                        pts.setdefault((r.shape["B"], r.shape["T"]), r)
                if not pts:
                    continue
                Bs = sorted({b for b, _ in pts})
                Ts = sorted({t for _, t in pts})
                out += [f"## sweep: attention {mode} {dt}; eager / compile / careful time over din_ops'; "
                        f"target eager/din_ops >= {TARGET_SWEEP:g}x", "",
                        "| T \\ B | " + " | ".join(str(b) for b in Bs) + " |", "|---:|" + "---:|" * len(Bs)]
                missed = []
                for T in Ts:
                    cells = []
                    for B in Bs:
                        d = pts.get((B, T))
                        if d is None:
                            cells.append("")
                            continue
                        e, c, k = self._ratio_cells(d, mode, dt, B=B, T=T, C=None, D=d.shape["D"], H=d.shape["H"])
                        first = _fmt(e, ".1f")
                        if e is not None and e < TARGET_SWEEP:
                            first = f"**{first}**"
                            missed.append(f"B={B} T={T}")
                        cells.append(f"{first} / {_fmt(c, '.1f')} / {_fmt(k, '.1f')}")
                    out.append(f"| {T} | " + " | ".join(cells) + " |")
                out += ["", f"below the target (bold): {', '.join(missed) if missed else 'none'}", ""]

        bf = [r for r in att if r.dtype == "bf16" and r.provider == "din_ops"]
        if bf:
            out += ["## bf16: din_ops bf16 against din_ops fp32 and against the other providers in bf16 "
                    "(and eager fp32)", "",
                    "| shape | mode | din_ops bf16 ms | din_ops fp32/bf16 | eager bf16/din_ops | "
                    "compile bf16/din_ops | careful bf16/din_ops | eager fp32/din_ops bf16 |",
                    "|---|---|---:|---:|---:|---:|---:|---:|"]
            for r in bf:
                sh = {k: r.shape.get(k) for k in ("B", "T", "D", "H", "C")}
                f32 = self._ratio_cells(r, r.mode, "fp32", bases=("din_ops", "eager"), **sh)
                b16 = self._ratio_cells(r, r.mode, "bf16", **sh)
                out.append(f"| {r.shape_str} | {r.mode} | {r.ms:.3f} | {x(f32[0])} | "
                           + " | ".join(x(c) for c in b16) + f" | {x(f32[1])} |")
            out.append("")
        return out

    def markdown(self) -> str:
        m = self.machine
        out = [f"# din_ops benchmark: {m.name}", "",
               f"- device: {self.device.type}, {m.name}, {m.threads} {'threads' if m.device == 'cpu' else 'SMs'}",
               f"- torch {self.versions['torch_version']}, din_ops {self.versions['din_ops_version']} "
               f"({self.versions['git_rev'] or 'no git'}), {datetime.date.today().isoformat()}",
               "- limits measured in the run: " + m.summary(),
               f"- CPU allocator: {self.versions['allocator']}; load average at the end "
               f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}" if m.device == "cpu" else "",
               f"- attention's bf16 products on this CPU: {_lowp_unit()}" if m.device == "cpu" else "", ""]
        head = self.headline()
        if head:
            out += ["```", head.strip(), "```", ""]
        out += self.targets()
        groups: Dict[tuple, List[Row]] = {}
        for r in self.rows:
            groups.setdefault((r.op, r.shape_str, r.dtype), []).append(r)
        for (op, ss, dt), rows in groups.items():
            out += [f"## {op} {ss} {dt}", ""] + self.table_lines(rows, md=True) + [""]
        return "\n".join(out)


# --- plot -----------------------------------------------------------------------------------------
_B_COLORS = ("tab:purple", "tab:green", "tab:orange", "tab:blue", "tab:red", "tab:brown", "tab:gray")
_DT_STYLES = {"fp32": "-", "bf16": "--", "fp16": ":", "fp64": "-."}
_PROV_COLORS = {"compile": "tab:orange", "careful": "tab:green", "din_ops": "tab:blue", "eager_sparse": "tab:gray",
                "eager_masked": "tab:purple"}


def _log_axes(ax, xs, xlabel, title):
    from matplotlib import ticker

    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    xs = sorted(set(xs))
    ax.xaxis.set_major_locator(ticker.FixedLocator(xs))
    ax.xaxis.set_major_formatter(ticker.FixedFormatter([str(v) for v in xs]))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}x"))
    ax.yaxis.set_minor_locator(ticker.NullLocator())
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.grid(True, which="both", alpha=0.3)


def _ratio(rows: List[dict], r: dict, base: str) -> Optional[float]:
    """``base``'s median time over ``r``'s at the same op, shape, mode and dtype (None if absent)."""
    for b in rows:
        if (b["op"], b["shape"], b["mode"], b["dtype"], b["provider"]) == (r["op"], r["shape"], r["mode"],
                                                                          r["dtype"], base) and b["median_ms"]:
            return float(b["median_ms"]) / float(r["median_ms"])
    return None


def plot(csv_path: str, png_path: str) -> None:
    """The speedups of a run, from its CSV:

    - attention sweep: din_ops' speedup over eager against T, a line per B (fp32 solid, bf16
      dashed: over eager bf16), a panel per mode;
    - bf16 at the headline shape: din_ops bf16 over eager, compile, careful bf16 and din_ops fp32;
    - serving: din_ops' speedup over eager, compile and careful against C, a line per T;
    - the other ops' T sweep (Dice, MBA), a line per provider, dtype and B.

    Rows missing from the CSV leave their panels out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        rows = [r for r in csv.DictReader(f) if r["median_ms"]]
    att = [r for r in rows if r["op"] == "attention_pooling"]
    sweep_tags = ("sweep", "headline", "T")
    sweep = [r for r in att if not r["C"] and r["sweep"] in sweep_tags and r["provider"] == "din_ops"
             and r["mode"] in SWEEP_MODES]
    # a headline-only run (one point per B) has no sweep to draw
    if len({r["T"] for r in sweep}) < 2:
        sweep = []
    serving = [r for r in att if r["C"] and r["provider"] == "din_ops"]
    bf16 = [r for r in att if r["dtype"] == "bf16" and r["provider"] == "din_ops" and r["sweep"] == "headline"]
    others = [r for r in rows if r["op"] != "attention_pooling" and r["sweep"] in ("sweep", "T")
              and r["speedup_vs_eager"] and r["provider"] != "eager"]
    other_ops = [op for op in BENCHES if any(r["op"] == op for r in others)]
    # tiny/legacy CSVs: attention's T sweep without B variety still draws in the sweep panels

    panels: List[List[Tuple[str, object]]] = []
    if sweep or bf16:
        row = [("sweep", m) for m in SWEEP_MODES if any(r["mode"] == m for r in sweep)]
        if bf16:
            row.append(("bf16", None))
        panels.append(row)
    if serving:
        panels.append([("serving", b) for b in ("eager", "compile", "careful")
                       if any(_ratio(att, r, b) for r in serving)])
    for op in other_ops:
        panels.append([("other", (op, m)) for m in BENCHES[op].modes if any(
            r["op"] == op and r["mode"] == m for r in others)])
    panels = [p for p in panels if p]
    if not panels:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.text(0.5, 0.5, "no timed rows to plot", ha="center", va="center")
        fig.savefig(png_path, dpi=100)
        plt.close(fig)
        return
    ncols = max(len(p) for p in panels)
    fig, axes = plt.subplots(len(panels), ncols, figsize=(4.4 * ncols, 3.5 * len(panels)), squeeze=False)
    for i, prow in enumerate(panels):
        for j in range(ncols):
            ax = axes[i][j]
            if j >= len(prow):
                ax.axis("off")
                continue
            kind, arg = prow[j]
            if kind == "sweep":
                _plot_sweep(ax, att, sweep, arg)
            elif kind == "bf16":
                _plot_bf16(ax, att, bf16)
            elif kind == "serving":
                _plot_serving(ax, att, serving, arg)
            else:
                _plot_other(ax, others, *arg)
    dev = rows[0]["device_name"]
    fig.suptitle(f"din_ops vs PyTorch on {dev} ({rows[0]['threads']} threads): speedup = provider's median "
                 "time / din_ops'", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def _plot_sweep(ax, att, sweep, mode):
    sel = [r for r in sweep if r["mode"] == mode]
    Bs = sorted({int(r["B"]) for r in sel})
    for k, B in enumerate(Bs):
        for dt in [d for d in DTYPES if any(r["dtype"] == d for r in sel)]:
            pts = {}
            for r in sel:
                if int(r["B"]) == B and r["dtype"] == dt:
                    v = _ratio(att, r, "eager")
                    if v:
                        pts.setdefault(int(r["T"]), v)
            if pts:
                ts = sorted(pts)
                ax.plot(ts, [pts[t] for t in ts], _DT_STYLES.get(dt, "-"), marker="o" if dt == "fp32" else "s",
                        ms=4, color=_B_COLORS[k % len(_B_COLORS)], label=f"B={B} {dt}")
    ax.axhline(TARGET_SWEEP, color="tab:red", lw=0.8, ls=":", label=f"target {TARGET_SWEEP:g}x")
    _log_axes(ax, [int(r["T"]) for r in sel], "T (history length; lengths uniform in 1..T)",
              f"attention sweep: {mode}, din_ops vs eager")
    ax.set_ylabel("eager time / din_ops time", fontsize=8)
    ax.legend(fontsize=6, ncol=2)


def _plot_serving(ax, att, serving, base):
    Ts = sorted({int(r["T"]) for r in serving})
    dts = [d for d in DTYPES if any(r["dtype"] == d for r in serving)]
    for k, T in enumerate(Ts):
        for dt in dts:
            pts = sorted((int(r["C"]), _ratio(att, r, base)) for r in serving if int(r["T"]) == T and r["dtype"] == dt)
            pts = [p for p in pts if p[1]]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], _DT_STYLES.get(dt, "-"),
                        marker="o" if dt == "fp32" else "s", ms=4, color=_B_COLORS[(k + 1) % len(_B_COLORS)],
                        label=f"T={T}" + (f" {dt}" if len(dts) > 1 else ""))
    if base == "eager":
        ax.axhline(TARGET_SERVING, color="tab:red", lw=0.8, ls=":", label=f"target {TARGET_SERVING:g}x")
    B = serving[0]["B"]
    _log_axes(ax, [int(r["C"]) for r in serving], "C (candidates against one full history of T)",
              f"serving (B={B}, inference): din_ops vs {base}")
    ax.set_ylabel(f"{base} time / din_ops time", fontsize=8)
    ax.legend(fontsize=7)


def _plot_bf16(ax, att, bf16):
    modes = [m for m in ("inference", "fwd", "fwd+bwd") if any(r["mode"] == m for r in bf16)]
    bars = (("eager", "bf16", "eager bf16"), ("compile", "bf16", "compile bf16"),
            ("careful", "bf16", "careful bf16"), ("din_ops", "fp32", "din_ops fp32"))
    colors = ("tab:gray", "tab:orange", "tab:green", "tab:blue")
    width = 0.8 / len(bars)
    for k, (base, dt, label) in enumerate(bars):
        vals = []
        for m in modes:
            d = next(r for r in bf16 if r["mode"] == m)
            v = None
            for b in att:
                if (b["shape"], b["mode"], b["dtype"], b["provider"]) == (d["shape"], m, dt, base):
                    v = float(b["median_ms"]) / float(d["median_ms"])
            vals.append(v)
        xs = [i + (k - (len(bars) - 1) / 2) * width for i in range(len(modes))]
        ax.bar([x for x, v in zip(xs, vals) if v], [v for v in vals if v], width, color=colors[k],
               label=f"vs {label}")
        for xx, v in zip(xs, vals):
            if v:
                ax.text(xx, v, f"{v:.1f}", ha="center", va="bottom", fontsize=6)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(modes)))
    ax.set_xticklabels(modes, fontsize=8)
    ax.set_ylabel("other time / din_ops bf16 time", fontsize=8)
    ax.set_title(f"din_ops bf16 at {bf16[0]['shape']}", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    top = max([p.get_height() for p in ax.patches] + [1.0])
    ax.set_ylim(0, top * 1.45)
    ax.legend(fontsize=6, ncol=2, loc="upper center")


def _plot_other(ax, others, op, mode):
    sel = [r for r in others if r["op"] == op and r["mode"] == mode]
    Bs = sorted({int(r["B"]) for r in sel})
    for prov, dt, B in sorted({(r["provider"], r["dtype"], int(r["B"])) for r in sel}):
        pts = sorted((int(r["T"]), float(r["speedup_vs_eager"])) for r in sel
                     if (r["provider"], r["dtype"], int(r["B"])) == (prov, dt, B))
        label = f"{prov} {dt}" + (f" B={B}" if len(Bs) > 1 else "")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], _DT_STYLES.get(dt, "-"), marker="o", ms=4,
                color=_PROV_COLORS.get(prov), label=label)
    _log_axes(ax, [int(r["T"]) for r in sel], "T (lengths uniform in 1..T)"
              + (f", B={Bs[0]}" if len(Bs) == 1 else ""), f"{op}: {mode}")
    ax.set_ylabel("speedup over eager", fontsize=8)
    ax.legend(fontsize=6)


# --- command line ---------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m din_ops.bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="presets:\n" + "\n".join(f"  {k:8s} {v.doc}" for k, v in PRESETS.items()))
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="what to measure (default: 'default' on CPU, 'gpu' on CUDA)")
    p.add_argument("--quick", dest="preset", action="store_const", const="quick", help="= --preset quick")
    p.add_argument("--full", dest="preset", action="store_const", const="full", help="= --preset full")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--out", default=os.path.join("bench", "out"), help="output folder (default bench/out)")
    p.add_argument("--name", default=None, help="file name prefix (default: cpu / gpu)")
    p.add_argument("--ops", default=",".join(BENCHES), help="comma-separated subset of " + ", ".join(BENCHES))
    p.add_argument("--providers", default=None, help="comma-separated subset of the providers")
    p.add_argument("--dtypes", default=None, help="comma-separated, e.g. fp32,bf16: every shape in each of "
                                                  "them (default: the preset's, e.g. on CPU the default "
                                                  "preset runs bf16 at the headline shape only)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--malloc-default", action="store_true",
                   help="CPU: leave glibc's allocator as it is (by default the runner makes it keep freed "
                        "memory, so large outputs are not page-faulted in at every step; see machine.py)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds after which no new shape is started (the outputs are still written)")
    p.add_argument("--plot", metavar="CSV", default=None, help="only redraw the plot of an existing CSV")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot:
        png = os.path.splitext(args.plot)[0].replace("_bench", "") + "_speedup.png"
        plot(args.plot, png)
        print(f"wrote {png}")
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if device.index is None:  # set_device and friends want an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        use_tf32_on_cuda()
    preset_name = args.preset or ("gpu" if device.type == "cuda" else "default")
    preset = dataclasses.replace(PRESETS[preset_name])
    if args.time_limit is not None:
        preset.time_limit_s = args.time_limit
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    for o in ops:
        if o not in BENCHES:
            raise SystemExit(f"unknown op {o!r}; choose from {', '.join(BENCHES)}")
    if args.dtypes:
        dtypes = [d.strip() for d in args.dtypes.split(",")]
        for d in dtypes:
            if d not in DTYPES:
                raise SystemExit(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    else:
        dtypes = list(preset.gpu_dtypes if device.type == "cuda" else preset.dtypes)
    providers = [p.strip() for p in args.providers.split(",")] if args.providers else None
    name = args.name or ("gpu" if device.type == "cuda" else "cpu")
    _load_gpu_kernels(device)
    allocator = "allocator default"
    if device.type == "cpu" and not args.malloc_default:
        allocator = keep_freed_memory()
    print(f"preset {preset_name}: {preset.doc}")
    runner = Runner(device, preset, ops, providers, dtypes, memory=not args.no_memory, out=args.out,
                    name=name, allocator=allocator, dtypes_given=bool(args.dtypes))

    def stop(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, stop)  # `timeout` sends SIGTERM: still write the outputs
    except ValueError:  # not the main thread
        pass
    return runner.run()


def _lowp_unit() -> str:
    """Which unit runs din_ops' bf16 attention products here: AMX, AVX512-BF16, or float products."""
    try:
        from .. import _C
        unit = _C._lowp_unit("bfloat16")
    except (ImportError, AttributeError):
        return "unknown (no C++ extension)"
    names = {"amx": "AMX (oneDNN brgemm)", "avx512_bf16": "AVX512-BF16 (oneDNN brgemm; this CPU has no AMX)"}
    return names.get(unit, "float (no AMX here, nor an AMD CPU's AVX512-BF16, or they are turned off; "
                           "bf16 is converted to float)")
