"""dice: din_ops against DeepCTR-Torch's BatchNorm Dice (padding in the statistics), the
reference's masked formulation in plain PyTorch, and torch.compile of it, at x [B=2048, T=100,
C=80] with lengths uniform in 1..100, fp32, affine.

    pytest bench/bench_dice.py --benchmark-only

Groups ``dice fwd`` (training forward, autograd graph recorded) and ``dice fwd+bwd`` hold the
four providers side by side; fwd+bwd takes the gradients of x, alpha, gamma and beta for a fixed random upstream gradient. Every provider
updates its running statistics in place, as in training.
"""
import pytest
import torch

from din_ops import reference as R
from din_ops.bench import dice as D

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def case():
    return D.make_case(device=DEVICE, requires_grad=True)


def _check(fn, provider):
    """Masked providers agree with the reference on a small case (outputs and gradients)."""
    c = D.make_case(B=13, T=11, C=7, device=DEVICE, requires_grad=True)
    y = fn(c)
    if provider == "eager":
        return
    want = R.dice(c.x, c.alpha, lengths=c.lengths, gamma=c.gamma, beta=c.beta)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    got = torch.autograd.grad(y, c.params(), c.grad_y)
    ref = torch.autograd.grad(want, c.params(), c.grad_y)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", list(D.PROVIDERS))
def test_dice(benchmark, case, provider, mode):
    fn = D.PROVIDERS[provider]
    _check(fn, provider)
    benchmark.group = f"dice {mode}"
    benchmark.extra_info.update(case.shape)
    params = case.params()

    if mode == "fwd":
        def step():
            fn(case)
            _sync()
    else:
        def step():
            grads = torch.autograd.grad(fn(case), params, case.grad_y)
            _sync()
            return grads

    benchmark.pedantic(step, rounds=7, iterations=1, warmup_rounds=2)
