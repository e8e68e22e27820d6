"""Serving latency of a DIN: one request = one user's features and history against C candidate ads.

    python bench/serve_latency.py --out bench/results        # ~5 min on 2 CPU cores

Providers (same weights, fp32, CPU; every one checked against eager before it is timed):
- ``eager``: ``DIN(backend="eager").score``, the history expanded to C rows as DeepCTR-Torch
  users score candidates;
- ``compile``: ``torch.compile`` of that serving module (dynamic shapes, compiled once);
- ``aoti_eager``: an AOTInductor package of it (``torch.export`` with dynamic C and T);
- ``din_ops``: ``DIN(backend="din_ops").score`` in eager mode (query ``[1, C, D]``, the history
  read once);
- ``aoti_din_ops``: an AOTInductor package of the din_ops serving module.

Each shape runs ``--requests`` requests one after another (after warm-up); the table reports the
p50 and p99 latency and requests/s (1 / mean latency), and writes ``<name>_bench.csv``,
``<name>_summary.md`` and ``<name>_latency.png`` under ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import din_ops  # noqa: E402
from din_ops.bench.machine import device_name  # noqa: E402
from din_ops.models import DIN  # noqa: E402

ITEMS, CATEGORIES, USER_FIELDS = 100_000, 1000, (10_000, 3, 8)


def make_models(seed=0):
    torch.manual_seed(seed)
    kw = dict(user_fields=USER_FIELDS, embed_dim=18, attention_units=(80, 40), mlp_units=(200, 80))
    fused = DIN(ITEMS, CATEGORIES, backend="din_ops", **kw).eval()
    eager = DIN(ITEMS, CATEGORIES, backend="eager", **kw).eval()
    eager.load_state_dict(fused.state_dict())
    return eager, fused


def request(C, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.tensor([[7, 1, 3]]), torch.randint(1, ITEMS, (C,), generator=g),
            torch.randint(1, CATEGORIES, (C,), generator=g), torch.randint(1, ITEMS, (1, T), generator=g),
            torch.randint(1, CATEGORIES, (1, T), generator=g), torch.tensor([T]))


def aoti_package(module, path):
    C, T = torch.export.Dim("C", min=2, max=8192), torch.export.Dim("T", min=2, max=8192)
    ep = torch.export.export(module, request(16, 20), dynamic_shapes=(None, {0: C}, {0: C}, {1: T}, {1: T}, None))
    pkg = torch._inductor.aoti_compile_and_package(ep, package_path=path)
    return torch._inductor.aoti_load_package(pkg)


def time_requests(fn, args, n, warmup):
    with torch.inference_mode():
        for _ in range(warmup):
            fn(*args)
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn(*args)
            ts.append(time.perf_counter() - t0)
    ts.sort()
    return dict(p50_ms=1e3 * ts[len(ts) // 2], p99_ms=1e3 * ts[min(len(ts) - 1, int(0.99 * len(ts)))],
                rps=1.0 / statistics.fmean(ts))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--name", default="cpu_serving")
    ap.add_argument("--candidates", default="10,100,1000")
    ap.add_argument("--history", default="50,500")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--providers", default="eager,compile,aoti_eager,din_ops,aoti_din_ops")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    eager, fused = make_models()
    providers = a.providers.split(",")
    fns = {"eager": eager.score, "din_ops": fused.score}
    with tempfile.TemporaryDirectory() as tmp:
        if "compile" in providers:
            fns["compile"] = torch.compile(eager.serving(), dynamic=True)
        if "aoti_eager" in providers:
            fns["aoti_eager"] = aoti_package(eager.serving(), os.path.join(tmp, "eager.pt2"))
        if "aoti_din_ops" in providers:
            fns["aoti_din_ops"] = aoti_package(fused.serving(), os.path.join(tmp, "din_ops.pt2"))
        rows = []
        for T in map(int, a.history.split(",")):
            for C in map(int, a.candidates.split(",")):
                args = request(C, T, seed=C + T)
                with torch.inference_mode():
                    want = eager.score(*args)
                base = None
                for p in providers:
                    with torch.inference_mode():
                        err = (fns[p](*args) - want).abs().max().item()
                    if not err <= 1e-4:
                        raise SystemExit(f"{p} at C={C} T={T} differs from eager by {err}")
                    n = max(20, a.requests // (1 + C * T // 50_000))
                    r = time_requests(fns[p], args, n, warmup=max(3, n // 10))
                    base = r["p50_ms"] if p == "aoti_eager" else base
                    rows.append(dict(provider=p, C=C, T=T, requests=n, max_abs_err=err, **r))
                    print(f"C={C:5d} T={T:4d} {p:13s} p50 {r['p50_ms']:8.3f} ms  p99 {r['p99_ms']:8.3f} ms  "
                          f"{r['rps']:9.1f} req/s", flush=True)
    write(a, rows, providers)


def write(a, rows, providers):
    path = os.path.join(a.out, f"{a.name}_bench.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    by = {(r["provider"], r["C"], r["T"]): r for r in rows}
    shapes = sorted({(r["T"], r["C"]) for r in rows})
    lines = [f"# DIN serving latency: {device_name(torch.device('cpu'))}", "",
             f"- torch {torch.__version__}, din_ops {din_ops.__version__}, {torch.get_num_threads()} threads, "
             f"{time.strftime('%Y-%m-%d')}",
             "- one request: one user (3 profile fields), a full history of T behaviours, C candidates; "
             "fp32; every provider checked against eager (max abs error in the CSV)",
             "- p50 / p99 latency in ms; req/s = 1 / mean latency; ratio = aoti_eager p50 / provider p50", "",
             "| C | T | " + " | ".join(providers) + " |", "|---:|---:|" + "---|" * len(providers)]
    for T, C in shapes:
        cells = []
        for p in providers:
            r = by.get((p, C, T))
            if r is None:
                cells.append("-")
                continue
            ratio = ""
            if ("aoti_eager", C, T) in by:
                ratio = f", {by[('aoti_eager', C, T)]['p50_ms'] / r['p50_ms']:.2f}x"
            cells.append(f"{r['p50_ms']:.3f} / {r['p99_ms']:.3f} ({r['rps']:.0f} req/s{ratio})")
        lines.append(f"| {C} | {T} | " + " | ".join(cells) + " |")
    with open(os.path.join(a.out, f"{a.name}_summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len({T for T, _ in shapes}), figsize=(11, 4), squeeze=False)
    for ax, T in zip(axes[0], sorted({T for T, _ in shapes})):
        Cs = sorted(C for t, C in shapes if t == T)
        for p in providers:
            ax.plot(Cs, [by[(p, C, T)]["p50_ms"] for C in Cs], marker="o", label=p)
        ax.set(xscale="log", yscale="log", xlabel="candidates C", ylabel="p50 latency (ms)", title=f"T = {T}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, f"{a.name}_latency.png"), dpi=110)


if __name__ == "__main__":
    main()
