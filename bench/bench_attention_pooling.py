"""attention_pooling: din_ops against eager DeepCTR-style PyTorch, torch.compile of it, and the
careful plain-PyTorch version, at DIN's usual shape (B=2048, T=100 with lengths uniform in
1..100, D=36, hidden (80, 40), sigmoid, fp32).

    pytest bench/bench_attention_pooling.py --benchmark-only --benchmark-group-by=param:mode

Each group holds the four providers for one mode; pytest-benchmark prints them side by side.
"""
import pytest
import torch

from din_ops.bench import attention_pooling as A

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def case():
    return A.make_case(device=DEVICE, requires_grad=True)


@pytest.mark.parametrize("mode", ["inference", "fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", list(A.PROVIDERS))
def test_attention_pooling(benchmark, case, provider, mode):
    fn = A.PROVIDERS[provider]
    ref = A.eager(case).detach()
    torch.testing.assert_close(fn(case).detach(), ref, rtol=1e-3, atol=1e-3)
    benchmark.group = f"attention_pooling {mode}"
    benchmark.extra_info.update(case.shape)

    if mode == "inference":
        def step():
            with torch.no_grad():
                fn(case)
            _sync()
    elif mode == "fwd":
        def step():
            fn(case)
            _sync()
    else:
        params = case.params()

        def step():
            out = fn(case)
            grads = torch.autograd.grad(out.sum(), params)
            _sync()
            return grads

    benchmark.pedantic(step, rounds=7, iterations=1, warmup_rounds=1)
