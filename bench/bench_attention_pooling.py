"""attention_pooling: din_ops against eager DeepCTR-style PyTorch, torch.compile of it, and the
careful plain-PyTorch version (din_ops/bench/attention_pooling.py), at DIN's usual shape
(B=2048, T=100 with lengths uniform in 1..100, D=36, hidden (80, 40), sigmoid).

    pytest bench/bench_attention_pooling.py --benchmark-only

Each group holds the four providers for one mode, dtype and device, side by side.
"""
import pytest

from din_ops.bench import attention_pooling as A
from din_ops.bench.common import run_benchmark, suite_params


@pytest.mark.parametrize("provider,mode,device,dtype", suite_params(A.BENCH))
def test_attention_pooling(benchmark, shape_tb, provider, mode, device, dtype):
    T, B = shape_tb
    run_benchmark(benchmark, A.BENCH, dict(B=B, T=T, D=36, hidden=(80, 40)), provider, mode, device, dtype)
