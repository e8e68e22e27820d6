"""Sizes past 2^31 elements: every offset into keys, tables and gradients must be 64-bit.

Fast tests (always run) reach element offsets past 2^31 without gigabytes of data: the big
tensor comes from ``torch.empty`` and only the rows a kernel touches are written, so the system
commits only those pages and the rest stays address space. They cover the C++ padded forward
(it reads valid positions only), the Triton attention kernels on rows that start past element
2^31 (interpreted on CPU, where int32 arithmetic wraps as it does on the GPU) and the MBA update
and penalty of both backends (they touch the batch's rows only). They skip where the system
refuses to reserve the address space.

The ``large`` tests are opt-in: real data of 4-9 GB (bf16 keys, tables and Dice inputs with more
than 2^31 elements, fp32 keys for the backward) through the C++ kernels, compared with
din_ops.reference on the rows around and past element 2^31. They are deselected by default
(pytest.ini) and run with::

    python -m pytest tests/test_large_sizes.py -m large -s

Each needs 14-19 GiB of available memory and skips when there is less; they take minutes. With
``-s`` each prints its errors, wall time and peak resident memory.
"""
import contextlib
import resource
import time

import pytest
import torch

import din_ops
from din_ops import reference as ref

TWO31 = 2 ** 31
ATT = ("sigmoid", (16, 8))  # a small attention MLP: the cost is in the keys, not the MLP


# --- helpers ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _no_fill():
    # deterministic mode may fill torch.empty's memory, which would commit every page
    det = torch.utils.deterministic
    prev = det.fill_uninitialized_memory
    det.fill_uninitialized_memory = False
    try:
        yield
    finally:
        det.fill_uninitialized_memory = prev


def _virtual(shape, dtype, device="cpu"):
    """An uninitialized tensor; on CPU only the pages that get written cost memory."""
    try:
        with _no_fill():
            return torch.empty(shape, dtype=dtype, device=device)
    except (RuntimeError, MemoryError) as e:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        pytest.skip(f"cannot reserve {nbytes / 2**30:.1f} GiB for a tensor past 2^31 elements: {e}")


def _uniform(shape, dtype, gen):
    return (torch.rand(shape, generator=gen) * 2 - 1).to(dtype)


def _mlp(D, dtype, gen, hidden=ATT[1]):
    dims = [4 * D, *hidden, 1]
    W = [(torch.randn(o, i, generator=gen) / i ** 0.5).to(dtype) for i, o in zip(dims[:-1], dims[1:])]
    b = [(0.1 * torch.randn(o, generator=gen)).to(dtype) for o in dims[1:]]
    return W, b


def _err(got, want):
    """Max abs error relative to the largest magnitude of ``want``."""
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30)) if want.numel() else 0.0


