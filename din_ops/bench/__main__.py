"""The main job: ``python -m din_ops.bench`` checks every provider against the reference, then
times din_ops against eager PyTorch on whatever device is present and prints a table."""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from din_ops import reference as R
from din_ops.bench import attention_pooling as A


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, reps=7, warmup=2):
    for _ in range(warmup):
        fn()
    _sync(device)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def self_check(device) -> bool:
    """Each provider's output (and din_ops' gradients) against the reference on a small case."""
    ok = True
    c = A.make_case(B=37, T=23, D=7, hidden=(9, 5), dtype=torch.float64, device=device, min_len=0,
                    requires_grad=True)
    for normalization in ("none", "softmax"):
        c.normalization = normalization
        want = R.attention_pooling(c.query, c.keys, c.weights, c.biases, lengths=c.lengths,
                                   normalization=normalization)
        gwant = torch.autograd.grad(want.square().sum(), c.params())
        for name, fn in A.PROVIDERS.items():
            if name == "compile":
                continue
            got = fn(c)
            err = float((got - want).abs().max())
            good = err < 1e-9
            if name == "din_ops":
                ggot = torch.autograd.grad(got.square().sum(), c.params())
                err = max([err] + [float((a - b).abs().max()) for a, b in zip(ggot, gwant)])
                good = err < 1e-9
            print(f"  self-check attention_pooling {normalization:8s} {name:8s} max|err| {err:.1e} "
                  f"{'ok' if good else 'MISMATCH'}")
            ok &= good
    return ok


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = args.device
    print(f"din_ops benchmark on {device} (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    if not self_check(device):
        print("SELF-CHECK FAILED: not timing", file=sys.stderr)
        return 1
    c = A.make_case(device=device, requires_grad=True)
    print(f"\nattention_pooling {c.shape}, fp32")
    print(f"{'provider':10s} {'mode':8s} {'ms':>9s} {'vs eager':>9s}")
    for mode in ("fwd", "fwd+bwd"):
        base = None
        for name, fn in A.PROVIDERS.items():
            if mode == "fwd":
                step = lambda: fn(c)  # noqa: E731
            else:
                step = lambda: torch.autograd.grad(fn(c).sum(), c.params())  # noqa: E731
            ms = time_ms(step, device)
            base = base or ms
            print(f"{name:10s} {mode:8s} {ms:9.2f} {base / ms:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
