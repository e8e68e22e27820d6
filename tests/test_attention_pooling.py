"""attention_pooling (SPEC section 1): the C++ CPU path against din_ops.reference.

Every case compares the pooled output, the attention weights and the gradient of every input
(query, keys, each weight and bias, PReLU/Dice parameters) with the reference's autograd.
"""
import itertools

import pytest
import torch

import din_ops
from din_ops import reference as R

ops = torch.ops.din_ops

ACTS = ["sigmoid", "relu", "prelu", "identity", "dice", "dice_eval"]
HIDDEN = [(), (5,), (7, 3), (6, 5, 4)]


def make_case(B=4, T=6, D=5, hidden=(5,), C=None, dtype=torch.float64, act="sigmoid", lengths=None,
              affine=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype)

    q = rnd(B, D) if C is None else rnd(B, C, D)
    k = rnd(B, T, D)
    if lengths is None:
        lengths = torch.randint(0, T + 1, (B,), generator=g)
    dims = [4 * D] + list(hidden) + [1]
    W = [rnd(dims[i + 1], dims[i], s=dims[i] ** -0.5) for i in range(len(dims) - 1)]
    b = [rnd(dims[i + 1], s=0.1) for i in range(len(dims) - 1)]
    kw = {}
    params = []
    if act == "prelu":
        kw["prelu_weights"] = [rnd(h, s=0.3) for h in hidden]
        params = kw["prelu_weights"]
    elif act.startswith("dice"):
        kw["dice_alpha"] = [rnd(h, s=0.5) for h in hidden]
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        kw["dice_running_mean"] = [rnd(h, s=0.1).to(acc) for h in hidden]
        kw["dice_running_var"] = [(rnd(h, s=0.1).abs() + 0.5).to(acc) for h in hidden]
        params = list(kw["dice_alpha"])
        if affine:
            kw["dice_gamma"] = [1 + rnd(h, s=0.2) for h in hidden]
            kw["dice_beta"] = [rnd(h, s=0.2) for h in hidden]
            params += kw["dice_gamma"] + kw["dice_beta"]
        kw["training"] = act == "dice"
    return q, k, lengths.to(torch.int64), W, b, kw, params


def leaves_of(q, k, W, b, params):
    return [q, k, *W, *b, *params]


def run(fn, q, k, W, b, kw, params, *, lengths=None, offsets=None, normalization="none", act="sigmoid",
        scale=1.0, seed=1, w_coef=None):
    """Forward + backward of a random linear functional of (out, weights); returns all results."""
    leaves = leaves_of(q, k, W, b, params)
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    nq, nW = 2, len(W)
    q_, k_ = leaves[0], leaves[1]
    W_, b_ = leaves[nq:nq + nW], leaves[nq + nW:nq + 2 * nW]
    rest = leaves[nq + 2 * nW:]
    kw = dict(kw)
    # rebind the parameter lists to the fresh leaves
    it = iter(rest)
    for name in ("prelu_weights", "dice_alpha", "dice_gamma", "dice_beta"):
        if name in kw:
            kw[name] = [next(it) for _ in kw[name]]
    for name in ("dice_running_mean", "dice_running_var"):
        if name in kw:
            kw[name] = [t.clone() for t in kw[name]]
    activation = "dice" if act.startswith("dice") else act
    out, w = fn(q_, k_, W_, b_, lengths=lengths, offsets=offsets, activation=activation,
                normalization=normalization, scale=scale, return_weights=True, **kw)
    g = torch.Generator().manual_seed(seed)
    if w_coef is None:
        w_coef = torch.randn(w.shape, generator=g, dtype=torch.float64)
    loss = (out * torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)).sum() + \
        (w * w_coef.to(w.dtype)).sum()
    loss.backward()
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]
    stats = kw.get("dice_running_mean", []) + kw.get("dice_running_var", [])
    return [out.detach(), w.detach()] + grads + stats


def assert_close_all(got, want, rtol, atol, names=None):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        name = names[i] if names else f"result {i}"
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        torch.testing.assert_close(a.to(b.dtype), b, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def to_jagged(k, lengths):
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    return R.padded_to_jagged(k, lengths), offsets


@pytest.mark.parametrize("layout", ["padded", "jagged"])
@pytest.mark.parametrize("normalization", ["none", "softmax"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("hidden", HIDDEN, ids=str)
@pytest.mark.parametrize("C", [None, 3])
def test_matches_reference_float64(layout, normalization, act, hidden, C):
    q, k, lengths, W, b, kw, params = make_case(B=5, T=7, D=5, hidden=hidden, C=C, act=act)
    lengths[1] = 0  # an empty row in every case
    if layout == "jagged":
        k, offsets = to_jagged(k, lengths)
        rows = dict(offsets=offsets)
    else:
        rows = dict(lengths=lengths)
    got = run(din_ops.attention_pooling, q, k, W, b, kw, params, normalization=normalization, act=act,
              scale=0.7, **rows)
    want = run(R.attention_pooling, q, k, W, b, kw, params, normalization=normalization, act=act, scale=0.7,
               **rows)
    assert_close_all(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout", ["padded", "jagged"])
@pytest.mark.parametrize("normalization", ["none", "softmax"])
@pytest.mark.parametrize("act", ACTS)
def test_matches_reference_float32(layout, normalization, act):
    q, k, lengths, W, b, kw, params = make_case(B=6, T=9, D=7, hidden=(11, 5), act=act)
    if layout == "jagged":
        k, offsets = to_jagged(k, lengths)
        rows = dict(offsets=offsets)
    else:
        rows = dict(lengths=lengths)
    want = run(R.attention_pooling, q, k, W, b, kw, params, normalization=normalization, act=act, **rows)
    f32 = lambda ts: [t.float() for t in ts]  # noqa: E731
    kw32 = {n: f32(v) if isinstance(v, list) else v for n, v in kw.items()}
    got = run(din_ops.attention_pooling, q.float(), k.float(), f32(W), f32(b), kw32, f32(params),
              normalization=normalization, act=act, **rows)
    assert_close_all(got, want, rtol=1e-5, atol=1e-5)


def check_half_precision(q, k, lengths, W, b, kw, params, dtype, tol, normalization, offsets=None):
    """Outputs and gradients of half-precision inputs against the fp64 reference of the rounded
    inputs, within tol relative to each tensor's scale (jagged keys with offsets)."""
    rows = dict(lengths=lengths) if offsets is None else dict(offsets=offsets)
    got = run(din_ops.attention_pooling, q, k, W, b, kw, params, normalization=normalization, **rows)
    up = lambda ts: [t.double() for t in ts]  # noqa: E731
    want = run(R.attention_pooling, q.double(), k.double(), up(W), up(b), kw, up(params),
               normalization=normalization, **rows)
    for a, w in zip(got, want):
        assert a.dtype == dtype
        scale = max(1.0, float(w.abs().max())) if w.numel() else 1.0
        torch.testing.assert_close(a.double(), w, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 8e-2)])
@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_half_precision(dtype, tol, normalization):
    """fp16/bf16 inputs accumulate in fp32; compared with the fp64 reference of the rounded inputs."""
    q, k, lengths, W, b, kw, params = make_case(B=5, T=8, D=6, hidden=(8, 4), dtype=dtype)
    check_half_precision(q, k, lengths, W, b, kw, params, dtype, tol, normalization)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 8e-2)])