def _check(errors, tol):
    print("  max errors: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"errors above {tol}: {bad}"


# --- fast: C++ padded forward, keys past element 2^31 --------------------------------------------
def test_cpp_padded_forward_rows_past_2_31():
    D, B, C = 256, 8, 2
    # row 7 starts 4 positions before element 2^31: 7 T D = 2^31 - 4 D
    T = (TWO31 // D - 4) // 7
    assert 7 * T * D == TWO31 - 4 * D
    keys = _virtual((B, T, D), torch.float32)  # 9.8 GB of address space; fp32: no upcast copy
    lengths = torch.zeros(B, dtype=torch.int64)
    lengths[0], lengths[7] = 3, 300
    g = torch.Generator().manual_seed(1)
    for b in (0, 7):
        keys[b, :lengths[b]] = _uniform((int(lengths[b]), D), torch.float32, g)
    query = torch.randn(B, C, D, generator=g)
    W, bias = _mlp(D, torch.float32, g)
    out, attn = din_ops.attention_pooling(query, keys, W, bias, lengths=lengths, activation=ATT[0],
                                          normalization="softmax", return_weights=True)
    errors = {}
    for b in range(B):
        n = int(lengths[b])
        if n == 0:
            assert not out[b].any() and not attn[b].any()
            continue
        ro, rw = ref.attention_pooling(query[b:b + 1], keys[b:b + 1, :n], W, bias, activation=ATT[0],
                                       normalization="softmax", return_weights=True)
        errors[f"out[{b}]"] = _err(out[b], ro[0])
        errors[f"attn[{b}]"] = _err(attn[b, :, :n], rw[0])
        assert not attn[b, :, n:].any()
    _check(errors, 1e-5)


# --- fast: Triton attention kernels on rows starting past element 2^31 --------------------------
def _triton_device():
    if torch.cuda.is_available():
        return "cuda"
    if not din_ops._library.triton_interpret():
        pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1")
    return "cpu"


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_triton_jagged_rows_past_2_31(normalization, monkeypatch):
    """The launchers are called directly: the public function wants offsets[0] == 0, and the
    interpreter could not walk 2^26 positions in test time. Rows start just before and past
    element 2^31 of keys; forward, backward and the softmax scratch (bf16) are all indexed there."""
    from din_ops.triton import attention_pooling as tap

    # offsets start at s0 here, which the CPU value check refuses: test the CUDA behaviour
    monkeypatch.setattr(tap, "_CHECK_CPU_VALUES", False)
    dev = _triton_device()
    D, C = 32, 2
    lens = [50, 1, 0, 37, 64]
    s0 = TWO31 // D - 20  # row 0 straddles element 2^31
    N = s0 + sum(lens) + 100
    dt = torch.bfloat16
    g = torch.Generator().manual_seed(2)
    offsets = torch.tensor([s0] + lens).cumsum(0)
    s1 = int(offsets[-1])
    keys = _virtual((N, D), dt, dev)
    keys[s0:s1] = _uniform((s1 - s0, D), dt, g).to(dev)
    query = _uniform((len(lens), C, D), dt, g).to(dev)
    W, bias = _mlp(D, dt, g)
    W, bias = [w.to(dev) for w in W], [x.to(dev) for x in bias]
    offs = offsets.to(dev)
    opts = (ATT[0], normalization, 1.0, 1e-8)
    with tap.configure(block_m=16, block_m_bwd=16):
        out, attn = tap.attention_pooling(query, keys, None, offs, W, bias, [], [], [], [], [], *opts)
        grad_out = _uniform(out.shape, dt, g).to(dev)
        grad_attn = _virtual(attn.shape, dt, dev)
        grad_attn[s0:s1] = _uniform((s1 - s0, C), dt, g).to(dev)
        dq, dk, dW, db = tap.attention_pooling_backward(
            grad_out, grad_attn, attn, query, keys, None, offs, W, bias, [], [], [], [], [], *opts)[:4]

    # reference: the same rows as their own batch, in float32
    leaves = [t.detach().float().cpu().requires_grad_() for t in [query, keys[s0:s1], *W, *bias]]
    rq, rk, rW, rb = leaves[0], leaves[1], leaves[2:2 + len(W)], leaves[2 + len(W):]
    ro, rw = ref.attention_pooling(rq, rk, rW, rb, offsets=offsets - s0, activation=ATT[0],
                                   normalization=normalization, return_weights=True)
    loss = (ro * grad_out.float().cpu()).sum() + (rw * grad_attn[s0:s1].float().cpu()).sum()
    grads = torch.autograd.grad(loss, leaves)
    errors = {"out": _err(out.cpu(), ro), "attn": _err(attn[s0:s1].cpu(), rw),
              "grad_query": _err(dq.cpu(), grads[0]), "grad_keys": _err(dk[s0:s1].cpu(), grads[1])}
    # with softmax the parameter gradients are sums that cancel (the output bias' is exactly 0),
    # where the bf16 rounding of the stored weights dominates: compared without softmax only
    if normalization == "none":
        for i, (w, b) in enumerate(zip(dW, db)):
            errors[f"grad_W{i}"] = _err(w.cpu(), grads[2 + i])
            errors[f"grad_b{i}"] = _err(b.cpu(), grads[2 + len(W) + i])
    _check(errors, 2e-2)  # bf16 outputs


# --- fast: the compiled Triton kernels index every big tensor with 64-bit offsets ----------------
# pointer arguments of tensors that can pass 2^31 elements, per kernel
_BIG = {
    "attention_pooling._fwd_kernel": {"q_ptr", "k_ptr", "out_ptr", "attn_ptr", "sbuf_ptr"},
    "attention_pooling._bwd_kernel": {"go_ptr", "ga_ptr", "attn_ptr", "q_ptr", "k_ptr", "dq_ptr", "dk_ptr",
                                      "dc_ptr"},
    "attention_pooling._stats_kernel": {"q_ptr", "k_ptr"},
    "attention_pooling._finish_kernel": {"dc_ptr", "q_ptr", "dq_ptr"},
    "dice._stats_kernel": {"x_ptr"},
    "dice._transform_kernel": {"x_ptr", "y_ptr"},
    "dice._bwd_reduce_kernel": {"x_ptr", "g_ptr"},
    "dice._bwd_dx_kernel": {"x_ptr", "g_ptr", "dx_ptr"},
    "mba._mba_pieces_kernel": {"grad_ptr", "partial_ptr"},
    "mba._mba_update_kernel": {"weight_ptr", "grad_ptr", "state_ptr", "partial_ptr"},
    "mba._mba_penalty_rows_kernel": {"weight_ptr"},
    "mba._mba_penalty_backward_kernel": {"weight_ptr", "out_ptr"},
}


def test_triton_compiled_offsets_are_64_bit():
    """Every kernel compiled for sm_90 (TTIR, in a process without the interpreter): the first
    offset added to each big tensor's pointer (the row part; in-tile offsets follow) is i64.
    Covers what the interpreter tests above cannot reach (padded layouts, Dice) and that the
    kernels compile for a GPU at all."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "triton_offsets.py")
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in found:
        pytest.skip(f"cannot compile Triton kernels for sm_90 here: {found['skip']}")
    assert set(found) >= set(_BIG), f"kernels not compiled: {sorted(set(_BIG) - set(found))}"
    narrow = {f"{k}:{a}": t for k, args in found.items() for a, t in args.items()
              if a in _BIG.get(k, ()) and t != ["i64"]}
    assert not narrow, f"32-bit row offsets: {narrow}"


# --- fast: MBA on table rows past element 2^31 -----------------------------------------------------
def _mba_backends():
    if torch.cuda.is_available():
        return ["cpp"]  # the CPU tables here are C++; Triton needs CUDA tensors there
    return ["cpp", "triton"]


@pytest.mark.parametrize("backend", _mba_backends())
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adagrad_rowwise"])
def test_mba_rows_past_2_31(backend, optimizer):
    D = 32
    r0 = TWO31 // D  # row r0 starts at element 2^31
    N = r0 + 64
    dt = torch.bfloat16
    g = torch.Generator().manual_seed(3)
    weight = _virtual((N, D), dt)
    freq = _virtual((N,), torch.int64)
    state = None
    if optimizer == "adagrad":
        state = _virtual((N, D), dt)
    elif optimizer == "adagrad_rowwise":
        state = _virtual((N,), torch.float32)
    pad = r0 + 1
    # occurrences per present row: r0 is hot (C++ sums runs of >= 16 first, Triton splits runs
    # of > 256 into pieces), the padding row occurs but is skipped
    occ = {3: 2, r0 - 1: 1, r0: 300, pad: 2, r0 + 5: 1, N - 1: 3}
    neighbours = [2, 4, r0 - 2, r0 + 2, r0 + 4, r0 + 6, N - 2]
    rows = sorted(set(occ) | set(neighbours))
    idx = torch.tensor(rows)
    weight[idx] = torch.randn(len(rows), D, generator=g).to(dt)
    freq[idx] = torch.randint(0, 5, (len(rows),), generator=g)
    if state is not None:
        state[idx] = torch.rand(state[idx].shape, generator=g).to(state.dtype)
    indices = torch.tensor([j for j, k in occ.items() for _ in range(k)])
    indices = indices[torch.randperm(indices.numel(), generator=g)]
    grad = torch.randn(indices.numel(), D, generator=g).to(dt)
    kw = dict(lr=0.1, lam=0.5, optimizer=optimizer, padding_idx=pad)

    # reference on the gathered rows (grad in float32: the reference sums duplicates in its dtype)
    small = {j: i for i, j in enumerate(rows)}
    s_idx = torch.tensor([small[int(j)] for j in indices])
    s_w, s_state = weight[idx].clone(), None if state is None else state[idx].clone()
    w0 = s_w.clone()
    ref.mba_sparse_update_(s_w, s_idx, grad.float(), freq[idx], state=s_state,
                           **dict(kw, padding_idx=small[pad]))
    want_pen = ref.mba_penalty(w0.float(), s_idx, freq[idx], 0.5, padding_idx=small[pad])
    with din_ops.backend(backend):
        pen = din_ops.mba_penalty(weight, indices, freq, 0.5, padding_idx=pad)
        din_ops.mba_sparse_update_(weight, indices, grad, freq, state=state, **kw)
    errors = {"weight": _err(weight[idx], s_w), "penalty": _err(pen, want_pen)}
    if state is not None:
        errors["state"] = _err(state[idx], s_state)
    untouched = torch.tensor(neighbours + [pad])
    assert torch.equal(weight[untouched], w0[[small[j] for j in untouched.tolist()]])
    _check(errors, 1e-2)  # bf16 rows


# --- large (opt-in): real data past 2^31 elements through the C++ kernels --------------------------
def _available_gib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("inf")


def _need_gib(n):
    have = _available_gib()
    if have < n:
        pytest.skip(f"needs ~{n} GiB of available memory, {have:.1f} GiB available")


def _peak_rss_gib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@pytest.fixture
def report(request):
    """Prints the test's wall time and peak resident memory (the peak is reset first)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    t0 = time.perf_counter()
    yield
    print(f"\n  {request.node.name}: {time.perf_counter() - t0:.0f} s wall, "
          f"peak RSS {_peak_rss_gib():.1f} GiB")


def _filled(shape, dtype, seed):
    """Uniform(-1, 1) data: an odd-length random block repeated, so its period divides neither
    2^31 nor 2^32 and an offset that wrapped reads other values."""
    t = torch.empty(shape, dtype=dtype)
    flat = t.view(-1)
    block = _uniform(2**25 + 2**22 + 5, dtype, torch.Generator().manual_seed(seed))
    for s in range(0, flat.numel(), block.numel()):
        n = min(block.numel(), flat.numel() - s)
        flat[s:s + n].copy_(block[:n])
    return t


def _jagged_offsets(N, B, tail, gen):
    """B rows summing to N: random long rows, then the short rows ``tail`` at the end."""
    n_long = B - len(tail)
    rest = N - sum(tail)
    w = torch.rand(n_long, generator=gen, dtype=torch.float64) + 0.5
    lens = (w / w.sum() * rest).floor().long()
    lens[n_long // 2] += rest - int(lens.sum())
    lens = torch.cat([lens, torch.tensor(tail)])
    return torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])


def _rows_to_check(offsets, D):
    """The first rows, one in the middle, and every row holding a key past element 2^31."""
    B = offsets.numel() - 1
    first = TWO31 // D  # the first position whose elements lie past 2^31
    past = [b for b in range(B) if int(offsets[b + 1]) > first]
    return sorted(set([0, 1, B // 2] + past)), past


@pytest.mark.large
def test_large_jagged_forward_bf16(report):
    """Jagged bf16 keys [N, 32], N * D = 2^31 + 2^24 (4.3 GB), 256 rows; softmax."""
    _need_gib(14)
    D, B = 32, 256
    N = TWO31 // D + 2**19
    g = torch.Generator().manual_seed(10)
    offsets = _jagged_offsets(N, B, [5, 1, 0, 17, 3, 300, 0, 1], g)
    keys = _filled((N, D), torch.bfloat16, 11)
    query = _uniform((B, D), torch.bfloat16, g)
    W, bias = _mlp(D, torch.bfloat16, g)
    out, attn = din_ops.attention_pooling(query, keys, W, bias, offsets=offsets, activation=ATT[0],
                                          normalization="softmax", return_weights=True)
    check, past = _rows_to_check(offsets, D)
    assert len(past) >= 8
    Wf, bf = [w.float() for w in W], [x.float() for x in bias]
    e_out = e_attn = 0.0
    for b in check:
        s, e = int(offsets[b]), int(offsets[b + 1])
        ro, rw = ref.attention_pooling(query[b:b + 1].float(), keys[s:e].float(), Wf, bf,
                                       offsets=torch.tensor([0, e - s]), activation=ATT[0],
                                       normalization="softmax", return_weights=True)
        e_out = max(e_out, _err(out[b], ro[0]) if e > s else float(out[b].abs().max()))
        e_attn = max(e_attn, _err(attn[s:e], rw) if e > s else 0.0)
    assert torch.isfinite(out).all()
    print(f"\n  rows checked {len(check)} ({len(past)} with keys past element 2^31)")
    _check({"out": e_out, "attn": e_attn}, 1e-2)


@pytest.mark.large
def test_large_padded_forward_bf16(report):
    """Padded bf16 keys [68, 2^20 + 1000, 32] (4.6 GB) with lengths, two candidates per row: row 63
    crosses element 2^31, rows 64..67 lie past it."""
    _need_gib(16)
    D, B, C, T = 32, 68, 2, 2**20 + 1000
    g = torch.Generator().manual_seed(20)
    keys = _filled((B, T, D), torch.bfloat16, 21)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[63], lengths[64], lengths[65], lengths[66], lengths[67] = T, T // 3, 0, 5, T
    query = _uniform((B, C, D), torch.bfloat16, g)
    W, bias = _mlp(D, torch.bfloat16, g)
    out, attn = din_ops.attention_pooling(query, keys, W, bias, lengths=lengths, activation=ATT[0],
                                          return_weights=True)
    Wf, bf = [w.float() for w in W], [x.float() for x in bias]
    e_out = e_attn = 0.0
    for b in (0, 1, 62, 63, 64, 65, 66, 67):
        n = int(lengths[b])
        assert not attn[b, :, n:].any()
        if n == 0:
            assert not out[b].any()
            continue
        ro, rw = ref.attention_pooling(query[b:b + 1].float(), keys[b:b + 1, :n].float(), Wf, bf,
                                       activation=ATT[0], return_weights=True)
        e_out = max(e_out, _err(out[b], ro[0]))
        e_attn = max(e_attn, _err(attn[b, :, :n], rw[0]))
    assert torch.isfinite(out).all()
    _check({"out": e_out, "attn": e_attn}, 1e-2)


@pytest.mark.large
def test_large_jagged_backward_fp32(report):
    """Jagged fp32 keys [2^26 + 2^14, 32] (8.6 GB) and their gradient (8.6 GB). fp32: the C++
    kernels upcast fp16/bf16 inputs to float32 copies, so a bf16 backward this size needs ~26 GB.

    Upstream gradients are non-zero on the checked rows only, so the weight gradients are sums
    over those rows (the reference computes them row by row) and every other row's key and query
    gradient must be exactly 0."""
    _need_gib(19)
    D, B = 32, 256  # rows of ~2^18 positions keep the per-row reference small
    N = TWO31 // D + 2**14
    g = torch.Generator().manual_seed(30)
    offsets = _jagged_offsets(N, B, [7, 0, 1, 129, 2], g)
    check, past = _rows_to_check(offsets, D)
    keys = _filled((N, D), torch.float32, 31).requires_grad_()
    query = _uniform((B, D), torch.float32, g).requires_grad_()
    W, bias = _mlp(D, torch.float32, g)
    params = [t.requires_grad_() for t in W + bias]
    out, attn = din_ops.attention_pooling(query, keys, W, bias, offsets=offsets, activation=ATT[0],
                                          return_weights=True)
    sel = torch.zeros(B, dtype=torch.bool)
    sel[check] = True
    grad_out = torch.randn(B, D, generator=g) * sel[:, None]
    grad_attn = torch.zeros(N)
    for b in check:
        s, e = int(offsets[b]), int(offsets[b + 1])
        grad_attn[s:e] = torch.randn(e - s, generator=g)
    gq, gk, *gp = torch.autograd.grad([out, attn], [query, keys, *params], [grad_out, grad_attn])
    del out, attn

    errors = {"grad_query": 0.0, "grad_keys": 0.0}
    wsum = [torch.zeros_like(p) for p in params]
    for b in check:
        s, e = int(offsets[b]), int(offsets[b + 1])
        leaves = [query[b:b + 1].detach().clone().requires_grad_(), keys[s:e].detach().clone().requires_grad_()]
        leaves += [p.detach().clone().requires_grad_() for p in params]
        ro, rw = ref.attention_pooling(leaves[0], leaves[1], leaves[2:2 + len(W)], leaves[2 + len(W):],
                                       offsets=torch.tensor([0, e - s]), activation=ATT[0], return_weights=True)
        rg = torch.autograd.grad((ro * grad_out[b:b + 1]).sum() + (rw * grad_attn[s:e]).sum(), leaves,
                                 allow_unused=True)
        rg = [torch.zeros_like(x) if r is None else r for r, x in zip(rg, leaves)]
        errors["grad_query"] = max(errors["grad_query"], _err(gq[b], rg[0][0]))
        if e > s:
            errors["grad_keys"] = max(errors["grad_keys"], _err(gk[s:e], rg[1]))
        for acc, r in zip(wsum, rg[2:]):
            acc += r
    for i, (got, want) in enumerate(zip(gp, wsum)):
        errors[f"grad_param{i}"] = _err(got, want)
    # rows without upstream gradient: exactly zero key and query gradients
    assert not gq[~sel].any()
    bounds = offsets.tolist()
    for b in range(B):
        if not sel[b]:
            assert not gk[bounds[b]:bounds[b + 1]].any(), f"grad_keys of row {b} is not 0"
    print(f"\n  rows checked {len(check)} ({len(past)} with keys past element 2^31)")
    _check(errors, 1e-4)


@pytest.mark.large
def test_large_mba_bf16(report):
    """bf16 table [2^26 + 4096, 32] (4.3 GB) and gradient rows [2^26 + 2^16, 32] (4.3 GB): 4096
    hot rows spread over the table (~16k occurrences each), then 2^16 rows seen once, whose
    gradient rows lie past element 2^31 of grad; SGD, then the penalty and its gradient."""
    _need_gib(16)
    D = 32
    N = TWO31 // D + 4096
    n_hot, n_cold = 4096, 2**16
    M = TWO31 // D + n_cold
    dt = torch.bfloat16
    g = torch.Generator().manual_seed(40)
    hot = torch.arange(n_hot) * (N - 1) // (n_hot - 1)  # includes row 0 and the last row
    # cold rows: the 512 rows before the last one, and random rows elsewhere
    tail = torch.arange(N - 513, N - 1)
    other = torch.randperm(N, generator=g)[: 2 * n_cold]
    other = other[~torch.isin(other, torch.cat([hot, tail]))][: n_cold - tail.numel()]
    cold = torch.cat([tail[~torch.isin(tail, hot)], other])
    cold = cold[torch.randperm(cold.numel(), generator=g)]
    hot_occ = hot[torch.randint(0, n_hot, (M - cold.numel(),), generator=g)]
    indices = torch.cat([hot_occ, cold]).to(torch.int32)  # cold occurrences at positions >= 2^26
    del hot_occ
    weight = _filled((N, D), dt, 41)
    before = weight.clone()
    grad = _filled((M, D), dt, 42)
    freq = torch.randint(0, 100, (N,), generator=g, dtype=torch.int32)
    rows, inverse = torch.unique(indices, return_inverse=True)
    rows = rows.long()
    # reference: per-row float32 sums of the gradient, in chunks, then the update on those rows
    gsum = torch.zeros(rows.numel(), D)
    for s in range(0, M, 2**22):
        gsum.index_add_(0, inverse[s:s + 2**22], grad[s:s + 2**22].float())
    want = weight[rows].clone()
    ref.mba_sparse_update_(want, torch.arange(rows.numel()), gsum, freq[rows], lr=0.05, lam=0.5)
    din_ops.mba_sparse_update_(weight, indices, grad, freq, lr=0.05, lam=0.5)
    errors = {"weight": _err(weight[rows], want)}
    del grad, gsum
    # every other row is bit-identical
    before[rows] = weight[rows]
    assert torch.equal(weight, before)
    del before
    pen = din_ops.mba_penalty(weight.requires_grad_(), indices, freq, 0.5)
    errors["penalty"] = _err(pen, ref.mba_penalty(weight[rows].detach().double(), torch.arange(rows.numel()),
                                                  freq[rows], 0.5))
    gw, = torch.autograd.grad(pen, weight)
    errors["penalty_grad"] = _err(gw[rows], 0.5 / freq[rows].clamp_min(1)[:, None] * weight[rows].detach().float())
    present = torch.zeros(N, dtype=torch.bool)
    present[rows] = True
    for s in range(0, N, 2**22):  # in chunks: a masked copy of gw would be another 4 GB
        assert not gw[s:s + 2**22][~present[s:s + 2**22]].any()
    print(f"\n  distinct rows {rows.numel()}, past row 2^26: {int((rows >= TWO31 // D).sum())}")
    _check(errors, 1e-2)


@pytest.mark.large
def test_large_dice_bf16(report):
    """Dice on bf16 x [66, 2^20 + 2^14, 32] (4.5 GB) with lengths: row 63 crosses element 2^31,
    rows 64 and 65 lie past it. Training forward (statistics over all valid rows, against a
    float64 pass in chunks), then the backward in eval mode with upstream gradients on a few rows
    only (the parameter gradients are sums over those rows, every other dx is 0)."""
    _need_gib(16)
    B, T, C = 66, 2**20 + 2**14, 32
    dt = torch.bfloat16
    g = torch.Generator().manual_seed(50)
    x = _filled((B, T, C), dt, 51)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[63], lengths[64], lengths[65] = T, 0, T - 7
    alpha, gamma, beta = (torch.rand(C, generator=g) for _ in range(3))
    eps = 1e-5
    y, mean, var = torch.ops.din_ops.dice(x, lengths, alpha, gamma, beta, None, None, True, eps)
    # statistics: Chan's merge of float64 per-row moments
    n, m, m2 = 0, torch.zeros(C, dtype=torch.float64), torch.zeros(C, dtype=torch.float64)
    for b in range(B):
        k = int(lengths[b])
        if k == 0:
            continue
        xb = x[b, :k].double()
        vb, mb = torch.var_mean(xb, dim=0, unbiased=False)
        d = mb - m
        m = m + d * k / (n + k)
        m2 = m2 + vb * k + d * d * n * k / (n + k)
        n += k
    errors = {"mean": _err(mean, m), "var": _err(var, m2 / n)}
    rows = (0, 62, 63, 64, 65)
    for b in rows:
        want = ref.dice_pointwise(x[b].float(), alpha, mean, var, gamma, beta, eps)
        errors[f"y[{b}]"] = _err(y[b], want)
    del y
    gy = torch.zeros_like(x)
    for b in rows:
        gy[b] = torch.randn(T, C, generator=g).to(dt)
    dx, dalpha, dgamma, dbeta = torch.ops.din_ops.dice_backward(gy, x, lengths, alpha, gamma, beta, mean, var,
                                                                False, eps)
    pa, pg, pb = (t.clone().requires_grad_() for t in (alpha, gamma, beta))
    sums = [torch.zeros(C, dtype=torch.float64) for _ in range(3)]
    for b in rows:
        xb = x[b].float().requires_grad_()
        yb = ref.dice_pointwise(xb, pa, mean, var, pg, pb, eps)
        rx, ra, rg, rb = torch.autograd.grad((yb * gy[b].float()).sum(), [xb, pa, pg, pb])
        errors[f"dx[{b}]"] = _err(dx[b], rx)
        for s, r in zip(sums, (ra, rg, rb)):
            s += r.double()
    for name, got, want in zip(("dalpha", "dgamma", "dbeta"), (dalpha, dgamma, dbeta), sums):
        errors[name] = _err(got, want)
    for b in set(range(B)) - set(rows):
        assert not dx[b].any(), f"dx of row {b} is not 0"
    _check(errors, 1e-2)
