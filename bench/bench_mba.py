"""Benchmarks of the fused MBA sparse update (SPEC section 3) against plain PyTorch; the providers
(eager, eager_sparse, compile, din_ops) are din_ops/bench/mba.py's, shared with the main job.

Configurations: a 1M x 64 fp32 table with 200k indices per batch, uniform or Zipf(1.05) (a few
hot rows hit thousands of times), and DIN's batch (B=2048 histories of lengths uniform in 1..T:
~100k Zipf item ids into a 1M x 36 table); SGD and row-wise Adagrad (the mode). The update is
applied in place repeatedly to the same table (lr, lam small: the values stay finite).

Run:  pytest bench/bench_mba.py --benchmark-only --benchmark-json=bench/out/mba.json
      (MBA_BENCH_THREADS=n sets torch's thread count)
      python bench/bench_mba.py bench/out/mba.json      (a markdown table of the medians)
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

if __name__ == "__main__":  # the report, also from a checkout without pip install -e
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from din_ops.bench import mba as MBA  # noqa: E402
from din_ops.bench.common import run_benchmark, suite_params  # noqa: E402

CONFIGS = {
    "uniform-200k": dict(B=2048, T=100, D=64, E=1_000_000, M=200_000, dist="uniform"),
    "zipf-200k": dict(B=2048, T=100, D=64, E=1_000_000, M=200_000, dist="zipf"),
    "din": dict(B=2048, T=100, D=36, E=1_000_000),
}


@pytest.fixture(scope="module", autouse=True)
def _threads():
    threads = int(os.environ.get("MBA_BENCH_THREADS", "0"))
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("provider,mode,device,dtype", suite_params(MBA.BENCH))
def test_mba_update(benchmark, config, provider, mode, device, dtype):
    run_benchmark(benchmark, MBA.BENCH, CONFIGS[config], provider, mode, device, dtype)
    benchmark.extra_info.update(config=config, threads=torch.get_num_threads())


def report(path: str) -> str:
    """Markdown table (median ms, speedup of din_ops over each provider) from a benchmark JSON."""
    providers = list(MBA.PROVIDERS)
    with open(path) as f:
        data = json.load(f)
    rows = {}
    for b in data["benchmarks"]:
        e = b["extra_info"]
        key = (e["device"], e["dtype"], e["threads"], e["mode"], e["config"], e["M"], e["U"])
        rows.setdefault(key, {})[e["provider"]] = b["stats"]["median"] * 1e3
    out = ["| device | dtype | threads | optimizer | indices (distinct) | "
           + " | ".join(f"{p} ms" for p in providers) + " | din_ops speedup vs eager | vs compile |",
           "|" + "---|" * (5 + len(providers) + 2)]
    for (device, dt, threads, opt, config, m, u), r in sorted(rows.items()):
        cells = [f"{r[p]:.2f}" if p in r else "-" for p in providers]
        sp = f"{r['eager'] / r['din_ops']:.1f}x" if "eager" in r and "din_ops" in r else "-"
        spc = f"{r['compile'] / r['din_ops']:.1f}x" if "compile" in r and "din_ops" in r else "-"
        out.append(f"| {device} | {dt} | {threads} | {opt} | {config}: {m} ({u}) | " + " | ".join(cells)
                   + f" | {sp} | {spc} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(report(sys.argv[1]))
