"""The Triton kernels of attention_pooling (SPEC section 1) against din_ops.reference.

On CPU the kernels run under the Triton interpreter through ``din_ops.backend("triton")``; with
a GPU they run natively on CUDA tensors (conftest.triton_backends). Every case compares the
output, the attention weights and the gradient of every input and parameter with the reference
(autograd through the materialized ``[q, k, q - k, q * k]`` MLP).

Tolerances (max abs error relative to the reference's largest magnitude): float64 1e-10;
float32 1e-5 under the interpreter, on GPU 3e-3 (5e-3 for gradients) with the default TF32
products or 1e-4 with 3xTF32; float16 / bfloat16 5e-3 / 4e-2 on the outputs and 2e-2 / 1e-1 on
gradients (the reference itself runs in that dtype).
Grids are tiny and tiles small (CONFIG.block_m=16) so rows span several tiles.
"""
import contextlib

import pytest
import torch

import din_ops
from din_ops import reference as ref
from din_ops.triton import attention_pooling as tap

from conftest import case_lengths, triton_backends

# the sigmoid of a very negative input overflows exp() on the way to its correct limit 0
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
BACKENDS = triton_backends()
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}


def _tol(dtype, device, grad=False):
    t = (GRAD_TOL if grad else TOL)[dtype]
    if device == "cuda" and dtype == torch.float32:
        # fp32 products on tensor cores: TF32 (10-bit mantissa) unless 3xTF32 is configured
        precise = tap.CONFIG.fp32_precision in ("tf32x3", "ieee") and \
            tap.CONFIG.fp32_precision_bwd in ("tf32x3", "ieee")
        t = 1e-4 if precise else (5e-3 if grad else 3e-3)
    return t


@contextlib.contextmanager
def _run(backend, **cfg):
    cfg.setdefault("block_m", 16)
    cfg.setdefault("block_m_bwd", 16)
    with din_ops.backend(backend), tap.configure(**cfg):
        yield


@contextlib.contextmanager
def _deterministic():
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev)


def _close(got, want, tol, what):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    g, w = got.double(), want.double()
    assert torch.isfinite(g).all(), f"{what}: non-finite values"
    err = (g - w).abs().max().item() if g.numel() else 0.0
    scale = max(1.0, w.abs().max().item() if w.numel() else 0.0)
    assert err <= tol * scale, f"{what}: max abs error {err:.3e} > {tol:.1e} * {scale:.3g}"


def make_case(B=3, T=11, D=5, hidden=(7, 6), C=1, dtype=torch.float64, device="cpu",
              activation="sigmoid", lengths="mixed", jagged=False, affine=True, prelu_shared=False,
              seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype).to(device)

    qshape = (B, D) if C == 1 else (B, C, D)
    case = dict(query=rnd(*qshape), activation=activation)
    lens = case_lengths(lengths, B, T, g)
    keys = rnd(B, T, D)
    if jagged:
        assert lens is not None
        case["keys"] = ref.padded_to_jagged(keys, lens.to(device))
        offs = torch.zeros(B + 1, dtype=torch.int64)
        offs[1:] = torch.cumsum(lens, 0)
        case["offsets"] = offs.to(device)
    else:
        case["keys"] = keys
        if lens is not None:
            case["lengths"] = lens.to(torch.int32).to(device)
    dims = [4 * D, *hidden, 1]
    case["weights"] = [rnd(dims[i + 1], dims[i], s=dims[i] ** -0.5 * 1.5) for i in range(len(dims) - 1)]
    case["biases"] = [rnd(dims[i + 1], s=0.3) for i in range(len(dims) - 1)]
    if activation == "prelu":
        case["prelu_weights"] = [rnd(1 if prelu_shared else h, s=0.3) for h in hidden]
    if activation == "dice":
        case["dice_alpha"] = [rnd(h, s=0.3) for h in hidden]
        case["dice_running_mean"] = [rnd(h, s=0.3).to(torch.float64 if dtype == torch.float64 else torch.float32)
                                     for h in hidden]
        case["dice_running_var"] = [(rnd(h, s=0.3).abs() + 0.5).to(torch.float64 if dtype == torch.float64
                                                                    else torch.float32) for h in hidden]
        if affine:
            case["dice_gamma"] = [1.0 + rnd(h, s=0.2) for h in hidden]
            case["dice_beta"] = [rnd(h, s=0.2) for h in hidden]
    return case