@pytest.mark.parametrize("layout", ["padded", "jagged"])
def test_half_precision_row_ranges(dtype, tol, layout):
    """A call large enough for several row ranges, with candidates: the backward widens bf16
    keys and rounds their gradient one range at a time (padding rows included in padded keys)."""
    g = torch.Generator().manual_seed(2)
    lengths = torch.randint(0, 71, (64,), generator=g)
    q, k, lengths, W, b, kw, params = make_case(B=64, T=70, D=16, hidden=(40, 16), C=2, dtype=dtype,
                                                lengths=lengths)
    offsets = None
    if layout == "jagged":
        k, offsets = to_jagged(k, lengths)
    for normalization in ["none", "softmax"]:
        check_half_precision(q, k, lengths, W, b, kw, params, dtype, tol, normalization, offsets=offsets)


@pytest.mark.parametrize("act", ["sigmoid", "relu", "prelu", "dice", "dice_eval"])
@pytest.mark.parametrize("layout", ["padded", "jagged"])
@pytest.mark.parametrize("runs", ["short", "long"])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 8e-2), (torch.float16, 2e-2)])
def test_half_keys_as_stored(act, layout, runs, dtype, tol):
    """The forward reads bf16 keys as stored, and fp16 keys where their products run in float:
    into the matrix unit's operands, or widened to float tile by tile (CPUs without one, and the
    narrower builds, see test_narrower_isa_matches_reference), and converts them again in the
    pooling; tiles of short runs with candidates (layer 0 unfolded) and of long runs (folded on
    the float path), every activation."""
    from din_ops import _C
    unit = _C._lowp_unit("bfloat16" if dtype == torch.bfloat16 else "float16")
    if runs == "long" and act in ("relu", "prelu") and unit != "float":
        pytest.skip("products in half precision move a few of these pre-activations across ReLU's kink, which "
                    "flips their derivative; test_narrower_isa_matches_reference runs the case with float products")
    if runs == "short":
        lengths, C = torch.tensor([0, 1, 3, 70, 2, 45, 5, 1, 64, 9, 33, 2, 2, 1]), 2
    else:
        lengths, C = torch.tensor([70, 69, 70, 66, 70, 1]), None
    q, k, _, W, b, kw, params = make_case(B=len(lengths), T=70, D=9, hidden=(20, 6), C=C, dtype=dtype, act=act,
                                          lengths=lengths)
    rows = dict(lengths=lengths)
    if layout == "jagged":
        k, offsets = to_jagged(k, lengths)
        rows = dict(offsets=offsets)
    up = lambda ts: [t.double() for t in ts]  # noqa: E731
    for normalization in ["none", "softmax"]:
        got = run(din_ops.attention_pooling, q, k, W, b, kw, params, normalization=normalization, act=act, **rows)
        want = run(R.attention_pooling, q.double(), k.double(), up(W), up(b), kw, up(params),
                   normalization=normalization, act=act, **rows)
        assert got[0].dtype == dtype
        for a, w in zip(got, want):
            scale = max(1.0, float(w.abs().max())) if w.numel() else 1.0
            torch.testing.assert_close(a.double(), w.double(), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_softmax_backward_renormalizes_rounded_weights(dtype):
    """Softmax does not change when every score moves by the same amount, so the last layer's
    bias gradient is exactly 0. The backward reads the saved weights, rounded to the input
    dtype, whose sum is off 1 by that rounding; ds_t = w_t (dw_t - sum_u w_u dw_u) then sums to
    (1 - sum_u w_u) sum_u w_u dw_u instead of 0, an error that reaches every parameter gradient
    (0.01 here in bf16, with keys of magnitude ~20). Divided by their sum, the weights are
    consistent again and the sum is 0 to float rounding."""
    lengths = torch.tensor([60, 1, 37, 60, 12, 55])
    q, k, _, W, b, kw, params = make_case(B=6, T=60, D=7, hidden=(6, 4), dtype=dtype, lengths=lengths)
    k = (k.float() * 20).to(dtype)
    got = run(din_ops.attention_pooling, q, k, W, b, kw, params, lengths=lengths, normalization="softmax")
    grad_last_bias = got[-1]
    assert grad_last_bias.shape == (1,)
    assert float(grad_last_bias.double().abs().max()) < 1e-4
    up = lambda ts: [t.double() for t in ts]  # noqa: E731
    want = run(R.attention_pooling, q.double(), k.double(), up(W), up(b), kw, up(params), lengths=lengths,
               normalization="softmax")
    assert float(want[-1].abs().max()) < 1e-12  # the reference agrees: 0 up to float64 rounding


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 8e-2), (torch.float16, 2e-2)])
@pytest.mark.parametrize("hidden", [(33, 17), (40, 16, 8), (24, 8, 20)])
def test_half_precision_matrix_unit(dtype, tol, hidden):
    """bf16/fp16 products with float accumulation on the matrix unit where the CPU has one (AMX
    through oneDNN's brgemm; elsewhere in float): layers of 16+ outputs, odd fan-ins (the VNNI
    padding), output blocks past 32 columns, tile tails, long and short rows."""
    lengths = torch.tensor([0, 1, 3, 70, 2, 45, 5, 1, 64, 9, 33])
    q, k, _, W, b, kw, params = make_case(B=11, T=70, D=9, hidden=hidden, dtype=dtype, lengths=lengths)
    for normalization in ["none", "softmax"]:
        check_half_precision(q, k, lengths, W, b, kw, params, dtype, tol, normalization)


