"""dice: din_ops against DeepCTR-Torch's BatchNorm Dice (``eager``: padding in the statistics),
the reference's masked formulation in plain PyTorch (``eager_masked``) and torch.compile of it,
at x [B=2048, T=100, C=80] with lengths uniform in 1..100, affine (din_ops/bench/dice.py).

    pytest bench/bench_dice.py --benchmark-only

Groups per mode (``inference``: eval mode, no autograd; ``fwd``: training forward with the
autograd graph recorded; ``fwd+bwd``: plus the gradients of x, alpha, gamma and beta for a fixed
random upstream gradient), the four providers side by side. Training-mode calls update the
running statistics in place, as in training.
"""
import pytest

from din_ops.bench import dice as D
from din_ops.bench.common import run_benchmark, suite_params


@pytest.mark.parametrize("provider,mode,device,dtype", suite_params(D.BENCH))
def test_dice(benchmark, shape_tb, provider, mode, device, dtype):
    T, B = shape_tb
    run_benchmark(benchmark, D.BENCH, dict(B=B, T=T, hidden=(80,)), provider, mode, device, dtype)