_LEAVES = ("query", "keys", "weights", "biases", "prelu_weights", "dice_alpha", "dice_gamma", "dice_beta",
           "dice_running_mean", "dice_running_var")


def _leaves(case, training):
    names = []
    for name in _LEAVES:
        if name not in case:
            continue
        if name.startswith("dice_running") and training:
            continue  # in training the batch statistics replace them
        names.append(name)
    return names


def _clone(case, training):
    out = {}
    for k, v in case.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().clone()
        elif isinstance(v, list):
            v = [t.detach().clone() for t in v]
        out[k] = v
    for name in _leaves(case, training):
        v = out[name]
        for t in (v if isinstance(v, list) else [v]):
            t.requires_grad_(True)
    return out


def _evaluate(fn, case, normalization, scale, training, seed=1, attn_grad=None):
    c = _clone(case, training)
    kw = {k: v for k, v in c.items() if k not in ("query", "keys", "weights", "biases")}
    out, attn = fn(c["query"], c["keys"], c["weights"], c["biases"], normalization=normalization,
                   scale=scale, training=training, return_weights=True, **kw)
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype).to(out.device)
    ga = torch.randn(attn.shape, generator=g, dtype=torch.float64).to(attn.dtype).to(attn.device)
    if attn_grad is not None:
        ga = attn_grad(attn)
    ((out * go).sum() + (attn * ga).sum()).backward()
    grads = {}
    for name in _leaves(case, training):
        v = c[name]
        for i, t in enumerate(v if isinstance(v, list) else [v]):
            grads[f"{name}[{i}]"] = t.grad if t.grad is not None else torch.zeros_like(t)
    return out.detach(), attn.detach(), grads


def check(case, normalization="none", scale=0.7, training=True, backend="triton", device="cpu", **cfg):
    dtype = case["query"].dtype
    with _run(backend, **cfg):
        out, attn, grads = _evaluate(din_ops.attention_pooling, case, normalization, scale, training)
    r_out, r_attn, r_grads = _evaluate(ref.attention_pooling, case, normalization, scale, training)
    _close(out, r_out, _tol(dtype, device), "out")
    _close(attn, r_attn, _tol(dtype, device), "attn")
    assert grads.keys() == r_grads.keys()
    for k in grads:
        _close(grads[k], r_grads[k], _tol(dtype, device, grad=True), f"grad {k}")
    return out, attn, grads


# --- every activation x normalization x layout (float64, tight) ---------------------------------
ACTS = [("sigmoid", {}), ("relu", {}), ("identity", {}), ("prelu", {}), ("prelu", {"prelu_shared": True}),
        ("dice", {"affine": True}), ("dice", {"affine": False})]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("normalization", ["none", "softmax"])
@pytest.mark.parametrize("layout", ["padded", "jagged"])
@pytest.mark.parametrize("act,extra", ACTS, ids=[a + ("_" + "_".join(e) if e else "") for a, e in ACTS])
def test_triton_activations(device, backend, normalization, layout, act, extra):
    case = make_case(activation=act, jagged=layout == "jagged", device=device, **extra)
    check(case, normalization, backend=backend, device=device, training=False)
    if act == "dice":  # training: batch statistics through the stats ops and their backward
        check(case, normalization, backend=backend, device=device, training=True)


# --- depth, odd sizes, candidates ---------------------------------------------------------------
@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("hidden,act", [((), "sigmoid"), ((3,), "dice"), ((5, 6, 3), "dice"),
                                        ((5, 4, 3, 6), "prelu"), ((17, 9), "sigmoid")])
@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_triton_depths(device, backend, hidden, act, normalization):
    case = make_case(hidden=hidden, activation=act, D=3, T=13, device=device)
    check(case, normalization, backend=backend, device=device, training=True)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("layout", ["padded", "jagged", "full"])