@pytest.mark.parametrize("K,n", [(2, 1), (10, 16), (72, 64), (80, 40), (34, 17)])
def test_vnni_pack(K, n):
    """brgemm's bf16 operand B [K, n] in VNNI layout [K / 2, 64, 2]: element (k, j) at
    [k // 2, j, k % 2], columns past n zero. Written by din_ops where torch packs nothing
    (AVX512-BF16 without AMX); where torch packs (AMX) the two agree bit for bit."""
    from din_ops import _C
    b = torch.randn(K, n, dtype=torch.float64).to(torch.bfloat16)
    want = torch.zeros(K // 2, 64, 2, dtype=torch.bfloat16)
    want[:, :n, 0] = b[0::2]
    want[:, :n, 1] = b[1::2]
    assert torch.equal(_C._vnni_pack(b, True).view(torch.int16), want.view(torch.int16))
    if _C._lowp_unit("bfloat16") == "amx":
        assert torch.equal(_C._vnni_pack(b, False).view(torch.int16), want.view(torch.int16))


def test_half_precision_with_mkldnn_disabled():
    """torch.backends.mkldnn disabled turns oneDNN's brgemm off: bf16/fp16 products then run in
    float (the choice is made per call, so toggling it between calls works too)."""
    from din_ops import _C
    lengths = torch.tensor([0, 1, 3, 70, 2, 45])
    q, k, _, W, b, kw, params = make_case(B=6, T=70, D=9, hidden=(33, 17), dtype=torch.bfloat16, lengths=lengths)
    torch.backends.mkldnn.enabled = False
    try:
        assert _C._lowp_unit("bfloat16") == "float"
        check_half_precision(q, k, lengths, W, b, kw, params, torch.bfloat16, 8e-2, "none")
    finally:
        torch.backends.mkldnn.enabled = True
    check_half_precision(q, k, lengths, W, b, kw, params, torch.bfloat16, 8e-2, "none")


def test_half_precision_matrix_unit_without_avx512_bf16():
    """The matrix-unit forward rounds with AVX512-BF16's instructions; with those capped
    (DIN_OPS_CPU_ISA=avx512) it takes the general path, which must match the reference too."""
    import os
    import subprocess
    import sys
    script = "import sys, torch; sys.path.insert(0, %r); import test_attention_pooling as t\n" % os.path.dirname(
        os.path.abspath(__file__))
    for hidden in [(33, 17), (24, 8, 20)]:
        script += f"t.test_half_precision_matrix_unit(torch.bfloat16, 8e-2, {hidden})\n"
        script += f"t.test_half_precision_matrix_unit(torch.float16, 2e-2, {hidden})\n"
    subprocess.run([sys.executable, "-c", script], check=True, env=dict(os.environ, DIN_OPS_CPU_ISA="avx512"))


# The AVX-512 float products run in register blocks of 1 to 5 vectors of 16 columns (masked
# tails; a last group of 8 columns or fewer in 256-bit registers), panels of 80 columns, blocks
# of 12, 8, 6 or 4 rows and remainders of 4, 2 and 1 rows, with the sigmoid taken on the
# registers (gemm512.h): widths below cover each block width, tails of 9 to 15 columns (2D = 14,
# D = 41) and of 1 to 8 (5, 24, 33, 70, 72, 40), two panels (2D = 82, H = 97) and one-column
# layers.
@pytest.mark.parametrize("D,hidden", [(5, (1,)), (7, (16, 3)), (41, (97, 33, 17)), (12, (48, 64, 70)),
                                      (36, (80, 40))])
@pytest.mark.parametrize("act", ["sigmoid", "relu"])
@pytest.mark.parametrize("layout", ["padded", "jagged"])
def test_register_blocks_match_reference(D, hidden, act, layout):
    lengths = torch.tensor([0, 1, 3, 70, 2, 45, 5, 1, 64, 9, 33, 70, 7])
    q, k, lengths, W, b, kw, params = make_case(B=13, T=70, D=D, hidden=hidden, act=act, lengths=lengths)
    rows = dict(lengths=lengths)
    if layout == "jagged":
        k, offsets = to_jagged(k, lengths)
        rows = dict(offsets=offsets)
    want = run(R.attention_pooling, q, k, W, b, kw, params, act=act, **rows)
    f32 = [x.float() for x in W], [x.float() for x in b]
    got = run(din_ops.attention_pooling, q.float(), k.float(), *f32, kw, params, act=act, **rows)
    assert_close_all(got, want, rtol=2e-5, atol=2e-5)


# Tiles whose runs are all one position long (T = 1, or C candidates of one-position rows): every
# run has its own layer-0 term, and hundreds of pairs add into each weight gradient.
@pytest.mark.parametrize("D,hidden", [(36, (80, 40)), (41, (97, 33, 17))])
@pytest.mark.parametrize("C", [None, 3])
@pytest.mark.parametrize("layout", ["padded", "jagged"])
def test_runs_of_one_position_match_reference(D, hidden, C, layout):
    g = torch.Generator().manual_seed(1)
    lengths = (torch.rand(300, generator=g) < 0.9).long()  # 0 or 1, several tiles of 256 pairs
    q, k, lengths, W, b, kw, params = make_case(B=300, T=1, D=D, hidden=hidden, C=C, lengths=lengths)
    rows = dict(lengths=lengths)
    if layout == "jagged":
        k, offsets = to_jagged(k, lengths)
        rows = dict(offsets=offsets)
    want = run(R.attention_pooling, q, k, W, b, kw, params, **rows)
    f32 = [x.float() for x in W], [x.float() for x in b]
    got = run(din_ops.attention_pooling, q.float(), k.float(), *f32, kw, params, **rows)
    assert_close_all(got, want, rtol=1e-4, atol=1e-4)  # weight gradients sum 300 pairs in float32
    with torch.no_grad():
        out = din_ops.attention_pooling(q.float(), k.float(), *f32, **rows)
    torch.testing.assert_close(out.double(), want[0], rtol=2e-5, atol=2e-5)


# Layer 0 takes the folded form on tiles of long runs and the unfolded one on tiles of short
# runs (kFoldMinLen = 32 in attention_pooling.cpp); the forward splits one row's candidates and
# positions over several work ranges once a call is large enough.
LAYER0_CASES = {
    "long": dict(B=3, T=90, C=None, lengths=[90, 70, 41]),
    "short": dict(B=40, T=4, C=None, lengths=None),
    "mixed": dict(B=8, T=80, C=2, lengths=[1, 80, 2, 64, 0, 3, 77, 1]),
    "one_user": dict(B=1, T=300, C=80, lengths=[300]),
}


@pytest.mark.parametrize("case", sorted(LAYER0_CASES))
@pytest.mark.parametrize("act", ["sigmoid", "prelu", "dice"])
@pytest.mark.parametrize("layout", ["padded", "jagged"])
def test_layer0_forms_and_work_split_match_reference(case, act, layout):
    c = LAYER0_CASES[case]
    lengths = None if c["lengths"] is None else torch.tensor(c["lengths"])
    q, k, lengths, W, b, kw, params = make_case(B=c["B"], T=c["T"], D=7, hidden=(11, 5), C=c["C"], act=act,
                                                lengths=lengths)
    rows = dict(lengths=lengths)
    if layout == "jagged":
        k, offsets = to_jagged(k, lengths)
        rows = dict(offsets=offsets)
    for normalization in ["none", "softmax"]:
        want = run(R.attention_pooling, q, k, W, b, kw, params, normalization=normalization, act=act, **rows)
        got = run(din_ops.attention_pooling, q, k, W, b, kw, params, normalization=normalization, act=act, **rows)
        assert_close_all(got, want, rtol=1e-10, atol=1e-10)


def test_padded_and_jagged_identical():
    q, k, lengths, W, b, kw, params = make_case(B=9, T=13, D=6, hidden=(10, 4), dtype=torch.float32)
    kj, offsets = to_jagged(k, lengths)
    mask = R.valid_mask(lengths, 9, 13)
    coef = torch.randn(9, 13, dtype=torch.float64)
    for normalization in ["none", "softmax"]:
        pad = run(din_ops.attention_pooling, q, k, W, b, kw, params, lengths=lengths, normalization=normalization,
                  w_coef=coef)
        jag = run(din_ops.attention_pooling, q, kj, W, b, kw, params, offsets=offsets, normalization=normalization,
                  w_coef=coef[mask])
        assert torch.equal(pad[0], jag[0])
        assert torch.equal(pad[1][mask], jag[1])
        assert torch.equal(pad[2], jag[2])  # query
        assert torch.equal(pad[3][mask], jag[3])  # keys
        assert torch.equal(pad[3][~mask], torch.zeros_like(pad[3][~mask]))
        for a, j in zip(pad[4:], jag[4:]):
            assert torch.equal(a, j)


def test_padding_is_never_read():
    """Garbage (inf, nan) in the padding changes nothing."""
    q, k, lengths, W, b, kw, params = make_case(B=6, T=8, D=5, hidden=(6,))
    lengths[0] = 0
    clean = run(din_ops.attention_pooling, q, k, W, b, kw, params, lengths=lengths, normalization="softmax")
    mask = R.valid_mask(lengths, 6, 8)
    dirty = k.clone()
    dirty[~mask] = float("nan")
    dirty[~mask & (torch.arange(8)[None] % 2 == 0)] = float("inf")
    got = run(din_ops.attention_pooling, q, dirty, W, b, kw, params, lengths=lengths, normalization="softmax")
    for a, c in zip(got, clean):
        assert torch.equal(a, c)


@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_edge_shapes(normalization):
    cases = [
        dict(B=0, T=5, D=3),                                          # no rows
        dict(B=3, T=1, D=4),                                          # T = 1
        dict(B=3, T=4, D=3, lengths=torch.zeros(3, dtype=torch.int64)),  # all rows empty
        dict(B=2, T=1000, D=7, lengths=torch.tensor([1000, 997])),    # long rows
        dict(B=3, T=6, D=1),                                          # D = 1
    ]
    for c in cases:
        q, k, lengths, W, b, kw, params = make_case(hidden=(5, 3), **c)
        got = run(din_ops.attention_pooling, q, k, W, b, kw, params, lengths=lengths, normalization=normalization)
        want = run(R.attention_pooling, q, k, W, b, kw, params, lengths=lengths, normalization=normalization)
        assert_close_all(got, want, rtol=1e-10, atol=1e-10)
        for t in got:
            assert torch.isfinite(t).all()


def test_lengths_none_and_int32():
    q, k, lengths, W, b, kw, params = make_case(B=4, T=5, D=3, hidden=(4,))
    full = torch.full((4,), 5, dtype=torch.int64)
    a = run(din_ops.attention_pooling, q, k, W, b, kw, params, lengths=None)
    c = run(din_ops.attention_pooling, q, k, W, b, kw, params, lengths=full)
    assert_close_all(a, c, rtol=0, atol=0)
    a = run(din_ops.attention_pooling, q, k, W, b, kw, params, lengths=lengths.int())
    c = run(din_ops.attention_pooling, q, k, W, b, kw, params, lengths=lengths)
    assert_close_all(a, c, rtol=0, atol=0)


def test_candidates_equal_separate_calls():
    """query [B, C, D] gives what C separate [B, D] calls give."""
    q, k, lengths, W, b, kw, params = make_case(B=5, T=6, D=4, hidden=(6,), C=3)
    out, w = din_ops.attention_pooling(q, k, W, b, lengths=lengths, return_weights=True, normalization="softmax")
    for c in range(3):
        oc, wc = din_ops.attention_pooling(q[:, c], k, W, b, lengths=lengths, return_weights=True,
                                           normalization="softmax")
        torch.testing.assert_close(out[:, c], oc, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(w[:, c], wc, rtol=1e-12, atol=1e-12)


def test_dice_running_statistics_match_reference():
    q, k, lengths, W, b, kw, params = make_case(B=6, T=7, D=4, hidden=(6, 3), act="dice")
    rm_a = [t.clone() for t in kw["dice_running_mean"]]
    rv_a = [t.clone() for t in kw["dice_running_var"]]
    rm_b = [t.clone() for t in rm_a]
    rv_b = [t.clone() for t in rv_a]
    common = dict(lengths=lengths, activation="dice", dice_alpha=kw["dice_alpha"], training=True, momentum=0.3)
    din_ops.attention_pooling(q, k, W, b, dice_running_mean=rm_a, dice_running_var=rv_a, **common)
    R.attention_pooling(q, k, W, b, dice_running_mean=rm_b, dice_running_var=rv_b, **common)
    for a, c, orig in zip(rm_a + rv_a, rm_b + rv_b, kw["dice_running_mean"] + kw["dice_running_var"]):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
        assert not torch.equal(a, orig)


def test_deterministic_across_runs_and_threads():
    q, k, lengths, W, b, kw, params = make_case(B=70, T=30, D=8, hidden=(16, 8), dtype=torch.float32)
    first = run(din_ops.attention_pooling, q, k, W, b, kw, params, lengths=lengths, normalization="softmax")
    threads = torch.get_num_threads()
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            again = run(din_ops.attention_pooling, q, k, W, b, kw, params, lengths=lengths,
                        normalization="softmax")
            for a, c in zip(first, again):
                assert torch.equal(a, c)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("act", ["sigmoid", "prelu", "dice", "dice_eval"])
@pytest.mark.parametrize("layout", ["padded", "jagged"])
def test_gradcheck(act, layout):
    q, k, lengths, W, b, kw, params = make_case(B=3, T=4, D=3, hidden=(4, 3), C=2 if act == "sigmoid" else None,
                                                act=act)
    lengths = torch.tensor([4, 0, 2])
    rows = dict(lengths=lengths)
    if layout == "jagged":
        k, offsets = to_jagged(k, lengths)
        rows = dict(offsets=offsets)
    leaves = [t.detach().clone().requires_grad_() for t in leaves_of(q, k, W, b, params)]
    nW = len(W)
    kw = {n: v for n, v in kw.items() if n not in ("prelu_weights", "dice_alpha", "dice_gamma", "dice_beta")}

    def f(*ts):
        q_, k_ = ts[0], ts[1]
        W_, b_ = list(ts[2:2 + nW]), list(ts[2 + nW:2 + 2 * nW])
        rest = list(ts[2 + 2 * nW:])
        extra = dict(kw)
        if act == "prelu":
            extra["prelu_weights"] = rest
        elif act.startswith("dice"):
            n = len(rest) // 3
            extra.update(dice_alpha=rest[:n], dice_gamma=rest[n:2 * n], dice_beta=rest[2 * n:])
            extra["dice_running_mean"] = [t.clone() for t in kw["dice_running_mean"]]
            extra["dice_running_var"] = [t.clone() for t in kw["dice_running_var"]]
        return din_ops.attention_pooling(q_, k_, W_, b_, activation="dice" if act.startswith("dice") else act,
                                         normalization="softmax", return_weights=True, **rows, **extra)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7)


def _op_args(act="sigmoid", layout="padded", C=None, dtype=torch.float64):
    q, k, lengths, W, b, kw, params = make_case(B=4, T=5, D=3, hidden=(4, 3), C=C, act=act, dtype=dtype)
    lengths[2] = 0
    offsets = None
    if layout == "jagged":
        k, offsets = to_jagged(k, lengths)
        lengths = None
    for t in [q, k, *W, *b, *params]:
        t.requires_grad_()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    act_w = kw.get("prelu_weights", kw.get("dice_alpha", []))
    if act.startswith("dice"):
        mean = [t.to(acc) for t in kw["dice_running_mean"]]
        var = [t.to(acc) for t in kw["dice_running_var"]]
        gam, bet = kw.get("dice_gamma", []), kw.get("dice_beta", [])
    else:
        mean = var = gam = bet = []
    return q, k, lengths, offsets, W, b, act_w, mean, var, gam, bet


@pytest.mark.parametrize("act", ["sigmoid", "prelu", "dice"])
@pytest.mark.parametrize("layout", ["padded", "jagged"])
def test_opcheck(act, layout):
    q, k, lengths, offsets, W, b, act_w, mean, var, gam, bet = _op_args(act, layout, C=2 if act == "prelu" else None)
    activation = act
    for normalization in ["none", "softmax"]:
        args = (q, k, lengths, offsets, W, b, act_w, mean, var, gam, bet, activation, normalization, 0.5, 1e-8)
        torch.library.opcheck(ops.attention_pooling, args)
        out, attn = ops.attention_pooling(*args)
        bargs = (torch.randn_like(out), torch.randn_like(attn), attn.detach(), q.detach(), k.detach(), lengths,
                 offsets, [t.detach() for t in W], [t.detach() for t in b], [t.detach() for t in act_w], mean, var,
                 [t.detach() for t in gam], [t.detach() for t in bet], activation, normalization, 0.5, 1e-8)
        torch.library.opcheck(ops.attention_pooling_backward, bargs,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    if act == "dice":
        n_hidden = len(W) - 1
        mean_g = [t.clone().requires_grad_() for t in mean]
        var_g = [t.clone().requires_grad_() for t in var]
        sargs = (q, k, lengths, offsets, W[:n_hidden], b[:n_hidden], act_w[:n_hidden - 1], mean_g[:n_hidden - 1],
                 var_g[:n_hidden - 1], gam[:n_hidden - 1], bet[:n_hidden - 1], "dice", 1e-8)
        torch.library.opcheck(ops.attention_pooling_stats, sargs)
        m, v = ops.attention_pooling_stats(*sargs)
        det = lambda ts: [t.detach() for t in ts]  # noqa: E731
        bsargs = (torch.randn_like(m), torch.randn_like(v), m.detach(), q.detach(), k.detach(), lengths, offsets,
                  det(sargs[4]), det(sargs[5]), det(sargs[6]), det(sargs[7]), det(sargs[8]), det(sargs[9]),
                  det(sargs[10]), "dice", 1e-8)
        torch.library.opcheck(ops.attention_pooling_stats_backward, bsargs,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("activation", ["sigmoid", "dice"])
@pytest.mark.parametrize("layout", ["padded", "jagged"])
def test_torch_compile_fullgraph(activation, layout):
    torch.manual_seed(0)
    mod = din_ops.nn.AttentionPooling(6, (8, 4), activation=activation, normalization="softmax").double()
    q = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    k = torch.randn(5, 7, 6, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([7, 0, 3, 1, 5])
    rows = dict(lengths=lengths)
    if layout == "jagged":
        kj, offsets = to_jagged(k.detach(), lengths)
        k = kj.requires_grad_()
        rows = dict(offsets=offsets)
    eager_mod = __import__("copy").deepcopy(mod)
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, **rows)
    out.square().sum().backward()
    gq, gk = q.grad.clone(), k.grad.clone()
    gw = [p.grad.clone() for p in mod.parameters()]
    q.grad = k.grad = None
    ref = eager_mod(q, k, **rows)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gq, q.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gk, k.grad, rtol=1e-12, atol=1e-12)
    for a, p in zip(gw, eager_mod.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-12, atol=1e-12)
    for a, c in zip(mod.buffers(), eager_mod.buffers()):
        torch.testing.assert_close(a, c)


def test_module_matches_functional_reference():
    torch.manual_seed(0)
    for activation in ["sigmoid", "prelu", "dice"]:
        mod = din_ops.nn.AttentionPooling(5, (6, 3), activation=activation).double()
        q = torch.randn(4, 5, dtype=torch.float64)
        k = torch.randn(4, 6, 5, dtype=torch.float64)
        lengths = torch.tensor([6, 2, 0, 4])
        out = mod(q, k, lengths=lengths)
        W = [l.weight for l in mod.layers] + [mod.output.weight]
        b = [l.bias for l in mod.layers] + [mod.output.bias]
        kw = {}
        if activation == "prelu":
            kw["prelu_weights"] = [p.weight for p in mod.prelu]
        if activation == "dice":
            kw.update(dice_alpha=[d.alpha for d in mod.dice],
                      dice_running_mean=[torch.zeros(h, dtype=torch.float64) for h in (6, 3)],
                      dice_running_var=[torch.ones(h, dtype=torch.float64) for h in (6, 3)])
        ref = R.attention_pooling(q, k, W, b, lengths=lengths, activation=activation, **kw)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


# --- bad input -----------------------------------------------------------------------------------
def _good():
    q, k, lengths, W, b, kw, params = make_case(B=3, T=4, D=5, hidden=(6,), dtype=torch.float32)
    return dict(query=q, keys=k, weights=W, biases=b, lengths=lengths)


def _call(**over):
    a = _good()
    a.update(over)
    extra = {n: a.pop(n) for n in list(a) if n not in ("query", "keys", "weights", "biases")}
    return din_ops.attention_pooling(a["query"], a["keys"], a["weights"], a["biases"], **extra)


BAD = {
    "query_dims": (dict(query=torch.randn(3)), "query"),
    "query_int": (dict(query=torch.ones(3, 5, dtype=torch.int64)), "query"),
    "keys_width": (dict(keys=torch.randn(3, 4, 6)), "keys"),
    "keys_batch": (dict(keys=torch.randn(2, 4, 5)), "keys"),
    "keys_dtype": (dict(keys=torch.randn(3, 4, 5, dtype=torch.float64)), "keys"),
    "lengths_negative": (dict(lengths=torch.tensor([1, -1, 2])), "lengths"),
    "lengths_above_T": (dict(lengths=torch.tensor([1, 5, 2])), "lengths"),
    "lengths_shape": (dict(lengths=torch.tensor([1, 2])), "lengths"),
    "lengths_float": (dict(lengths=torch.tensor([1.0, 2.0, 3.0])), "lengths"),
    "offsets_with_padded": (dict(offsets=torch.tensor([0, 1, 2, 3])), "offsets"),
    "weights_shape": (dict(weights=[torch.randn(6, 19), torch.randn(1, 6)]), "weights[0]"),
    "output_layer": (dict(weights=[torch.randn(6, 20), torch.randn(2, 6)], biases=[torch.randn(6), torch.randn(2)]),
                     "weights[1]"),
    "bias_shape": (dict(biases=[torch.randn(5), torch.randn(1)]), "biases[0]"),
    "list_lengths": (dict(biases=[torch.randn(6)]), "biases"),
    "weight_dtype": (dict(weights=[torch.randn(6, 20, dtype=torch.float64), torch.randn(1, 6)]), "weights[0]"),
    "activation": (dict(activation="tanh"), "activation"),
    "normalization": (dict(normalization="sparsemax"), "normalization"),
    "prelu_missing": (dict(activation="prelu"), "prelu_weights"),
    "prelu_shape": (dict(activation="prelu", prelu_weights=[torch.randn(4)]), "prelu alpha[0]"),
    "dice_missing": (dict(activation="dice"), "dice_alpha"),
    "dice_eval_stats": (dict(activation="dice", dice_alpha=[torch.zeros(6)], training=False), "dice_running_mean"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_names_argument(case):
    over, name = BAD[case]
    with pytest.raises((ValueError, TypeError), match=__import__("re").escape(name)):
        _call(**over)


BAD_NUMBERS = {
    "scale_inf": (dict(scale=float("inf")), "scale"),
    "scale_bool": (dict(scale=True), "scale"),
    "eps_zero": (dict(eps=0.0), "eps"),
    "momentum_above_1": (dict(momentum=1.5), "momentum"),
    "weights_sparse": (dict(weights=[torch.randn(6, 20).to_sparse(), torch.randn(1, 6)]), "weights[0]"),
    "weights_not_tensors": (dict(weights=[torch.randn(6, 20), "w"]), "weights[1]"),
    "dice_alpha_with_sigmoid": (dict(dice_alpha=[torch.zeros(6)]), "dice_alpha"),
}


@pytest.mark.parametrize("case", sorted(BAD_NUMBERS))
def test_bad_option_names_argument(case):
    over, name = BAD_NUMBERS[case]
    with pytest.raises((ValueError, TypeError), match=__import__("re").escape(name)):
        _call(**over)


def _args_ok(a):
    """din_ops._C's one-call check of the public function's fast path (False or TypeError: no)."""
    try:
        return din_ops._C._attention_args_ok(a["query"], a["keys"], a.get("lengths"), a.get("offsets"),
                                             a["weights"], a["biases"], a.get("activation", "sigmoid"),
                                             a.get("normalization", "none"))
    except TypeError:
        return False


@pytest.mark.parametrize("case", sorted(BAD))
def test_fast_check_refuses_what_the_python_checks_refuse(case):
    a = _good()
    a.update(BAD[case][0])
    assert not _args_ok(a)


@pytest.mark.parametrize("layout", ["padded", "jagged"])
@pytest.mark.parametrize("normalization", ["none", "softmax"])
@pytest.mark.parametrize("C", [None, 3])
def test_fast_path_is_taken_and_matches_the_checked_path(monkeypatch, layout, normalization, C):
    """Plain CPU calls skip the Python checks (din_ops._C checks them in one call) and give the
    same bits as the checked path (taken here for a NumPy scale, which the fast path leaves to
    the Python checks)."""
    import numpy as np
    q, k, lengths, W, b, kw, params = make_case(B=5, T=6, D=5, hidden=(7, 4), dtype=torch.float64, C=C)
    args = dict(lengths=lengths)
    if layout == "jagged":
        k, offsets = to_jagged(k, lengths)
        args = dict(offsets=offsets)
    slow = din_ops.attention_pooling(q, k, W, b, normalization=normalization, scale=np.float64(0.5),
                                     return_weights=True, **args)
    from din_ops.ops import attention_pooling as ap

    def refuse(*a, **k):
        raise AssertionError("the Python checks ran")
    monkeypatch.setattr(ap, "check_attention_pooling_options", refuse)
    fast = din_ops.attention_pooling(q, k, W, b, normalization=normalization, scale=0.5, return_weights=True, **args)
    for x, y in zip(fast, slow):
        assert torch.equal(x, y)
    ref = R.attention_pooling(q, k, W, b, normalization=normalization, scale=0.5, return_weights=True, **args)
    for x, y in zip(fast, ref):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_bad_jagged_offsets():
    q = torch.randn(3, 5)
    k = torch.randn(6, 5)
    W, b = [torch.randn(1, 20)], [torch.randn(1)]
    for offsets, msg in [
        (None, "offsets"),
        (torch.tensor([0, 2, 4]), "offsets"),           # B + 1 entries expected
        (torch.tensor([1, 2, 4, 6]), r"offsets\[0\]"),
        (torch.tensor([0, 2, 4, 5]), r"offsets\[-1\]"),
        (torch.tensor([0, 4, 2, 6]), "non-decreasing"),
    ]:
        with pytest.raises(ValueError, match=msg):
            din_ops.attention_pooling(q, k, W, b, offsets=offsets)
    with pytest.raises(ValueError, match="lengths"):
        din_ops.attention_pooling(q, k, W, b, offsets=torch.tensor([0, 2, 4, 6]), lengths=torch.tensor([1, 1, 1]))


def test_kernel_rechecks_values_when_called_directly():
    """Calling the registered op directly (no Python checks) still cannot read out of bounds."""
    q, k = torch.randn(2, 3), torch.randn(2, 4, 3)
    W, b = [torch.randn(1, 12)], [torch.randn(1)]
    with pytest.raises(RuntimeError, match="lengths"):
        ops.attention_pooling(q, k, torch.tensor([5, 1]), None, W, b, [], [], [], [], [], "sigmoid", "none", 1.0, 1e-8)
    with pytest.raises(RuntimeError, match="offsets"):
        ops.attention_pooling(q, torch.randn(4, 3), None, torch.tensor([0, 3, 9]), W, b, [], [], [], [], [],
                              "sigmoid", "none", 1.0, 1e-8)


def test_blas_fallback_matches(tmp_path):
    """The plain-loop GEMM used when libtorch exports no BLAS gives the same results."""
    import subprocess
    import sys
    import textwrap
    script = textwrap.dedent("""
        import torch, din_ops
        torch.manual_seed(0)
        q = torch.randn(5, 2, 6, dtype=torch.float64); k = torch.randn(5, 9, 6, dtype=torch.float64)
        W = [torch.randn(7, 24, dtype=torch.float64), torch.randn(1, 7, dtype=torch.float64)]
        b = [torch.randn(7, dtype=torch.float64), torch.randn(1, dtype=torch.float64)]
        ts = [q, k] + W + b
        for t in ts: t.requires_grad_()
        out = din_ops.attention_pooling(q, k, W, b, lengths=torch.tensor([9, 0, 3, 4, 1]))
        out.square().sum().backward()
        torch.save([out.detach()] + [t.grad for t in ts], %r)
    """)
    results = []
    for flag in ("0", "1"):
        path = tmp_path / f"r{flag}.pt"
        env = dict(__import__("os").environ, DIN_OPS_NO_BLAS=flag)
        subprocess.run([sys.executable, "-c", script % str(path)], check=True, env=env)
        results.append(torch.load(path))
    for a, c in zip(*results):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("isa", ["base", "avx2"])
def test_narrower_isa_matches_reference(isa):
    """The baseline and AVX2 builds of the kernels' loops (DIN_OPS_CPU_ISA caps the run-time
    choice) match the reference, float32 and float64, so they stay tested on a wide CPU."""
    import os
    import subprocess
    import sys
    import textwrap
    script = textwrap.dedent("""
        import sys, torch, din_ops
        sys.path.insert(0, %r)
        import test_attention_pooling as t
        from din_ops import reference as R
        for act in ["sigmoid", "relu", "prelu", "dice", "dice_eval"]:
            for layout in ["padded", "jagged"]:
                for norm in ["none", "softmax"]:
                    q, k, lengths, W, b, kw, params = t.make_case(B=6, T=9, D=7, hidden=(11, 5), C=2, act=act)
                    rows = dict(lengths=lengths)
                    if layout == "jagged":
                        k, offsets = t.to_jagged(k, lengths)
                        rows = dict(offsets=offsets)
                    want = t.run(R.attention_pooling, q, k, W, b, kw, params, normalization=norm, act=act, **rows)
                    got = t.run(din_ops.attention_pooling, q, k, W, b, kw, params, normalization=norm, act=act,
                                **rows)
                    t.assert_close_all(got, want, rtol=1e-10, atol=1e-10)
                    f32 = lambda ts: [x.float() for x in ts]
                    kw32 = {n: f32(v) if isinstance(v, list) else v for n, v in kw.items()}
                    got = t.run(din_ops.attention_pooling, q.float(), k.float(), f32(W), f32(b), kw32,
                                f32(params), normalization=norm, act=act, **rows)
                    t.assert_close_all(got, want, rtol=1e-5, atol=1e-5)
        # bf16 with float products (the matrix-unit path is off below the wide units)
        t.test_half_precision_matrix_unit(torch.bfloat16, 8e-2, (33, 17))
        for act in ["sigmoid", "dice", "relu"]:
            for layout in ["padded", "jagged"]:
                for runs in ["short", "long"]:
                    if act != "relu" or din_ops._C._lowp_unit("bfloat16") == "float":
                        t.test_half_keys_as_stored(act, layout, runs, torch.bfloat16, 8e-2)
                    if act != "relu" or din_ops._C._lowp_unit("float16") == "float":
                        t.test_half_keys_as_stored(act, layout, runs, torch.float16, 2e-2)
    """) % os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, DIN_OPS_CPU_ISA=isa)
    subprocess.run([sys.executable, "-c", script], check=True, env=env)


def bias_dominated_case(seed=3):
    """An MLP whose pre-activations are a bias plus a small spread, as DeepCTR-Torch's
    LocalActivationUnit starts (hidden weights of std 1e-4): full histories, D=8, (80, 40)."""
    g = torch.Generator().manual_seed(seed)
    B, T, D, hidden = 37, 23, 8, (80, 40)
    dims = [4 * D] + list(hidden) + [1]
    W = [torch.randn(dims[i + 1], dims[i], generator=g, dtype=torch.float64) * (1e-4 if i < len(hidden) else 0.2)
         for i in range(len(dims) - 1)]
    b = [(torch.rand(dims[i + 1], generator=g, dtype=torch.float64) - 0.5) * 2 * dims[i] ** -0.5
         for i in range(len(dims) - 1)]
    alpha = [torch.rand(h, generator=g, dtype=torch.float64) for h in hidden]
    q, k = torch.randn(B, D, generator=g, dtype=torch.float64), torch.randn(B, T, D, generator=g, dtype=torch.float64)
    return q, k, torch.full((B,), T), W, b, alpha


def eager_batchnorm_unit(q, k, W, b, *, lengths=None, offsets=None, activation="sigmoid", normalization="none",
                         scale=1.0, return_weights=True, dice_alpha=(), **_):
    """Full histories only: the unit as eager PyTorch users write it (F.linear, and Dice from
    F.batch_norm over every position), the float32 yardstick where Dice's statistics make a
    gradient ill-conditioned."""
    B, T, D = k.shape
    qe = q[:, None, :].expand(B, T, D)
    h = torch.cat([qe, k, qe - k, qe * k], -1)
    for i in range(len(W) - 1):
        z = torch.nn.functional.linear(h, W[i], b[i])
        if activation == "dice":
            zn = torch.nn.functional.batch_norm(z.reshape(B * T, -1), None, None, training=True, eps=1e-8)
            p = torch.sigmoid(zn.reshape(z.shape))
            h = p * z + (1 - p) * dice_alpha[i] * z
        else:
            h = torch.sigmoid(z)
    s = torch.nn.functional.linear(h, W[-1], b[-1])[..., 0] * scale
    w = torch.softmax(s, -1) if normalization == "softmax" else s
    return (w[..., None] * k).sum(1), w


def bias_dominated_errors(act, norm):
    """Max errors against float64 of every result (run's order), float32: din_ops, the reference
    and eager_batchnorm_unit."""
    q, k, lengths, W, b, alpha = bias_dominated_case()
    kw, params = {}, []
    if act == "dice":
        kw = dict(dice_alpha=alpha, dice_running_mean=[torch.zeros_like(a) for a in alpha],
                  dice_running_var=[torch.ones_like(a) for a in alpha])
        params = list(alpha)
    want = run(R.attention_pooling, q, k, W, b, kw, params, lengths=lengths, normalization=norm, act=act)
    f32 = lambda ts: [x.float() for x in ts]
    kw32 = {n: f32(v) for n, v in kw.items()}
    out = []
    for fn in (din_ops.attention_pooling, R.attention_pooling, eager_batchnorm_unit):
        got = run(fn, q.float(), k.float(), f32(W), f32(b), kw32, f32(params), lengths=lengths,
                  normalization=norm, act=act)
        out.append([float((g.double() - w).abs().max()) for g, w in zip(got, want)])
    return out


def check_bias_dominated(act, norm):
    errs, ref_errs, eager_errs = bias_dominated_errors(act, norm)
    hidden_bias = (4 + 3, 4 + 4)  # run's order: out, weights, q, k, W0..W2, b0..b2, ...
    output_bias = 4 + 5
    for i, (e, r, x) in enumerate(zip(errs, ref_errs, eager_errs)):
        limit = 4 * r + 1e-7
        if act == "dice" and i in hidden_bias:
            # through Dice's batch statistics these cancel to a few digits in float32; the
            # reference's two sums happen to cancel exactly, eager PyTorch's do not
            limit = max(limit, x)
        if norm == "softmax" and i == output_bias:
            # exactly 0 (a shift of every score cancels in the softmax): what is measured is the
            # rounding of a sum that cancels, which differs with the BLAS and the CPU
            limit = max(limit, x)
        assert e <= limit, f"{act}/{norm} result {i}: error {e:.3g}, the float32 reference's {r:.3g}, eager's {x:.3g}"


@pytest.mark.parametrize("isa", ["native", "avx2", "base"])
def test_bias_dominated_preactivations_float32(isa):
    """float32 results are as close to float64 as the float32 reference's when the MLP's
    pre-activations are a bias plus a small spread: each layer's products are summed first and
    the bias added last (added first, it rounds every partial sum at its magnitude), and Dice's
    batch moments are summed in double. Every build of the loops (DIN_OPS_CPU_ISA)."""
    cases = [("dice", "softmax"), ("dice", "none"), ("sigmoid", "softmax")]
    if isa == "native":
        for act, norm in cases:
            check_bias_dominated(act, norm)
        return
    import os
    import subprocess
    import sys
    script = "import sys; sys.path.insert(0, %r); import test_attention_pooling as t\n" % os.path.dirname(
        os.path.abspath(__file__))
    script += "".join(f"t.check_bias_dominated({a!r}, {n!r})\n" for a, n in cases)
    subprocess.run([sys.executable, "-c", script], check=True, env=dict(os.environ, DIN_OPS_CPU_ISA=isa))


@pytest.mark.parametrize("scale", [1e17, 1e20, 1e30])
def test_saturated_sigmoid_matches_reference(scale):
    """Pre-activations far past the sigmoid's saturation (here 1e17 to 1e30, finite) give 0 or 1
    as the reference does: the vector exp must clamp both ends, since the rounding of
    n = round(-z log2 e) leaves a remainder that grows with |z| and overflows its polynomial."""
    torch.manual_seed(0)
    B, T, D = 6, 9, 8
    q = torch.randn(B, D, requires_grad=True)
    k = torch.randn(B, T, D, requires_grad=True)
    lengths = torch.tensor([9, 0, 3, 1, 5, 8])
    ws = [torch.randn(16, 4 * D) * scale, torch.randn(16, 16) / 4, torch.randn(1, 16)]
    bs = [torch.randn(16), torch.randn(16), torch.randn(1)]
    ws = [w.requires_grad_() for w in ws]
    bs = [b.requires_grad_() for b in bs]
    out = din_ops.attention_pooling(q, k, ws, bs, lengths=lengths)
    ref = R.attention_pooling(q.double(), k.double(), [w.double() for w in ws], [b.double() for b in bs],
                              lengths=lengths)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    inputs = [q, k, ws[1], ws[2], bs[1], bs[2]]  # W0 and b0 get 0 * huge products: not compared
    got = torch.autograd.grad(out, inputs, g)
    exp = torch.autograd.grad(ref, inputs, g.double())
    for a, b in zip(got, exp):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-4)


def test_torch_compile_inductor():
    """The default backend (Inductor) compiles the module around the op, forward and backward."""
    torch.manual_seed(0)
    mod = din_ops.nn.AttentionPooling(6, (8, 4), activation="dice", normalization="softmax")
    eager_mod = __import__("copy").deepcopy(mod)
    q = torch.randn(5, 6, requires_grad=True)
    k = torch.randn(5, 7, 6, requires_grad=True)
    lengths = torch.tensor([7, 0, 3, 1, 5])
    out = torch.compile(mod, fullgraph=True)(q, k, lengths=lengths)
    out.square().sum().backward()
    grads = [q.grad.clone(), k.grad.clone()] + [p.grad.clone() for p in mod.parameters()]
    q.grad = k.grad = None
    ref = eager_mod(q, k, lengths=lengths)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, [q.grad, k.grad] + [p.grad for p in eager_mod.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(mod.buffers(), eager_mod.buffers()):
        torch.testing.assert_close(a, b)
