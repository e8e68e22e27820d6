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
from . import mba as _mba
from .common import DTYPE_NAMES, DTYPES, OpBench, Timer, tolerance, use_tf32_on_cuda
from .machine import Machine, calibrate, device_name, keep_freed_memory
from .memory import peak_bytes

BENCHES: Dict[str, OpBench] = {b.name: b for b in (_attention.BENCH, _dice.BENCH, _mba.BENCH)}

HEADLINE = dict(B=2048, T=100, D=36, hidden=(80, 40))
T_VALUES = (10, 50, 100, 500, 1000)


@dataclasses.dataclass
class Preset:
    """What a run measures. ``shapes`` are (sweep tag, shape) in the order they run (the most
    important first, so a run stopped by ``time_limit`` still has them)."""
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


def _shape(B, T, D=36, hidden=(80, 40), E=1_000_000, dtypes=None):
    """A sweep point; ``dtypes`` restricts it to some of the run's dtypes."""
    s = dict(B=B, T=T, D=D, hidden=tuple(hidden), E=E)
    if dtypes:
        s["dtypes"] = tuple(dtypes)
    return s


# The MBA update at the size of a production step: a 1M x 64 table, 200k lookups per batch,
# uniform ids and Zipf(1.05) ids (a few hot items occur thousands of times).
MBA_STEP = [(f"mba-{dist}", dict(B=2048, T=100, D=64, hidden=(80, 40), E=1_000_000, M=200_000, dist=dist,
                                 ops=("mba_update",))) for dist in ("uniform", "zipf")]

SWEEP_BT = 25600  # the default preset's T sweep holds B * T here (1/8 of the headline's)