@pytest.mark.parametrize("C,max_cb", [(3, 16), (5, 2)])
def test_triton_candidates(device, backend, layout, C, max_cb):
    case = make_case(C=C, activation="dice", T=7, D=7, hidden=(5, 3), jagged=layout == "jagged",
                     lengths="none" if layout == "full" else "mixed", device=device)
    for norm in ("none", "softmax"):
        check(case, norm, backend=backend, device=device, training=True, max_cb=max_cb)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_triton_odd_sizes_long_rows(device, backend):
    # D = 17 pads to 32, H = 19 pads to 32; rows of 37 positions span three tiles of 16
    case = make_case(B=2, T=37, D=17, hidden=(19,), activation="relu", lengths="full", device=device)
    check(case, "softmax", backend=backend, device=device)
    case = make_case(B=2, T=37, D=17, hidden=(19,), activation="relu", lengths="none", device=device)
    check(case, "none", backend=backend, device=device)


# --- degenerate batches ---------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_triton_empty_rows(device, backend, normalization):
    case = make_case(B=3, T=5, activation="dice", device=device)
    case["lengths"] = torch.tensor([0, 3, 0], dtype=torch.int64, device=device)
    out, attn, grads = check(case, normalization, backend=backend, device=device)
    assert (out[0] == 0).all() and (out[2] == 0).all()
    assert (attn[0] == 0).all() and (attn[1, 3:] == 0).all()
    assert (grads["keys[0]"][0] == 0).all() and (grads["keys[0]"][1, 3:] == 0).all()
    # every row empty, jagged: N = 0
    case = make_case(B=2, T=4, activation="prelu", jagged=True, lengths="full", device=device)
    case["keys"] = case["keys"][:0]
    case["offsets"] = torch.zeros(3, dtype=torch.int64, device=device)
    out, attn, grads = check(case, normalization, backend=backend, device=device)
    assert (out == 0).all() and attn.shape == (0,)
    # padded with T = 0
    case = make_case(B=2, T=0, activation="sigmoid", lengths="full", device=device)
    out, attn, grads = check(case, normalization, backend=backend, device=device)
    assert (out == 0).all() and attn.shape == (2, 0)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("layout", ["padded", "jagged"])
def test_triton_zero_batch(device, backend, layout):
    case = make_case(B=0, T=4, activation="dice", jagged=layout == "jagged", lengths="full", device=device)
    out, attn, grads = check(case, "softmax", backend=backend, device=device)
    assert out.shape == (0, 5)


# --- low precision ----------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["sigmoid", "dice"])
def test_triton_dtypes(device, backend, dtype, act):
    case = make_case(B=3, T=19, D=6, hidden=(8, 5), activation=act, dtype=dtype, device=device)
    for norm in ("none", "softmax"):
        out, attn, grads = check(case, norm, backend=backend, device=device, training=act == "dice")
        assert out.dtype == dtype and attn.dtype == dtype
        assert all(g.dtype == (torch.float32 if k.startswith("dice_running") else dtype)
                   for k, g in grads.items())


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_softmax_backward_renormalizes_rounded_weights(device, backend, dtype):
    """As the CPU kernel (tests/test_attention_pooling.py): the last layer's bias gradient is
    exactly 0 under softmax, and the saved fp16/bf16 weights, divided by their sum, keep it at 0
    to float rounding (not (1 - sum w) sum w dw)."""
    case = make_case(B=3, T=40, D=6, hidden=(8, 5), dtype=dtype, device=device, lengths="full")
    case["keys"] = (case["keys"].float() * 20).to(dtype)
    with _run(backend):
        _, _, grads = _evaluate(din_ops.attention_pooling, case, "softmax", 1.0, True, attn_grad=torch.zeros_like)
    last = f"biases[{len(case['biases']) - 1}]"
    assert float(grads[last].double().abs().max()) < 1e-4


