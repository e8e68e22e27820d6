"""Mini-batch aware regularization (SPEC section 3): the fused sparse update, the penalty and its
gradient, frequency counting, the MBA optimizers, and the Triton kernels (tests named *triton*).

The ground truth is din_ops.reference (paper eq. 2.3 / 2.4); one test also spells the update out
as a per-row Python loop, independent of reference.py.
"""
import math

import pytest
import torch
from torch import nn

import din_ops
import din_ops.triton  # noqa: F401  (registers the Triton kernels for CUDA tensors)
from din_ops import reference as ref
from din_ops.optim import MBAAdagrad, MBASGD, embedding_padding

from conftest import triton_backends

ops = torch.ops.din_ops
OPTIMIZERS = ["sgd", "adagrad", "adagrad_rowwise"]
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-6, atol=1e-6),
    # fp16/bf16 vs the reference run in fp32 on the same (upcast) values: one rounding apart
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_case(N, D, M, dtype=torch.float32, optimizer="sgd", *, index_dtype=torch.int64, device="cpu",
              hot=None, freq_dtype=torch.int64, seed=0):
    """A table, a batch of M indices with duplicates (``hot`` draws from the first few rows
    only), per-occurrence gradient rows, counts with zeros, and the optimizer state."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(N, D, generator=gen, dtype=torch.float64).to(dtype)
    high = N if hot is None else min(hot, N)
    indices = torch.randint(0, high, (M,), generator=gen).to(index_dtype)
    grad = torch.randn(M, D, generator=gen, dtype=torch.float64).to(dtype)
    freq = torch.randint(0, 6, (N,), generator=gen).to(freq_dtype)  # includes n_j == 0
    state = None
    if optimizer == "adagrad":
        state = torch.rand(N, D, generator=gen, dtype=torch.float64).to(_acc(dtype))
    elif optimizer == "adagrad_rowwise":
        state = torch.rand(N, generator=gen, dtype=torch.float64).to(_acc(dtype))
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(weight), to(indices), to(grad), to(freq), to(state)


def run_ref(weight, indices, grad, freq, state, *, lr, lam, optimizer, padding_idx=None, eps=1e-10):
    w = weight.clone()
    s = None if state is None else state.clone()
    ref.mba_sparse_update_(w, indices, grad, freq, lr=lr, lam=lam, optimizer=optimizer, state=s,
                           padding_idx=padding_idx, eps=eps)
    return w, s


def run_ops(weight, indices, grad, freq, state, *, lr, lam, optimizer, padding_idx=None, eps=1e-10):
    w = weight.clone()
    s = None if state is None else state.clone()
    din_ops.mba_sparse_update_(w, indices, grad, freq, lr=lr, lam=lam, optimizer=optimizer, state=s,
                               padding_idx=padding_idx, eps=eps)
    return w, s


def run_ref_fp32(weight, indices, grad, freq, state, **kw):
    """The reference in fp32 on upcast fp16/bf16 inputs, rounded back: what the kernels compute."""
    w, s = run_ref(weight.float(), indices, grad.float(), freq, None if state is None else state.float(), **kw)
    return w.to(weight.dtype), None if s is None else s.to(state.dtype)


def loop_update(weight, indices, grad, freq, state, *, lr, lam, optimizer, padding_idx=None, eps=1e-10):
    """Paper eq. 2.4 row by row in float64, written out independently of reference.py."""
    w = weight.detach().double().clone()
    s = None if state is None else state.double().clone()
    N = w.shape[0]
    pad = None if padding_idx is None else padding_idx % N
    idx = indices.tolist()
    for j in sorted(set(idx)):
        if j == pad:
            continue
        g = torch.zeros(w.shape[1], dtype=torch.float64)
        for p, i in enumerate(idx):
            if i == j:
                g += grad[p].double()
        n = max(float(freq[j]), 1.0)
        r = g + lam / n * w[j]
        if optimizer == "sgd":
            w[j] = w[j] - lr * r
        elif optimizer == "adagrad":
            s[j] = s[j] + r * r
            w[j] = w[j] - lr * r / (s[j].sqrt() + eps)
        else:
            s[j] = s[j] + (r * r).sum() / r.numel()
            w[j] = w[j] - lr * r / (math.sqrt(float(s[j])) + eps)
    return w, s


def assert_close(actual, expected, dtype):
    if expected is None:
        assert actual is None
        return
    torch.testing.assert_close(actual, expected, **TOL[dtype])


# --- fused update vs the reference ------------------------------------------------------------
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("N,D,M,hot,padding_idx", [
    (53, 7, 97, None, None),      # primes, scattered duplicates
    (53, 7, 97, 5, 3),            # heavy duplicates, padding row among them
    (101, 1, 13, None, -1),       # D == 1, negative padding_idx
    (1, 5, 11, None, None),       # a single row hit 11 times
    (29, 67, 23, 11, 0),          # D past the kernel's vector width
])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_update_matches_reference(optimizer, dtype, N, D, M, hot, padding_idx, index_dtype):
    w, idx, g, f, st = make_case(N, D, M, dtype, optimizer, hot=hot, index_dtype=index_dtype)
    kw = dict(lr=0.3, lam=0.7, optimizer=optimizer, padding_idx=padding_idx)
    w_ops, s_ops = run_ops(w, idx, g, f, st, **kw)
    w_ref, s_ref = run_ref(w, idx, g, f, st, **kw)
    assert_close(w_ops, w_ref, dtype)
    assert_close(s_ops, s_ref, dtype)
    assert not torch.equal(w_ops, w)  # the step did something


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_update_matches_explicit_loop(optimizer):
    w, idx, g, f, st = make_case(37, 6, 50, torch.float64, optimizer, hot=9)
    kw = dict(lr=0.05, lam=1.3, optimizer=optimizer, padding_idx=2, eps=1e-8)
    w_ops, s_ops = run_ops(w, idx, g, f, st, **kw)
    w_loop, s_loop = loop_update(w, idx, g, f, st, **kw)
    torch.testing.assert_close(w_ops, w_loop, rtol=1e-12, atol=1e-12)
    if st is not None:
        torch.testing.assert_close(s_ops, s_loop, rtol=1e-12, atol=1e-12)
    assert torch.equal(w_ops[2], w[2])  # padding row


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_update_hot_and_cold_rows(optimizer, dtype):
    # rows hit 16+ times are summed in the CPU kernel's position-order pre-pass, the others in
    # the fused loop; both must agree with the reference
    w, idx, g, f, st = make_case(300, 9, 400, dtype, optimizer)
    idx[::3] = 7
    idx[1::7] = 250
    idx[2::11] = 0
    kw = dict(lr=0.05, lam=0.4, optimizer=optimizer, padding_idx=0)
    w_ops, s_ops = run_ops(w, idx, g, f, st, **kw)
    ref_fn = run_ref if dtype != torch.bfloat16 else run_ref_fp32
    w_ref, s_ref = ref_fn(w, idx, g, f, st, **kw)
    assert_close(w_ops, w_ref, dtype)
    if st is not None:
        torch.testing.assert_close(s_ops.float(), s_ref.float(), **TOL[dtype])
    assert torch.equal(w_ops[0], w[0])


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("state_low", [False, True])
def test_update_half(optimizer, dtype, state_low):
    w, idx, g, f, st = make_case(61, 19, 83, dtype, optimizer, hot=20)
    if state_low and st is not None:
        st = st.to(dtype)  # state in the table's dtype is allowed too
    kw = dict(lr=0.1, lam=0.5, optimizer=optimizer, padding_idx=7)
    w_ops, s_ops = run_ops(w, idx, g, f, st, **kw)
    w_ref, s_ref = run_ref_fp32(w, idx, g, f, st, **kw)
    assert w_ops.dtype == dtype
    assert_close(w_ops, w_ref, dtype)
    if st is not None:
        assert s_ops.dtype == st.dtype
        torch.testing.assert_close(s_ops.float(), s_ref.float(), **TOL[dtype])


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_outside_batch_bit_identical(optimizer, dtype):
    N, D = 97, 13
    w, idx, g, f, st = make_case(N, D, 60, dtype, optimizer)
    in_batch = (idx < 60) | (idx >= 90)  # the batch avoids rows 60..89 ...
    idx, g = idx[in_batch], g[in_batch]
    w[60:70] = float("nan")  # ... which hold non-finite values: touching them at all would show
    w[70:75] = float("inf")
    if st is not None:
        st[80:90] = float("nan")
    absent = torch.ones(N, dtype=torch.bool)
    absent[idx] = False
    absent[5] = True  # the padding row, present or not
    keep_w = w.clone()
    keep_s = None if st is None else st.clone()
    din_ops.mba_sparse_update_(w, idx, g, f, lr=0.2, lam=0.3, optimizer=optimizer, state=st, padding_idx=5)
    bits = torch.int16 if dtype == torch.float16 else torch.int32
    assert torch.equal(w[absent].view(bits), keep_w[absent].view(bits))
    assert not torch.equal(w[~absent], keep_w[~absent])
    assert torch.isfinite(w[~absent]).all()
    if st is not None:
        assert torch.equal(st[absent].view(torch.int32), keep_s[absent].view(torch.int32))


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_empty_batch_is_noop(optimizer):
    w, _, _, f, st = make_case(17, 4, 0, torch.float32, optimizer)
    keep_w, keep_s = w.clone(), None if st is None else st.clone()
    din_ops.mba_sparse_update_(w, torch.empty(0, dtype=torch.int64), torch.empty(0, 4), f, lr=1.0, lam=1.0,
                               optimizer=optimizer, state=st)
    assert torch.equal(w, keep_w)
    if st is not None:
        assert torch.equal(st, keep_s)
    # a batch of padding only is a no-op as well
    din_ops.mba_sparse_update_(w, torch.full((6,), 3), torch.randn(6, 4), f, lr=1.0, lam=1.0,
                               optimizer=optimizer, state=st, padding_idx=3)
    assert torch.equal(w, keep_w)
    if st is not None:
        assert torch.equal(st, keep_s)


def test_empty_table_and_width():
    w = torch.empty(0, 3)
    din_ops.mba_sparse_update_(w, torch.empty(0, dtype=torch.int64), torch.empty(0, 3),
                               torch.empty(0, dtype=torch.int64), lr=0.1, lam=0.1)
    w = torch.empty(5, 0)
    din_ops.mba_sparse_update_(w, torch.tensor([1, 1]), torch.empty(2, 0), torch.ones(5), lr=0.1, lam=0.1)
    assert din_ops.mba_penalty(w, torch.tensor([1, 2]), torch.ones(5), 0.5).item() == 0.0


@pytest.mark.parametrize("freq_dtype", [torch.int32, torch.int64, torch.float32, torch.float64])
def test_freq_dtypes(freq_dtype):
    w, idx, g, f, _ = make_case(41, 9, 60, torch.float64, "sgd")
    kw = dict(lr=0.2, lam=2.0, optimizer="sgd")
    w_ops, _ = run_ops(w, idx, g, f.to(freq_dtype), None, **kw)
    w_ref, _ = run_ref(w, idx, g, f, None, **kw)
    torch.testing.assert_close(w_ops, w_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_zero_frequency_treated_as_one(optimizer):
    w, idx, g, _, st = make_case(23, 5, 30, torch.float64, optimizer)
    kw = dict(lr=0.1, lam=3.0, optimizer=optimizer)
    zero = torch.zeros(23, dtype=torch.int64)
    fractional = torch.full((23,), 0.25, dtype=torch.float64)
    negative = torch.full((23,), -4, dtype=torch.int64)
    w1, s1 = run_ops(w, idx, g, torch.ones(23, dtype=torch.int64), st, **kw)
    for f in (zero, fractional, negative):
        w2, s2 = run_ops(w, idx, g, f, st, **kw)
        assert torch.isfinite(w2).all()
        assert torch.equal(w1, w2)
        if st is not None:
            assert torch.equal(s1, s2)


def test_update_deterministic_across_threads():
    w, idx, g, f, st = make_case(3000, 32, 200_000, torch.float32, "adagrad_rowwise", hot=50)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 1, threads):
            torch.set_num_threads(n)
            results.append(run_ops(w, idx, g, f, st, lr=0.1, lam=0.2, optimizer="adagrad_rowwise"))
    finally:
        torch.set_num_threads(threads)
    for w_i, s_i in results[1:]:
        assert torch.equal(w_i, results[0][0])
        assert torch.equal(s_i, results[0][1])


def test_update_large_sort():
    # enough indices for the parallel multi-chunk sort, two radix passes
    w, idx, g, f, st = make_case(5000, 3, 70_000, torch.float64, "adagrad", index_dtype=torch.int32)
    kw = dict(lr=0.1, lam=0.2, optimizer="adagrad", padding_idx=17)
    w_ops, s_ops = run_ops(w, idx, g, f, st, **kw)
    w_ref, s_ref = run_ref(w, idx, g, f, st, **kw)
    assert_close(w_ops, w_ref, torch.float64)
    assert_close(s_ops, s_ref, torch.float64)


def test_update_returns_weight_and_ignores_grad_mode():
    emb = nn.Embedding(10, 3)
    out = din_ops.mba_sparse_update_(emb.weight, torch.tensor([1, 2]), torch.ones(2, 3), torch.ones(10),
                                     lr=0.1, lam=0.0)
    assert out is emb.weight


def test_direct_op_checks_index_range():
    w = torch.randn(8, 4)
    keep = w.clone()
    for bad in (torch.tensor([1, 8]), torch.tensor([-1, 2]), torch.tensor([2**40])):
        with pytest.raises(RuntimeError, match="indices"):
            ops.mba_sparse_update_(w, bad, torch.ones(bad.numel(), 4), torch.ones(8), None, 0.1, 0.1, "sgd",
                                   None, 1e-10)
        with pytest.raises(RuntimeError, match="indices"):
            ops.mba_penalty(w, bad, torch.ones(8), 0.1, None)
        with pytest.raises(RuntimeError, match="indices"):
            ops.mba_penalty_backward(torch.tensor(1.0), w, bad, torch.ones(8), 0.1, None)
    assert torch.equal(w, keep)


# --- penalty -----------------------------------------------------------------------------------
def expected_penalty_grad(weight, indices, freq, lam, padding_idx=None):
    """lam / max(n_j, 1) * w_j on distinct present rows, zero elsewhere (float64)."""
    out = torch.zeros_like(weight, dtype=torch.float64)
    N = weight.shape[0]
    pad = None if padding_idx is None else padding_idx % N
    for j in set(indices.tolist()):
        if j != pad:
            out[j] = lam / max(float(freq[j]), 1.0) * weight[j].double()
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("N,D,M,hot,padding_idx", [(53, 7, 97, None, None), (53, 7, 97, 5, 3),
                                                   (101, 1, 13, None, -1), (29, 67, 23, 11, 0)])
def test_penalty_value_and_grad(dtype, N, D, M, hot, padding_idx):
    w, idx, _, f, _ = make_case(N, D, M, dtype, hot=hot)
    lam = 0.7
    p_ops = din_ops.mba_penalty(w, idx, f, lam, padding_idx)
    p_ref = ref.mba_penalty(w, idx, f, lam, padding_idx)
    assert p_ops.dtype == dtype and p_ops.dim() == 0
    assert_close(p_ops, p_ref, dtype)

    wg = w.clone().requires_grad_()
    din_ops.mba_penalty(wg, idx, f, lam, padding_idx).backward()
    expected = expected_penalty_grad(w, idx, f, lam, padding_idx)
    torch.testing.assert_close(wg.grad.double(), expected, **TOL[dtype])
    present = torch.zeros(N, dtype=torch.bool)
    present[idx.long()] = True
    if padding_idx is not None:
        present[padding_idx % N] = False
    assert torch.equal(wg.grad[~present], torch.zeros_like(wg.grad[~present]))  # exactly zero
    # and the reference's autograd agrees
    wr = w.clone().requires_grad_()
    ref.mba_penalty(wr, idx, f, lam, padding_idx).backward()
    assert_close(wg.grad, wr.grad, dtype)


def test_penalty_grad_scaled_by_upstream():
    w, idx, _, f, _ = make_case(31, 4, 20, torch.float64)
    wg = w.clone().requires_grad_()
    (3.0 * din_ops.mba_penalty(wg, idx, f, 0.5)).backward()
    torch.testing.assert_close(wg.grad, 3.0 * expected_penalty_grad(w, idx, f, 0.5), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_penalty_half(dtype):
    w, idx, _, f, _ = make_case(43, 11, 50, dtype, hot=20)
    p = din_ops.mba_penalty(w, idx, f, 0.3, 2)
    p_ref = ref.mba_penalty(w.float(), idx, f, 0.3, 2)
    torch.testing.assert_close(p.float(), p_ref, **TOL[dtype])
    wg = w.clone().requires_grad_()
    din_ops.mba_penalty(wg, idx, f, 0.3, 2).backward()
    torch.testing.assert_close(wg.grad.double(), expected_penalty_grad(w, idx, f, 0.3, 2), **TOL[dtype])


def test_penalty_gradcheck():
    w, idx, _, f, _ = make_case(13, 5, 17, torch.float64, hot=8)
    w.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: din_ops.mba_penalty(t, idx, f, 0.9, 2), (w,))


def test_penalty_zero_frequency_and_empty():
    w, idx, _, _, _ = make_case(19, 4, 25, torch.float32)
    zero = torch.zeros(19, dtype=torch.int64)
    wg = w.clone().requires_grad_()
    p = din_ops.mba_penalty(wg, idx, zero, 2.0)
    p.backward()
    assert torch.isfinite(p) and torch.isfinite(wg.grad).all()
    torch.testing.assert_close(p, ref.mba_penalty(w, idx, torch.ones(19), 2.0), **TOL[torch.float32])
    wg.grad = None
    p = din_ops.mba_penalty(wg, torch.empty(0, dtype=torch.int64), zero, 2.0)
    p.backward()
    assert p.item() == 0.0 and torch.equal(wg.grad, torch.zeros_like(w))


# --- opcheck -----------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_opcheck_update(optimizer):
    w, idx, g, f, st = make_case(23, 6, 31, torch.float32, optimizer, hot=10)
    torch.library.opcheck(ops.mba_sparse_update_.default, (w, idx, g, f, st, 0.1, 0.2, optimizer, 1, 1e-10))


def test_opcheck_penalty():
    w, idx, _, f, _ = make_case(23, 6, 31, torch.float64, hot=10)
    torch.library.opcheck(ops.mba_penalty.default, (w.requires_grad_(), idx, f, 0.4, None))
    torch.library.opcheck(ops.mba_penalty.default, (w, idx, f, 0.4, -2))
    torch.library.opcheck(ops.mba_penalty_backward.default, (torch.tensor(1.5, dtype=torch.float64), w.detach(),
                                                             idx, f, 0.4, 3))


# --- bad inputs --------------------------------------------------------------------------------
def _good_update_args(optimizer="sgd"):
    w, idx, g, f, st = make_case(11, 4, 9, torch.float32, optimizer)
    return dict(weight=w, indices=idx, grad=g, freq=f, lr=0.1, lam=0.1, optimizer=optimizer, state=st,
                padding_idx=None, eps=1e-10)


def _call_update(a):
    a = dict(a)
    return din_ops.mba_sparse_update_(a.pop("weight"), a.pop("indices"), a.pop("grad"), a.pop("freq"), **a)


BAD_UPDATE = [
    ("out-of-range index", "sgd", dict(indices=torch.tensor([0, 11, 2, 3, 4, 5, 6, 7, 8])), ValueError, "indices"),
    ("negative index", "sgd", dict(indices=torch.tensor([0, -1, 2, 3, 4, 5, 6, 7, 8])), ValueError, "indices"),
    ("float indices", "sgd", dict(indices=torch.zeros(9)), ValueError, "indices"),
    ("2-D indices", "sgd", dict(indices=torch.zeros(9, 1, dtype=torch.int64)), ValueError, "indices"),
    ("1-D weight", "sgd", dict(weight=torch.zeros(11)), ValueError, "weight"),
    ("integer weight", "sgd", dict(weight=torch.zeros(11, 4, dtype=torch.int64)), ValueError, "weight"),
    ("non-contiguous weight", "sgd", dict(weight=torch.zeros(4, 11).t()), ValueError, "weight"),
    ("grad rows", "sgd", dict(grad=torch.zeros(8, 4)), ValueError, "grad"),
    ("grad width", "sgd", dict(grad=torch.zeros(9, 5)), ValueError, "grad"),
    ("grad dtype", "sgd", dict(grad=torch.zeros(9, 4, dtype=torch.float64)), ValueError, "grad"),
    ("freq shape", "sgd", dict(freq=torch.ones(10)), ValueError, "freq"),
    ("freq 2-D", "sgd", dict(freq=torch.ones(11, 1)), ValueError, "freq"),
    ("freq dtype", "sgd", dict(freq=torch.ones(11, dtype=torch.bool)), ValueError, "freq"),
    ("freq device", "sgd", dict(freq=torch.ones(11, device="meta")), ValueError, "freq"),
    ("grad device", "sgd", dict(grad=torch.ones(9, 4, device="meta")), ValueError, "grad"),
    ("state with sgd", "sgd", dict(state=torch.zeros(11)), ValueError, "state"),
    ("missing state", "adagrad", dict(state=None), ValueError, "state"),
    ("adagrad state shape", "adagrad", dict(state=torch.zeros(11)), ValueError, "state"),
    ("rowwise state shape", "adagrad_rowwise", dict(state=torch.zeros(11, 4)), ValueError, "state"),
    ("rowwise state length", "adagrad_rowwise", dict(state=torch.zeros(12)), ValueError, "state"),
    ("state dtype", "adagrad_rowwise", dict(state=torch.zeros(11, dtype=torch.int64)), ValueError, "state"),
    ("state dtype float64", "adagrad", dict(state=torch.zeros(11, 4, dtype=torch.float64)), ValueError, "state"),
    ("non-contiguous state", "adagrad", dict(state=torch.zeros(4, 11).t()), ValueError, "state"),
    ("negative lr", "sgd", dict(lr=-0.1), ValueError, "lr"),
    ("nan lr", "sgd", dict(lr=float("nan")), ValueError, "lr"),
    ("tensor lr", "sgd", dict(lr=torch.tensor(0.1)), TypeError, "lr"),
    ("negative lam", "sgd", dict(lam=-1.0), ValueError, "lam"),
    ("inf lam", "sgd", dict(lam=float("inf")), ValueError, "lam"),
    ("zero eps", "adagrad", dict(eps=0.0), ValueError, "eps"),
    ("unknown optimizer", "sgd", dict(optimizer="adam"), ValueError, "optimizer"),
    ("padding_idx too large", "sgd", dict(padding_idx=11), ValueError, "padding_idx"),
    ("padding_idx too small", "sgd", dict(padding_idx=-12), ValueError, "padding_idx"),
    ("padding_idx float", "sgd", dict(padding_idx=1.0), TypeError, "padding_idx"),
    ("weight not a tensor", "sgd", dict(weight=[[0.0]]), TypeError, "weight"),
]


@pytest.mark.parametrize("what,optimizer,change,exc,name", BAD_UPDATE, ids=[b[0] for b in BAD_UPDATE])
def test_bad_update_inputs(what, optimizer, change, exc, name):
    args = _good_update_args(optimizer)
    weight = args["weight"]
    keep = weight.clone()
    args.update(change)
    with pytest.raises(exc, match=name):
        _call_update(args)
    assert torch.equal(weight, keep)  # nothing ran


BAD_PENALTY = [
    ("out-of-range index", dict(indices=torch.tensor([3, 11])), "indices"),
    ("float indices", dict(indices=torch.tensor([1.0])), "indices"),
    ("freq shape", dict(freq=torch.ones(12)), "freq"),
    ("weight 3-D", dict(weight=torch.ones(11, 4, 1)), "weight"),
    ("negative lam", dict(lam=-0.5), "lam"),
    ("padding_idx", dict(padding_idx=20), "padding_idx"),
    ("device", dict(indices=torch.tensor([1], device="meta")), "indices"),
]


@pytest.mark.parametrize("what,change,name", BAD_PENALTY, ids=[b[0] for b in BAD_PENALTY])
def test_bad_penalty_inputs(what, change, name):
    args = dict(weight=torch.randn(11, 4), indices=torch.tensor([1, 2, 2]), freq=torch.ones(11), lam=0.1,
                padding_idx=None)
    args.update(change)
    with pytest.raises(ValueError, match=name):
        din_ops.mba_penalty(**args)


# --- frequencies -------------------------------------------------------------------------------
def test_count_frequencies_tensor():
    x = torch.randint(0, 50, (16, 9))
    torch.testing.assert_close(din_ops.count_frequencies(x, 60), torch.bincount(x.reshape(-1), minlength=60))
    expected = torch.bincount(x.reshape(-1), minlength=60)
    expected[4] = 0
    n = din_ops.count_frequencies(x.to(torch.int32), 60, padding_idx=4)
    assert n.dtype == torch.int64
    assert torch.equal(n, expected)
    assert torch.equal(n, ref.count_frequencies(x, 60, padding_idx=4))


def test_count_frequencies_iterable():
    batches = [torch.randint(0, 30, (5, 4)) for _ in range(7)]
    every = torch.cat([b.reshape(-1) for b in batches])
    assert torch.equal(din_ops.count_frequencies(iter(batches), 30), torch.bincount(every, minlength=30))
    # batches of (history, target, label): pick the index tensors with key=
    data = [(b, b[:, 0], torch.rand(5)) for b in batches]
    both = torch.cat([every, torch.cat([b[:, 0] for b in batches])])
    n = din_ops.count_frequencies(data, 30, key=lambda batch: batch[:2])
    assert torch.equal(n, torch.bincount(both, minlength=30))
    n = din_ops.count_frequencies([(b, b[:, 0]) for b in batches], 30, padding_idx=-1)
    expected = torch.bincount(both, minlength=30)
    expected[29] = 0
    assert torch.equal(n, expected)
    assert torch.equal(din_ops.count_frequencies([], 5), torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="integer"):
        din_ops.count_frequencies(data, 30)  # the labels are float
    with pytest.raises(TypeError, match="key"):
        din_ops.count_frequencies([{"ids": batches[0]}], 30)


def test_frequency_counter_online():
    counter = din_ops.FrequencyCounter(40, padding_idx=0)
    seen = []
    for _ in range(5):
        b = torch.randint(0, 40, (13,))
        counter.update(b)
        seen.append(b)
        expected = torch.bincount(torch.cat(seen), minlength=40)
        expected[0] = 0
        assert torch.equal(counter.counts, expected)
    assert counter.total == int(expected.sum())
    with pytest.raises(ValueError, match="indices"):
        counter.update(torch.tensor([40]))
    with pytest.raises(ValueError, match="indices"):
        counter.update(torch.tensor([-1]))
    with pytest.raises(ValueError, match="num_embeddings"):
        din_ops.FrequencyCounter(-3)
    sd = counter.state_dict()
    other = din_ops.FrequencyCounter(40, padding_idx=0)
    other.load_state_dict(sd)
    assert torch.equal(other.counts, counter.counts) and other.total == counter.total
    counter.reset()
    assert counter.total == 0 and int(counter.counts.sum()) == 0


# --- optimizers ------------------------------------------------------------------------------
def _sparse_grad_step(emb, x):
    emb.zero_grad(set_to_none=True)
    emb(x).pow(2).sum().backward()
    assert emb.weight.grad.is_sparse


def test_mbasgd_without_lam_equals_sgd():
    torch.manual_seed(1)
    a = nn.Embedding(30, 5, sparse=True)
    b = nn.Embedding(30, 5, sparse=True)
    b.load_state_dict(a.state_dict())
    opt_a = MBASGD(a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    for _ in range(3):
        x = torch.randint(0, 30, (4, 6))
        _sparse_grad_step(a, x)
        _sparse_grad_step(b, x)
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-6, atol=1e-6)


def test_mbaadagrad_without_lam_equals_adagrad():
    torch.manual_seed(2)
    a = nn.Embedding(30, 5, sparse=True)
    b = nn.Embedding(30, 5, sparse=True)
    b.load_state_dict(a.state_dict())
    opt_a = MBAAdagrad(a.parameters(), lr=0.1, rowwise=False, initial_accumulator_value=0.1)
    opt_b = torch.optim.Adagrad(b.parameters(), lr=0.1, initial_accumulator_value=0.1)
    for _ in range(3):
        x = torch.randint(0, 30, (4, 6))
        _sparse_grad_step(a, x)
        _sparse_grad_step(b, x)
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_optimizer_step_matches_reference(optimizer):
    """Given frequencies: one step is eq. 2.4 on the coalesced sparse gradient."""
    emb = nn.Embedding(40, 6, sparse=True, padding_idx=3).double()
    freq = torch.randint(0, 5, (40,))
    w0 = emb.weight.detach().clone()
    if optimizer == "sgd":
        opt = MBASGD([emb.weight], lr=0.2, lam=0.5, frequencies={emb.weight: freq},
                     padding_idx=embedding_padding(emb))
        state = None
    else:
        rowwise = optimizer == "adagrad_rowwise"
        opt = MBAAdagrad([{"params": [emb.weight], "frequencies": freq, "padding_idx": 3}], lr=0.2, lam=0.5,
                         rowwise=rowwise, initial_accumulator_value=0.3)
        state = torch.full((40,) if rowwise else (40, 6), 0.3, dtype=torch.float64)
    x = torch.randint(0, 40, (5, 8))
    _sparse_grad_step(emb, x)
    grad = emb.weight.grad.coalesce()
    opt.step()
    w_ref, s_ref = run_ref(w0, grad._indices()[0], grad._values(), freq, state, lr=0.2, lam=0.5,
                           optimizer=optimizer, padding_idx=3)
    torch.testing.assert_close(emb.weight.detach(), w_ref, rtol=1e-12, atol=1e-12)
    if state is not None:
        torch.testing.assert_close(opt.state[emb.weight]["sum"], s_ref, rtol=1e-12, atol=1e-12)
    assert opt.frequencies(emb.weight) is freq


def test_optimizer_online_frequencies():
    emb = nn.Embedding(25, 3, sparse=True, padding_idx=0)
    opt = MBASGD(emb.parameters(), lr=0.1, lam=0.1, padding_idx=0)
    xs = [torch.randint(0, 25, (3, 4)) for _ in range(4)]
    for x in xs:
        _sparse_grad_step(emb, x)
        opt.step()
    expected = torch.bincount(torch.cat([x.reshape(-1) for x in xs]), minlength=25)
    expected[0] = 0
    assert torch.equal(opt.frequencies(emb.weight), expected)


def test_optimizer_dense_params_and_errors():
    lin = nn.Linear(4, 3)
    w0 = lin.weight.detach().clone()
    opt = MBASGD(lin.parameters(), lr=0.5, weight_decay=0.1)
    lin(torch.ones(2, 4)).sum().backward()
    g = lin.weight.grad.clone()
    opt.step()
    torch.testing.assert_close(lin.weight.detach(), w0 - 0.5 * (g + 0.1 * w0))
    with pytest.raises(ValueError, match="lr"):
        MBASGD(lin.parameters(), lr=-1.0)
    with pytest.raises(ValueError, match="lam"):
        MBAAdagrad(lin.parameters(), lam=-1.0)
    with pytest.raises(ValueError, match="eps"):
        MBAAdagrad(lin.parameters(), eps=0.0)
    with pytest.raises(TypeError, match="frequencies"):
        MBASGD(lin.parameters(), lr=0.1, frequencies=torch.ones(3))


class TinyDIN(nn.Module):
    """Item and category embeddings (sparse gradients), sum-pooled history, MLP, logit."""

    def __init__(self, n_items, n_cats, D=8):
        super().__init__()
        self.item = nn.Embedding(n_items, D, sparse=True, padding_idx=0)
        self.cat = nn.Embedding(n_cats, D, sparse=True, padding_idx=0)
        self.mlp = nn.Sequential(nn.Linear(4 * D, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, hist_item, hist_cat, cand_item, cand_cat):
        hist = torch.cat([self.item(hist_item), self.cat(hist_cat)], -1).sum(1)  # padding rows are 0
        cand = torch.cat([self.item(cand_item), self.cat(cand_cat)], -1)
        return self.mlp(torch.cat([hist, cand], -1)).squeeze(-1)


def _din_batch(gen, B, n_items=200, n_cats=11, T=8):
    """Clicks iff the candidate's category is one of the user's two favourite categories."""
    cat_of = lambda i: 1 + i % (n_cats - 1)  # noqa: E731  (item 0 / category 0 are padding)
    fav = torch.randint(1, n_cats, (B, 2), generator=gen)
    lengths = torch.randint(3, T + 1, (B,), generator=gen)
    hist_cat = fav.gather(1, torch.randint(0, 2, (B, T), generator=gen))
    hist_item = hist_cat + (n_cats - 1) * torch.randint(0, (n_items - 1) // (n_cats - 1), (B, T), generator=gen)
    pad = torch.arange(T)[None] >= lengths[:, None]
    hist_item[pad], hist_cat[pad] = 0, 0
    cand_item = torch.randint(1, n_items, (B,), generator=gen)
    cand_cat = cat_of(cand_item)
    label = ((cand_cat[:, None] == fav).any(1)).float()
    return (hist_item, hist_cat, cand_item, cand_cat), label


@pytest.mark.parametrize("make_opt", [
    lambda m: MBASGD(m.parameters(), lr=0.05, lam=1e-3, padding_idx=embedding_padding(m)),
    lambda m: MBAAdagrad(m.parameters(), lr=0.05, lam=1e-3, rowwise=True, padding_idx=embedding_padding(m)),
    lambda m: MBAAdagrad(m.parameters(), lr=0.05, lam=1e-3, rowwise=False, padding_idx=embedding_padding(m)),
], ids=["MBASGD", "MBAAdagrad-rowwise", "MBAAdagrad"])
def test_din_trains_with_mba(make_opt):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = TinyDIN(200, 11)
    opt = make_opt(model)
    eval_x, eval_y = _din_batch(torch.Generator().manual_seed(123), 512)
    loss_fn = nn.BCEWithLogitsLoss()
    with torch.no_grad():
        before = loss_fn(model(*eval_x), eval_y).item()
    pad_rows = (model.item.weight[0].clone(), model.cat.weight[0].clone())
    for _ in range(150):
        x, y = _din_batch(gen, 64)
        opt.zero_grad()
        loss_fn(model(*x), y).backward()
        assert model.item.weight.grad.is_sparse
        opt.step()
    with torch.no_grad():
        after = loss_fn(model(*eval_x), eval_y).item()
    assert after < 0.8 * before, (before, after)
    assert torch.equal(model.item.weight[0], pad_rows[0]) and torch.equal(model.cat.weight[0], pad_rows[1])
    n = opt.frequencies(model.item.weight)
    assert n is not None and int(n.sum()) > 0 and int(n[0]) == 0


# --- Triton ------------------------------------------------------------------------------------
TRITON = triton_backends()


@pytest.mark.parametrize("device,backend", TRITON)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N,D,M,hot,padding_idx", [(37, 7, 45, 9, 2), (13, 33, 20, None, -1)])
def test_triton_update_matches_reference(device, backend, optimizer, dtype, N, D, M, hot, padding_idx):
    w, idx, g, f, st = make_case(N, D, M, dtype, optimizer, hot=hot, device=device)
    kw = dict(lr=0.3, lam=0.7, optimizer=optimizer, padding_idx=padding_idx)
    with din_ops.backend(backend):
        w_tr, s_tr = run_ops(w, idx, g, f, st, **kw)
    w_ref, s_ref = (run_ref if dtype == torch.float32 else run_ref_fp32)(w, idx, g, f, st, **kw)
    tol = dict(rtol=2e-6, atol=2e-6) if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(w_tr, w_ref, **tol)
    if st is not None:
        torch.testing.assert_close(s_tr, s_ref, **tol)
    absent = torch.ones(N, dtype=torch.bool, device=device)
    absent[idx] = False
    absent[padding_idx % N] = True
    assert torch.equal(w_tr[absent], w[absent])
    if st is not None:
        assert torch.equal(s_tr[absent], st[absent])


@pytest.mark.parametrize("device,backend", TRITON)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_triton_update_wide_rows_and_fp64(device, backend, optimizer):
    # D above the kernel's 1024-wide block: the chunked path (two passes for row-wise Adagrad)
    w, idx, g, f, st = make_case(9, 1100, 12, torch.float64, optimizer, hot=5, device=device)
    kw = dict(lr=0.3, lam=0.7, optimizer=optimizer, padding_idx=1)
    with din_ops.backend(backend):
        w_tr, s_tr = run_ops(w, idx, g, f, st, **kw)
    w_ref, s_ref = run_ref(w, idx, g, f, st, **kw)
    torch.testing.assert_close(w_tr, w_ref, rtol=1e-12, atol=1e-12)
    if st is not None:
        torch.testing.assert_close(s_tr, s_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device,backend", TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_penalty_and_grad(device, backend, dtype):
    w, idx, _, f, _ = make_case(41, 10, 50, dtype, hot=15, device=device)
    with din_ops.backend(backend):
        wg = w.clone().requires_grad_()
        p = din_ops.mba_penalty(wg, idx, f, 0.6, 4)
        p.backward()
        p_empty = din_ops.mba_penalty(w, idx[:0], f, 0.6, 4)
    p_ref = ref.mba_penalty(w.float(), idx, f, 0.6, 4)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(p.float(), p_ref, **tol)
    expected = expected_penalty_grad(w.cpu(), idx.cpu(), f.cpu(), 0.6, 4)
    torch.testing.assert_close(wg.grad.cpu().double(), expected, **tol)
    assert torch.equal(wg.grad.cpu()[expected.abs().sum(1) == 0].double(), expected[expected.abs().sum(1) == 0])
    assert p_empty.item() == 0.0


@pytest.mark.parametrize("device,backend", TRITON)
def test_triton_deterministic(device, backend):
    w, idx, g, f, st = make_case(40, 16, 300, torch.float32, "adagrad_rowwise", hot=6, device=device)
    with din_ops.backend(backend):
        a = run_ops(w, idx, g, f, st, lr=0.1, lam=0.2, optimizer="adagrad_rowwise")
        b = run_ops(w, idx, g, f, st, lr=0.1, lam=0.2, optimizer="adagrad_rowwise")
        pa = din_ops.mba_penalty(w, idx, f, 0.3)
        pb = din_ops.mba_penalty(w, idx, f, 0.3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(pa, pb)
    torch.testing.assert_close(a[0], run_ref(w, idx, g, f, st, lr=0.1, lam=0.2, optimizer="adagrad_rowwise")[0],
                               rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("device,backend", TRITON)
def test_triton_empty_batch_and_range_check(device, backend):
    w, _, _, f, st = make_case(10, 4, 0, torch.float32, "adagrad", device=device)
    keep = w.clone()
    with din_ops.backend(backend):
        din_ops.mba_sparse_update_(w, torch.empty(0, dtype=torch.int64, device=device),
                                   torch.empty(0, 4, device=device), f, lr=0.1, lam=0.1, optimizer="adagrad",
                                   state=st)
        assert torch.equal(w, keep)
        if device == "cpu":  # CPU tensors are read on the host: an error like the C++ kernels'
            with pytest.raises(RuntimeError, match="indices"):
                ops.mba_sparse_update_(w, torch.tensor([3, 10], device=device), torch.ones(2, 4, device=device), f,
                                       st, 0.1, 0.1, "adagrad", None, 1e-10)
            assert torch.equal(w, keep)


@pytest.mark.parametrize("device,backend", TRITON)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_triton_skips_rows_out_of_range(device, backend, optimizer, monkeypatch):
    """What a direct op call on CUDA tensors gets (the launchers read no index on the host): rows
    outside [0, num_embeddings) are skipped by the kernels, the others are updated exactly."""
    from din_ops.triton import mba as tmba
    monkeypatch.setattr(tmba, "_CHECK_CPU_VALUES", False)
    monkeypatch.setattr(tmba, "PIECE", 4)
    w, idx, g, f, st = make_case(12, 5, 40, torch.float32, optimizer, hot=9, device=device)
    bad = torch.tensor([12, -1, 2**40, -2**40, 12, 13], device=device)
    idx_bad = torch.cat([bad[:3], idx[:20], bad[3:], idx[20:]])
    g_bad = torch.cat([torch.randn(3, 5, device=device), g[:20], torch.randn(3, 5, device=device), g[20:]])
    kw = dict(lr=0.3, lam=0.7, optimizer=optimizer, padding_idx=1)
    with din_ops.backend(backend):
        ws, ss = w.clone(), None if st is None else st.clone()
        ops.mba_sparse_update_(ws, idx_bad, g_bad, f, ss, 0.3, 0.7, optimizer, 1, 1e-10)
        p = ops.mba_penalty(w, idx_bad, f, 0.6, 1)
        gp = ops.mba_penalty_backward(torch.ones((), device=device), w, idx_bad, f, 0.6, 1)
    w_ref, s_ref = run_ref(w, idx, g, f, st, **kw)
    torch.testing.assert_close(ws, w_ref, rtol=2e-6, atol=2e-6)
    if st is not None:
        torch.testing.assert_close(ss, s_ref, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(p, ref.mba_penalty(w, idx, f, 0.6, 1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gp.double(), expected_penalty_grad(w.cpu(), idx.cpu(), f.cpu(), 0.6, 1).to(device),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device,backend", TRITON)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("D", [7, 1030])
def test_triton_hot_rows_two_level_sum(device, backend, optimizer, D, monkeypatch):
    # rows hit more than PIECE times are summed piece by piece, then the pieces in order
    from din_ops.triton import mba as tmba
    monkeypatch.setattr(tmba, "PIECE", 4)
    w, idx, g, f, st = make_case(11, D, 45, torch.float32, optimizer, hot=4, device=device)
    idx[-5:] = 9  # one cold row among the hot ones
    kw = dict(lr=0.3, lam=0.7, optimizer=optimizer, padding_idx=1)
    with din_ops.backend(backend):
        a = run_ops(w, idx, g, f, st, **kw)
        b = run_ops(w, idx, g, f, st, **kw)
    w_ref, s_ref = run_ref(w, idx, g, f, st, **kw)
    torch.testing.assert_close(a[0], w_ref, rtol=2e-6, atol=2e-6)
    if st is not None:
        torch.testing.assert_close(a[1], s_ref, rtol=2e-6, atol=2e-6)
        assert torch.equal(a[1], b[1])
    assert torch.equal(a[0], b[0])


@pytest.mark.parametrize("device,backend", TRITON)
@pytest.mark.parametrize("piece", [2, 3, 5])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_triton_device_segmentation(device, backend, piece, optimizer, monkeypatch):
    """The sorted batch is cut into fixed blocks of PIECE positions: runs of exactly PIECE (cold),
    PIECE + 1 (the shortest hot run), runs starting mid-block and spanning several blocks, the
    padding row among hot ones, and the last partial block; each seed shuffles the batch."""
    from din_ops.triton import mba as tmba
    monkeypatch.setattr(tmba, "PIECE", piece)
    counts = {0: piece, 1: piece + 1, 2: 1, 3: 4 * piece + 1, 4: 2, 5: 3 * piece - 1, 7: piece + 1, 8: 1}
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        idx = torch.tensor([j for j, c in counts.items() for _ in range(c)])
        idx = idx[torch.randperm(idx.numel(), generator=gen)].to(device)
        w, _, _, f, st = make_case(10, 3, 0, torch.float32, optimizer, device=device, seed=seed)
        g = torch.randn(idx.numel(), 3, generator=gen).to(device)
        for pad in (None, 3):
            kw = dict(lr=0.3, lam=0.7, optimizer=optimizer, padding_idx=pad)
            with din_ops.backend(backend):
                w_tr, s_tr = run_ops(w, idx, g, f, st, **kw)
                p = din_ops.mba_penalty(w, idx, f, 0.6, pad)
            w_ref, s_ref = run_ref(w, idx, g, f, st, **kw)
            torch.testing.assert_close(w_tr, w_ref, rtol=2e-6, atol=2e-6)
            if st is not None:
                torch.testing.assert_close(s_tr, s_ref, rtol=2e-6, atol=2e-6)
            torch.testing.assert_close(p, ref.mba_penalty(w, idx, f, 0.6, pad), rtol=1e-6, atol=1e-6)
            assert torch.equal(w_tr[6], w[6]) and torch.equal(w_tr[9], w[9])  # absent rows


# --- every CPU code path: run-time ISA choice, dtypes, vector-loop tails -------------------------------
def check_paths():
    """The update (every optimizer, state in fp32 and in the table's dtype, hot and cold rows) and
    the penalty with its gradient, fp32/bf16/fp16, D around the vector widths, on whichever
    kernels DIN_OPS_CPU_ISA selects; NaN in a gradient row reaches only its table row."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ref_fn = run_ref if dtype == torch.float32 else run_ref_fp32
        for D in (1, 15, 16, 17, 33, 64):
            for optimizer in OPTIMIZERS:
                for state_low in (False, True):
                    w, idx, g, f, st = make_case(97, D, 300, dtype, optimizer, hot=40, seed=D)
                    if st is None and state_low:
                        continue
                    if state_low:
                        st = st.to(dtype)
                    kw = dict(lr=0.1, lam=0.5, optimizer=optimizer, padding_idx=3)
                    w_ops, s_ops = run_ops(w, idx, g, f, st, **kw)
                    w_ref, s_ref = ref_fn(w, idx, g, f, st, **kw)
                    assert w_ops.dtype == dtype
                    assert_close(w_ops, w_ref, dtype)
                    if st is not None:
                        torch.testing.assert_close(s_ops.float(), s_ref.float(), **TOL[dtype])
            w, idx, _, f, _ = make_case(97, D, 300, dtype, hot=40, seed=D)
            p = din_ops.mba_penalty(w, idx, f, 0.3, 2)
            torch.testing.assert_close(p.float(), ref.mba_penalty(w.float(), idx, f, 0.3, 2), **TOL[dtype])
            wg = w.clone().requires_grad_()
            din_ops.mba_penalty(wg, idx, f, 0.3, 2).backward()
            torch.testing.assert_close(wg.grad.double(), expected_penalty_grad(w, idx, f, 0.3, 2), **TOL[dtype])
        w, idx, g, f, _ = make_case(20, 17, 30, dtype, seed=1)
        g[5, 16] = float("nan")
        w_ops, _ = run_ops(w, idx, g, f, None, lr=0.1, lam=0.5, optimizer="sgd")
        w_ref, _ = run_ref(w.float(), idx, g.float(), f, None, lr=0.1, lam=0.5, optimizer="sgd")
        assert torch.equal(torch.isnan(w_ops), torch.isnan(w_ref))


@pytest.mark.parametrize("isa", ["native", "avx512", "avx2", "base"])
def test_kernel_paths_match_reference(isa):
    """The widest kernels this CPU runs and the narrower builds DIN_OPS_CPU_ISA forces (avx512,
    avx2, base: the portable loops), fp32/bf16/fp16, D not a multiple of the vector width."""
    if isa == "native":
        check_paths()
        return
    import os
    import subprocess
    import sys
    import textwrap
    script = textwrap.dedent("""
        import sys
        sys.path.insert(0, %r)
        import test_mba
        test_mba.check_paths()
    """) % os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, "-c", script], check=True, env=dict(os.environ, DIN_OPS_CPU_ISA=isa))