PRESETS: Dict[str, Preset] = {
    "tiny": Preset(
        shapes=[("T", _shape(32, 10, 8, (16, 8), E=5000)), ("T", _shape(32, 50, 8, (16, 8), E=5000))],
        skip_providers=("compile",), budget_s=0.02, min_reps=3, max_reps=10, calibration_scale=1 / 32,
        doc="seconds; no torch.compile (its first compilation alone takes 10+ s on a CPU): the CI smoke run"),
    "quick": Preset(
        shapes=[("headline", _shape(**HEADLINE))] + MBA_STEP,
        doc="the headline shape only (B=2048, T=100, D=36, hidden 80x40)"),
    "default": Preset(
        shapes=[("headline", _shape(**HEADLINE))] + MBA_STEP + [("T", _shape(SWEEP_BT // T, T)) for T in T_VALUES],
        budget_s=0.4, min_reps=3, max_reps=30, memory_tags=("headline",),
        doc=f"the headline shape (B=2048, T=100), then a T sweep 10..1000 at B*T = {SWEEP_BT} (peak "
            "memory at the headline shape only); about 2 minutes on 2 idle CPU cores"),
    "full": Preset(
        shapes=[("T", _shape(2048, T)) for T in T_VALUES]
        + [("B", _shape(B, 100)) for B in (256, 1024, 4096)]
        + [("D", _shape(2048, 100, D)) for D in (16, 64, 128)]
        + [("H", _shape(2048, 100, 36, H)) for H in ((64, 16), (200, 80, 40))],
        budget_s=1.0, min_reps=7, max_reps=100,
        doc="T sweep at B=2048, then batch, embedding width and hidden-size sweeps at T=100"),
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
                 allocator: str = "allocator default"):
        self.device = torch.device(device)
        self.preset = preset
        self.ops = list(ops)
        self.providers = providers
        self.dtypes = list(dtypes)
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

    def cases(self):
        """(op, dtype, tag, shape) in run order, each op's identical cases once."""
        dtypes = self.dtypes
        seen = set()
        for tag, shape in self.preset.shapes:
            for dt in [d for d in dtypes if d in shape.get("dtypes", dtypes)]:
                for op in self.ops:
                    if op not in shape.get("ops", (op,)):
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
        total = sum(len(self.provider_names(BENCHES[op])) * len(BENCHES[op].modes) for op, *_ in cases)
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
                n_rows = len(self.provider_names(bench)) * len(bench.modes)
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
            for mode in bench.modes:
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
        lines = ["", "=== headline (fp32; B=2048, T=100, D=36, hidden 80x40) ==="]
        hs = dict(B=2048, T=100)
        att = dict(D=36, H="80x40", **hs)
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

    def markdown(self) -> str:
        m = self.machine
        out = [f"# din_ops benchmark: {m.name}", "",
               f"- device: {self.device.type}, {m.name}, {m.threads} {'threads' if m.device == 'cpu' else 'SMs'}",
               f"- torch {self.versions['torch_version']}, din_ops {self.versions['din_ops_version']} "
               f"({self.versions['git_rev'] or 'no git'}), {datetime.date.today().isoformat()}",
               "- limits measured in the run: " + m.summary(),
               f"- CPU allocator: {self.versions['allocator']}; load average at the end "
               f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}" if m.device == "cpu" else "", ""]
        head = self.headline()
        if head:
            out += ["```", head.strip(), "```", ""]
        groups: Dict[tuple, List[Row]] = {}
        for r in self.rows:
            groups.setdefault((r.op, r.shape_str, r.dtype), []).append(r)
        for (op, ss, dt), rows in groups.items():
            out += [f"## {op} {ss} {dt}", ""] + self.table_lines(rows, md=True) + [""]
        return "\n".join(out)


# --- plot -----------------------------------------------------------------------------------------
def plot(csv_path: str, png_path: str) -> None:
    """Speedup over eager against T, one panel per op and mode, a line per provider and dtype, from
    the rows of the T sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    with open(csv_path) as f:
        rows = [r for r in csv.DictReader(f) if r["speedup_vs_eager"] and r["sweep"] == "T"]
    if not rows:
        rows = []
    ops = [op for op in BENCHES if any(r["op"] == op for r in rows)]
    if not ops:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.text(0.5, 0.5, "no timed rows", ha="center", va="center")
        fig.savefig(png_path, dpi=100)
        plt.close(fig)
        return
    ncols = max(len(BENCHES[op].modes) for op in ops)
    fig, axes = plt.subplots(len(ops), ncols, figsize=(4.2 * ncols, 3.3 * len(ops)), squeeze=False)
    device_name = rows[0]["device_name"]
    styles = {"fp32": "-", "bf16": "--", "fp16": ":", "fp64": "-."}
    colors = {"compile": "tab:orange", "careful": "tab:green", "din_ops": "tab:blue", "eager_sparse": "tab:gray",
              "eager_masked": "tab:purple"}
    for i, op in enumerate(ops):
        modes = BENCHES[op].modes
        for j in range(ncols):
            ax = axes[i][j]
            if j >= len(modes):
                ax.axis("off")
                continue
            mode = modes[j]
            sel = [r for r in rows if r["op"] == op and r["mode"] == mode and r["provider"] != "eager"]
            for (prov, dt) in sorted({(r["provider"], r["dtype"]) for r in sel}):
                pts = sorted((int(r["T"]), float(r["speedup_vs_eager"])) for r in sel
                             if r["provider"] == prov and r["dtype"] == dt)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], styles.get(dt, "-"), marker="o",
                            color=colors.get(prov), label=f"{prov} {dt}")
            ax.axhline(1.0, color="black", lw=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(ticker.FixedLocator(T_VALUES))
            ax.xaxis.set_major_formatter(ticker.FixedFormatter([str(t) for t in T_VALUES]))
            ax.xaxis.set_minor_locator(ticker.NullLocator())
            ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}x"))
            ax.yaxis.set_minor_locator(ticker.NullLocator())
            ax.set_title(f"{op}: {mode}", fontsize=10)
            ax.set_xlabel("T (history length; lengths uniform in 1..T)", fontsize=8)
            ax.set_ylabel("speedup over eager", fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    batches = sorted({(int(r["T"]), int(r["B"])) for r in rows})
    fig.suptitle(f"din_ops vs PyTorch on {device_name} ({rows[0]['dtype'] if len({r['dtype'] for r in rows}) == 1 else 'dtypes as labelled'})\n"
                 "B per T: " + ", ".join(f"T={t}: B={b}" for t, b in batches), fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


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
    p.add_argument("--dtypes", default=None, help="comma-separated, e.g. fp32,bf16 (default: fp32 on CPU, "
                                                  "fp32,bf16 on CUDA)")
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
                    name=name, allocator=allocator)

    def stop(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, stop)  # `timeout` sends SIGTERM: still write the outputs
    except ValueError:  # not the main thread
        pass
    return runner.run()