# --- layouts agree, determinism ---------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_triton_padded_equals_jagged(device, backend, normalization):
    # T = 16 and N / B >= 16 give both layouts the same tile size, so the same arithmetic
    B, T = 3, 16
    pad = make_case(B=B, T=T, activation="dice", lengths="full", dtype=torch.float32, device=device)
    lens = torch.tensor([16, 9, 16], device=device)
    pad["lengths"] = lens
    jag = dict(pad)
    del jag["lengths"]
    jag["keys"] = ref.padded_to_jagged(pad["keys"], lens)
    jag["offsets"] = torch.tensor([0, 16, 25, 41], device=device)
    ga = torch.randn(B, T, device=device)
    with _run(backend), _deterministic():  # no atomics: bitwise comparable
        po, pa, pg = _evaluate(din_ops.attention_pooling, pad, normalization, 0.5, True, attn_grad=lambda a: ga)
        jo, ja, jg = _evaluate(din_ops.attention_pooling, jag, normalization, 0.5, True,
                               attn_grad=lambda a: ref.padded_to_jagged(ga, lens))
    assert torch.equal(po, jo)
    assert torch.equal(ref.padded_to_jagged(pa, lens), ja)
    for k in pg:
        want = ref.padded_to_jagged(pg[k], lens) if k == "keys[0]" else pg[k]
        assert torch.equal(want, jg[k]), k


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_triton_deterministic(device, backend):
    case = make_case(B=5, T=23, activation="dice", dtype=torch.float32, device=device)
    with _deterministic(), _run(backend, programs_per_sm=1, interpreter_programs=2):
        runs = [_evaluate(din_ops.attention_pooling, case, "softmax", 1.0, True) for _ in range(2)]
    (o1, a1, g1), (o2, a2, g2) = runs
    assert torch.equal(o1, o2) and torch.equal(a1, a2)
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k


