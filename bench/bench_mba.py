"""Benchmarks of the fused MBA sparse update (SPEC section 3) against plain PyTorch.

A 1M x 64 fp32 table, 200k indices per batch (uniform, or Zipf-like: a few hot rows hit
thousands of times), the update of paper eq. 2.4 with SGD and with row-wise Adagrad.

Providers, side by side in one group per configuration:
  eager         what a careful PyTorch user writes: coalesce the batch (torch.unique with
                inverse), segment-sum the duplicate gradient rows (index_add_), gather the
                present rows, the regularized update on them, index_copy_ back;
  eager_sparse  the same starting from the sparse COO gradient's .coalesce();
  compile       `eager` through torch.compile (the unique/gather/scatter stay as they are, the
                elementwise update is fused);
  din_ops       din_ops.mba_sparse_update_ (C++ on CPU, Triton on CUDA).

The update is applied in place repeatedly to the same table; lr and lam are small so the values
stay finite (each step only shrinks the present rows a little).

Run:  python -m pytest bench/bench_mba.py --benchmark-json=bench/out/mba.json
      (MBA_BENCH_THREADS=n sets torch's thread count, MBA_BENCH_ROUNDS=n the rounds)
      python bench/bench_mba.py bench/out/mba.json > bench/results/cpu_mba.md   (the table)
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import din_ops  # noqa: E402

if torch.cuda.is_available():
    import din_ops.triton  # noqa: F401  (registers the Triton kernels for CUDA tensors)

N, D, M = 1_000_000, 64, 200_000
LR, LAM, EPS = 1e-3, 1e-4, 1e-10
PROVIDERS = ["eager", "eager_sparse", "compile", "din_ops"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_indices(dist: str, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if dist == "uniform":
        idx = torch.randint(0, N, (M,), generator=gen)
    else:  # Zipf(1.05) ranks, scattered over the table
        p = 1.0 / torch.arange(1, N + 1, dtype=torch.float64) ** 1.05
        ranks = torch.multinomial(p, M, replacement=True, generator=gen)
        idx = torch.randperm(N, generator=gen)[ranks]
    return idx.to(device)


def eager_update(weight, indices, grad, freq, state, lr: float, lam: float, optimizer: str, eps: float = EPS):
    uniq, inverse = torch.unique(indices, return_inverse=True)
    g = torch.zeros(uniq.numel(), weight.shape[1], dtype=grad.dtype, device=grad.device)
    g.index_add_(0, inverse, grad)
    return _eager_rows(weight, uniq, g, freq, state, lr, lam, optimizer, eps)


def eager_sparse_update(weight, indices, grad, freq, state, lr: float, lam: float, optimizer: str,
                        eps: float = EPS):
    sp = torch.sparse_coo_tensor(indices[None], grad, weight.shape, check_invariants=False).coalesce()
    return _eager_rows(weight, sp._indices()[0], sp._values(), freq, state, lr, lam, optimizer, eps)


def _eager_rows(weight, uniq, g, freq, state, lr, lam, optimizer, eps):
    w = weight.index_select(0, uniq)
    n = freq.index_select(0, uniq).to(w.dtype).clamp_min(1)
    r = g + (lam / n)[:, None] * w
    if optimizer == "sgd":
        w = w - lr * r
    else:  # adagrad_rowwise
        s = state.index_select(0, uniq) + (r * r).mean(1)
        state.index_copy_(0, uniq, s)
        w = w - lr * r / (s.sqrt() + eps)[:, None]
    weight.index_copy_(0, uniq, w)


_compiled = {}


def compiled_update(*args):
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(eager_update, dynamic=False)
    return _compiled["fn"](*args)


def din_update(weight, indices, grad, freq, state, lr, lam, optimizer):
    din_ops.mba_sparse_update_(weight, indices, grad, freq, lr=lr, lam=lam, optimizer=optimizer, state=state)


FNS = {"eager": eager_update, "eager_sparse": eager_sparse_update, "compile": compiled_update,
       "din_ops": din_update}


@pytest.fixture(scope="module", params=DEVICES)
def table(request):
    device = request.param
    threads = int(os.environ.get("MBA_BENCH_THREADS", "0"))
    if threads:
        torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    weight = (0.01 * torch.randn(N, D, generator=gen)).to(device)
    freq = torch.randint(0, 1000, (N,), generator=gen).to(device)
    state = torch.zeros(N, device=device)
    return device, weight, freq, state


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dist", ["uniform", "zipf"])
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad_rowwise"])
def test_mba_update(benchmark, table, provider, dist, optimizer):
    device, weight, freq, state = table
    indices = make_indices(dist, device)
    grad = 1e-3 * torch.randn(M, D, generator=torch.Generator().manual_seed(1)).to(device)
    st = state if optimizer != "sgd" else None
    fn = FNS[provider]
    benchmark.group = f"mba_update {optimizer} {dist} {device} N={N} D={D} M={M}"
    benchmark.extra_info.update(provider=provider, optimizer=optimizer, dist=dist, device=device,
                                distinct=int(torch.unique(indices).numel()), threads=torch.get_num_threads())

    def run():
        fn(weight, indices, grad, freq, st, LR, LAM, optimizer)
        _sync(device)

    run()  # warm-up (and compilation) outside the timed rounds
    rounds = int(os.environ.get("MBA_BENCH_ROUNDS", "0")) or (5 if provider in ("eager_sparse",) else 15)
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)
    assert torch.isfinite(weight).all()


def report(path: str) -> str:
    """Markdown table (median ms, speedup of din_ops over each provider) from a benchmark JSON."""
    data = json.load(open(path))
    rows = {}
    for b in data["benchmarks"]:
        e = b["extra_info"]
        key = (e["device"], e["threads"], e["optimizer"], e["dist"], e["distinct"])
        rows.setdefault(key, {})[e["provider"]] = b["stats"]["median"] * 1e3
    out = ["| device | threads | optimizer | indices (distinct of 200k) | "
           + " | ".join(f"{p} ms" for p in PROVIDERS) + " | din_ops speedup vs eager | vs compile |",
           "|" + "---|" * (5 + len(PROVIDERS) + 1)]
    for (device, threads, opt, dist, distinct), r in sorted(rows.items()):
        cells = [f"{r[p]:.1f}" if p in r else "-" for p in PROVIDERS]
        sp = f"{r['eager'] / r['din_ops']:.1f}x" if "eager" in r and "din_ops" in r else "-"
        spc = f"{r['compile'] / r['din_ops']:.1f}x" if "compile" in r and "din_ops" in r else "-"
        out.append(f"| {device} | {threads} | {opt} | {dist} ({distinct}) | " + " | ".join(cells) + f" | {sp} | {spc} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(report(sys.argv[1]))