# --- op level -----------------------------------------------------------------------------------------
def _op_args(case):
    acc = torch.float64 if case["query"].dtype == torch.float64 else torch.float32
    return (case["query"], case["keys"], case.get("lengths"), case.get("offsets"), case["weights"],
            case["biases"], case.get("dice_alpha", []), [m.to(acc) for m in case.get("dice_running_mean", [])],
            [v.to(acc) for v in case.get("dice_running_var", [])], case.get("dice_gamma", []),
            case.get("dice_beta", []))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_triton_stats_match_reference(device, backend):
    case = make_case(B=4, T=9, C=2, activation="dice", hidden=(6, 5), device=device)
    q, k, L, O, W, bb, a, m, v, g, be = _op_args(case)
    with _run(backend):
        mean0, var0 = torch.ops.din_ops.attention_pooling_stats(q, k, L, O, W[:1], bb[:1], [], [], [], [], [],
                                                                "dice", 1e-8)
        mean1, var1 = torch.ops.din_ops.attention_pooling_stats(q, k, L, O, W[:2], bb[:2], a[:1], [mean0],
                                                                [var0], g[:1], be[:1], "dice", 1e-8)
    # reference: layer pre-activations over valid (position, candidate) pairs
    B, C, T, D = 4, 2, 9, 5
    mask = ref.valid_mask(L, B, T, k.device)[:, None, :].expand(B, C, T)
    qe = q[:, :, None, :].expand(B, C, T, D)
    ke = k[:, None].expand(B, C, T, D)
    z0 = torch.nn.functional.linear(torch.cat([qe, ke, qe - ke, qe * ke], -1), W[0], bb[0])
    rm0, rv0, _ = ref.masked_moments(z0, mask)
    h0 = ref.dice_pointwise(z0, a[0], rm0, rv0, g[0], be[0], 1e-8)
    z1 = torch.nn.functional.linear(h0, W[1], bb[1])
    rm1, rv1, _ = ref.masked_moments(z1, mask)
    for got, want in ((mean0, rm0), (var0, rv0), (mean1, rm1), (var1, rv1)):
        _close(got, want, 1e-10, "stats")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_triton_opcheck(device, backend):
    case = make_case(B=2, T=5, D=3, hidden=(4,), activation="dice", device=device)
    q, k, L, O, W, bb, a, m, v, g, be = _op_args(case)
    ops = torch.ops.din_ops
    with _run(backend):
        out, attn = ops.attention_pooling(q, k, L, O, W, bb, a, m, v, g, be, "dice", "softmax", 0.5, 1e-8)
        mean, var = ops.attention_pooling_stats(q, k, L, O, W[:1], bb[:1], [], [], [], [], [], "dice", 1e-8)
        calls = [
            (ops.attention_pooling, (q, k, L, O, W, bb, a, m, v, g, be, "dice", "softmax", 0.5, 1e-8)),
            (ops.attention_pooling_backward, (torch.randn_like(out), torch.randn_like(attn), attn, q, k, L, O,
                                              W, bb, a, m, v, g, be, "dice", "softmax", 0.5, 1e-8)),
            (ops.attention_pooling_stats, (q, k, L, O, W[:1], bb[:1], [], [], [], [], [], "dice", 1e-8)),
            (ops.attention_pooling_stats_backward, (torch.randn_like(mean), torch.randn_like(var), mean, q, k,
                                                    L, O, W[:1], bb[:1], [], [], [], [], [], "dice", 1e-8)),
        ]
        for op, args in calls:
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_triton_too_many_layers(device, backend):
    case = make_case(hidden=(3, 3, 3, 3, 3), device=device)
    with _run(backend), pytest.raises(ValueError, match="at most 4 hidden"):
        din_ops.attention_pooling(case["query"], case["keys"], case["weights"], case["biases"],
                                  lengths=case["lengths"])


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_triton_gradcheck(device, backend, normalization):
    # the kernels' backward against finite differences of their own forward (dice in training:
    # the statistics ops and their backward take part)
    case = make_case(B=2, T=3, D=2, hidden=(3,), activation="dice", affine=True, device=device)
    names = ["query", "keys", "weights", "biases", "dice_alpha", "dice_gamma"]
    flat, spec = [], []
    for name in names:
        v = case[name]
        for i, t in enumerate(v if isinstance(v, list) else [v]):
            flat.append(t.detach().clone().requires_grad_(True))
            spec.append((name, isinstance(v, list)))

    def fn(*tensors):
        kw, it = {}, iter(tensors)
        for (name, is_list), t in zip(spec, it):
            if is_list:
                kw.setdefault(name, []).append(t)
            else:
                kw[name] = t
        return din_ops.attention_pooling(
            kw["query"], kw["keys"], kw["weights"], kw["biases"], lengths=case["lengths"],
            activation="dice", dice_alpha=kw["dice_alpha"], dice_gamma=kw["dice_gamma"],
            dice_beta=case["dice_beta"], normalization=normalization, scale=0.9, return_weights=True)

    with _run(backend):
        assert torch.autograd.gradcheck(fn, tuple(flat), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_triton_shared_memory_fallback():
    # a variant the GPU cannot fit is retried with 3xTF32 -> TF32, then fewer tile rows
    from triton.runtime.errors import OutOfResources

    calls = []

    class FakeKernel:
        __name__ = "fake"

        def __getitem__(self, grid):
            def launch(*args, **kw):
                calls.append((kw["PREC"], kw["BT"]))
                if kw["PREC"] == "tf32x3" or kw["BT"] > 16:
                    raise OutOfResources(300000, 232448, "shared memory")
            return launch

    tap._FALLBACK.clear()
    tap._launch(FakeKernel(), 1, (torch.zeros(1),), dict(PREC="tf32x3", BT=64, CB=1))
    assert calls == [("tf32x3", 64), ("tf32", 64), ("tf32", 32), ("tf32", 16)]
    calls.clear()
    tap._launch(FakeKernel(), 1, (torch.zeros(1),), dict(PREC="tf32x3", BT=64, CB=1))
    assert calls == [("tf32", 16)]  # remembered

    class Never(FakeKernel):
        def __getitem__(self, grid):
            def launch(*args, **kw):
                raise OutOfResources(300000, 232448, "shared memory")
            return launch

    with pytest.raises(RuntimeError, match="too wide"):
        tap._launch(Never(), 1, (torch.zeros(1, dtype=torch.float64),), dict(PREC="ieee", BT=16, CB=1))
    tap._FALLBACK.clear()
