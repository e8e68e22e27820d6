"""dice (SPEC section 2): the C++ CPU path and the Triton path against din_ops.reference.dice.

Every case compares the output, the gradients of x, alpha, gamma and beta (of a random linear
functional of y, so padded outputs get gradient too) and the running statistics after the
update. Tolerances: float64 1e-10, float32 1e-5 (relative and absolute), fp16 2e-3 and bf16
2e-2 on outputs against the float64 reference of the same (rounded) inputs.
"""
import copy
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import din_ops
from din_ops import reference as R

from conftest import triton_backends

ops = torch.ops.din_ops
LAYOUTS = ["padded", "padded_all", "flat", "jagged"]


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_case(layout, B=5, T=7, C=13, dtype=torch.float64, affine=True, seed=0, lengths=None,
              lengths_dtype=torch.int64):
    """x with a different mean and scale per channel; lengths include an empty and a full row."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * s

    if lengths is None:
        lengths = torch.randint(0, T + 1, (B,), generator=g)
        if B > 1:
            lengths[0], lengths[-1] = 0, T
    shift, scale = rnd(C, s=2.0), rnd(C).abs() + 0.5
    rows = {}
    if layout in ("padded", "padded_all"):
        x = rnd(B, T, C) * scale + shift
        if layout == "padded":
            rows = dict(lengths=lengths.to(lengths_dtype))
    elif layout == "flat":
        x = rnd(B * T, C) * scale + shift
    else:
        x = rnd(int(lengths.sum()), C) * scale + shift
        rows = dict(offsets=torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]))
    params = dict(alpha=rnd(C, s=0.5).to(dtype),
                  gamma=(1 + rnd(C, s=0.2)).to(dtype) if affine else None,
                  beta=rnd(C, s=0.3).to(dtype) if affine else None)
    stats = dict(running_mean=rnd(C, s=0.1).to(acc_of(dtype)),
                 running_var=(rnd(C, s=0.1).abs() + 0.5).to(acc_of(dtype)))
    return x.to(dtype), rows, params, stats


def run(fn, x, rows, params, stats, training=True, seed=1, momentum=0.1, eps=1e-8, grad_w=None):
    """y, the gradients of x/alpha/gamma/beta of sum(w * y), and the updated running stats."""
    if grad_w is None:
        grad_w = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    xl = x.detach().clone().requires_grad_()
    p = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in params.items()}
    s = {k: (v.clone() if v is not None else None) for k, v in stats.items()}
    y = fn(xl, p["alpha"], s.get("running_mean"), s.get("running_var"), gamma=p["gamma"], beta=p["beta"],
           training=training, momentum=momentum, eps=eps, **rows)
    (y.double() * grad_w.to(y.device)).sum().backward()
    grads = [xl.grad] + [p[k].grad for k in ("alpha", "gamma", "beta") if p[k] is not None]
    return [y.detach()] + grads + [t for t in s.values() if t is not None]


def upcast(x, params, stats):
    return (x.double(), {k: (v.double() if v is not None else None) for k, v in params.items()},
            {k: v.double() for k, v in stats.items()})


def assert_all_close(got, want, rtol, atol):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.isfinite(a).all(), f"result {i} is not finite"
        torch.testing.assert_close(a.double().cpu(), b.double().cpu(), rtol=rtol, atol=atol, msg=lambda m: f"result {i}: {m}")


# --- the C++ CPU path against the reference ----------------------------------------------------------
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_reference_float64(layout, affine, training):
    x, rows, params, stats = make_case(layout, affine=affine)
    got = run(din_ops.dice, x, rows, params, stats, training)
    want = run(R.dice, x, rows, params, stats, training)
    assert_all_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_reference_float32(layout, training):
    """1e-5 against the float64 reference; the alpha/gamma/beta gradients are sums over all rows
    whose float32 rounding grows with the row count, so they may also be off by up to twice the
    float32 reference's own error."""
    x, rows, params, stats = make_case(layout, dtype=torch.float32, B=11, T=17, C=37)
    got = run(din_ops.dice, x, rows, params, stats, training)
    ref32 = run(R.dice, x, rows, params, stats, training)
    want = run(R.dice, *upcast(x, params, stats)[:1], rows, *upcast(x, params, stats)[1:], training)
    assert_all_close(got[:2] + got[-2:], want[:2] + want[-2:], rtol=1e-5, atol=1e-5)
    for a, r, b in zip(got[2:-2], ref32[2:-2], want[2:-2]):
        ref_err = (r.double() - b).abs().max().item()
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=max(1e-5, 2 * ref_err))


# (dtype, output tolerance, gradient tolerance): one rounding of y / dx to the dtype, sums in fp32
HALF = [(torch.float16, 2e-3, 1e-2), (torch.bfloat16, 2e-2, 5e-2)]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype,tol,gtol", HALF)
def test_half_precision(dtype, tol, gtol, training):
    x, rows, params, stats = make_case("padded", dtype=dtype, B=9, T=16, C=24)
    got = run(din_ops.dice, x, rows, params, stats, training)
    want = run(R.dice, upcast(x, params, stats)[0], rows, *upcast(x, params, stats)[1:], training)
    for a, b in zip(got, want):
        assert a.dtype in (dtype, torch.float32)
    # gradients of alpha/gamma/beta are sums over all rows: compare relative to their scale
    assert_all_close(got[:2], want[:2], rtol=tol, atol=tol * 5)
    for a, b in zip(got[2:5], want[2:5]):
        torch.testing.assert_close(a.double(), b, rtol=gtol, atol=gtol * b.abs().max().item())
    assert_all_close(got[5:], want[5:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_as_accurate_as_rounding(dtype, training):
    """fp16/bf16 outputs are the float64 reference rounded once to the dtype, up to what float
    arithmetic adds: relative to |x|, the mean error is within 1% of correct rounding's and the
    largest within 10% (float32 statistics move a few values across a rounding boundary). The
    kernels' exp for half-precision results is a lower-degree polynomial; a sigmoid off by 2e-4
    (bf16) or 1e-5 (fp16) relative would raise the mean past the bound."""
    g = torch.Generator().manual_seed(3)
    B, T, C = 64, 40, 48
    x = (torch.randn(B, T, C, generator=g) * 2 + 0.5).to(dtype)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    alpha = (torch.randn(C, generator=g) * 0.25).to(dtype)
    mean, var = 0.5 + 0.1 * torch.randn(C, generator=g), 4 + torch.rand(C, generator=g)
    y = din_ops.dice(x, alpha, mean.clone(), var.clone(), lengths=lengths, training=training)
    ref = R.dice(x.double(), alpha.double(), mean.double(), var.double(), lengths=lengths, training=training)
    ax = x.double().abs().clamp_min(1e-30)
    err = (y.double() - ref).abs() / ax
    rounding = (ref.to(dtype).double() - ref).abs() / ax
    assert err.max().item() <= 1.1 * rounding.max().item()
    assert err.mean().item() <= 1.01 * rounding.mean().item()


@pytest.mark.parametrize("shape", [(3, 1000, 5), (97, 9, 3), (1, 1, 1)])
def test_long_rows_and_many_parts(shape):
    """Rows longer than a block and more batch rows than reduction parts (Chan merges)."""
    B, T, C = shape
    x, rows, params, stats = make_case("padded", B=B, T=T, C=C)
    assert_all_close(run(din_ops.dice, x, rows, params, stats), run(R.dice, x, rows, params, stats), 1e-10, 1e-10)
    x, rows, params, stats = make_case("flat", B=B, T=T, C=C)
    assert_all_close(run(din_ops.dice, x, rows, params, stats), run(R.dice, x, rows, params, stats), 1e-10, 1e-10)


def test_large_mean_is_stable():
    """A large common offset: the combined (count, mean, M2) keeps the variance accurate."""
    x, rows, params, stats = make_case("padded", dtype=torch.float32, B=40, T=50, C=4)
    x = x + 1e4
    got = run(din_ops.dice, x, rows, params, stats)
    mask = R.valid_mask(rows["lengths"], 40, 50)
    _, var, _ = R.masked_moments(x.double(), mask)
    torch.testing.assert_close(ops.dice(x, rows["lengths"], params["alpha"], None, None, None, None, True, 1e-8)[2],
                               var.float(), rtol=1e-4, atol=1e-4)
    assert all(torch.isfinite(t).all() for t in got)


def test_lengths_int32_and_noncontiguous_x():
    x, rows, params, stats = make_case("padded", lengths_dtype=torch.int32)
    want = run(R.dice, x, rows, params, stats)
    assert_all_close(run(din_ops.dice, x, rows, params, stats), want, 1e-10, 1e-10)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    assert not xt.is_contiguous()
    assert_all_close(run(din_ops.dice, xt, rows, params, stats), want, 1e-10, 1e-10)


def test_gradcheck():
    x, rows, params, stats = make_case("padded", B=4, T=3, C=3)
    leaves = [x.requires_grad_(), *(params[k].requires_grad_() for k in ("alpha", "gamma", "beta"))]

    def train(x, a, g, b):
        return din_ops.dice(x, a, gamma=g, beta=b, **rows)

    def evaluate(x, a, g, b):
        return din_ops.dice(x, a, stats["running_mean"], stats["running_var"], gamma=g, beta=b, training=False, **rows)

    assert torch.autograd.gradcheck(train, leaves)
    assert torch.autograd.gradcheck(evaluate, leaves)
    xf, rf, pf, _ = make_case("flat", B=2, T=3, C=2, affine=False)
    assert torch.autograd.gradcheck(lambda x, a: din_ops.dice(x, a), (xf.requires_grad_(), pf["alpha"].requires_grad_()))


# --- padding never enters ---------------------------------------------------------------------------
def test_padding_never_enters_statistics():
    """Huge garbage in the padding changes nothing on the valid rows, bit for bit; the padded
    result equals the jagged result of the same rows."""
    x, rows, params, stats = make_case("padded", B=6, T=9, C=7)
    lengths = rows["lengths"]
    mask = R.valid_mask(lengths, 6, 9)
    w = torch.randn(x.shape, dtype=torch.float64) * mask[..., None]  # no gradient into padding
    clean = torch.where(mask[..., None], x, 0.0)
    dirty = torch.where(mask[..., None], x, 1e6 * torch.randn_like(x))
    a = run(din_ops.dice, clean, rows, params, stats, grad_w=w)
    b = run(din_ops.dice, dirty, rows, params, stats, grad_w=w)
    assert torch.equal(a[0][mask], b[0][mask]) and torch.equal(a[1][mask], b[1][mask])
    for t, u in zip(a[2:], b[2:]):  # alpha, gamma, beta grads and running stats
        assert torch.equal(t, u)
    # jagged form of the same rows
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    j = run(din_ops.dice, x[mask], dict(offsets=offsets), params, stats, grad_w=w[mask])
    torch.testing.assert_close(j[0], b[0][mask], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(j[1], b[1][mask], rtol=1e-12, atol=1e-12)
    for t, u in zip(j[2:], b[2:]):
        torch.testing.assert_close(t, u, rtol=1e-12, atol=1e-12)
    y, mean, var = ops.dice(dirty, lengths, params["alpha"], None, None, None, None, True, 1e-8)
    torch.testing.assert_close(mean, x[mask].mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, x[mask].var(0, unbiased=False), rtol=1e-12, atol=1e-12)


# --- degenerate batches -------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["padded", "flat", "B0"])
def test_zero_valid_rows(layout):
    C = 4
    if layout == "padded":
        x, rows = torch.randn(3, 5, C, dtype=torch.float64), dict(lengths=torch.zeros(3, dtype=torch.int64))
    elif layout == "flat":
        x, rows = torch.randn(0, C, dtype=torch.float64), {}
    else:
        x, rows = torch.randn(0, 5, C, dtype=torch.float64), dict(lengths=torch.zeros(0, dtype=torch.int64))
    _, _, params, stats = make_case("flat", C=C)
    got = run(din_ops.dice, x, rows, params, stats)
    want = run(R.dice, x, rows, params, stats)
    assert_all_close(got, want, 1e-10, 1e-10)
    assert torch.equal(got[-2], stats["running_mean"]) and torch.equal(got[-1], stats["running_var"])
    _, mean, var = ops.dice(x, rows.get("lengths"), params["alpha"], None, None, None, None, True, 1e-8)
    assert torch.equal(mean, torch.zeros(C, dtype=torch.float64)) and torch.equal(var, torch.zeros(C, dtype=torch.float64))


def test_one_valid_row():
    x, rows, params, stats = make_case("padded", B=3, T=4, C=5, lengths=torch.tensor([0, 1, 0]))
    got = run(din_ops.dice, x, rows, params, stats)
    want = run(R.dice, x, rows, params, stats)
    assert_all_close(got, want, 1e-9, 1e-9)
    # variance 0: the normalized value is exactly 0, so p = sigmoid(beta) on the valid row
    a, b = params["alpha"], params["beta"]
    p = torch.sigmoid(b)
    torch.testing.assert_close(got[0][1, 0], x[1, 0] * (a + (1 - a) * p), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(got[-2], 0.9 * stats["running_mean"] + 0.1 * x[1, 0], rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(got[-1], 0.9 * stats["running_var"], rtol=1e-14, atol=1e-14)


def test_deterministic_across_runs_and_threads():
    x, rows, params, stats = make_case("padded", dtype=torch.float32, B=300, T=40, C=19)
    first = run(din_ops.dice, x, rows, params, stats)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run(din_ops.dice, x, rows, params, stats)
    finally:
        torch.set_num_threads(threads)
    again = run(din_ops.dice, x, rows, params, stats)
    for a, b, c in zip(first, single, again):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_instruction_set_variants_agree():
    """The AVX2 and baseline builds of the row loops (chosen at run time) match the reference."""
    code = textwrap.dedent("""
        import torch, din_ops
        from din_ops import reference as R
        torch.manual_seed(0)
        x = torch.randn(6, 33, 21) * 2 + 1
        lengths = torch.tensor([0, 33, 5, 1, 17, 30])
        a, g, b = torch.rand(21), torch.rand(21) + 0.5, torch.randn(21)
        for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)):
            xs = x.to(dt)
            y, m, v = torch.ops.din_ops.dice(xs, lengths, a.to(dt), g.to(dt), b.to(dt), None, None, True, 1e-8)
            ref = R.dice(xs.double(), a.to(dt).double(), lengths=lengths, gamma=g.to(dt).double(), beta=b.to(dt).double())
            torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
        print("ok")
    """)
    for isa in ("avx2", "base"):
        env = dict(__import__("os").environ, DIN_OPS_CPU_ISA=isa)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


# --- DeepCTR-Torch's Dice (BatchNorm1d, then sigmoid, then the alpha mix) ---------------------------------
class DeepCTRDice(nn.Module):
    """Written after DeepCTR-Torch's ``deepctr_torch.layers.activation.Dice``."""

    def __init__(self, emb_size, dim=2, epsilon=1e-8):
        super().__init__()
        self.bn = nn.BatchNorm1d(emb_size, eps=epsilon)
        self.sigmoid = nn.Sigmoid()
        self.dim = dim
        self.alpha = nn.Parameter(torch.zeros(emb_size) if dim == 2 else torch.zeros(emb_size, 1))

    def forward(self, x):
        if self.dim == 2:
            x_p = self.sigmoid(self.bn(x))
            return self.alpha * (1 - x_p) * x + x_p * x
        x = torch.transpose(x, 1, 2)
        x_p = self.sigmoid(self.bn(x))
        out = self.alpha * (1 - x_p) * x + x_p * x
        return torch.transpose(out, 1, 2)


@pytest.mark.parametrize("dim", [2, 3])
def test_equals_deepctr_dice_without_lengths(dim):
    C = 6
    ref = DeepCTRDice(C, dim=dim)
    mod = din_ops.nn.Dice(C, affine=True)
    with torch.no_grad():
        a, g, b = torch.rand(C), torch.rand(C) + 0.5, torch.randn(C) * 0.3
        mod.alpha.copy_(a), mod.gamma.copy_(g), mod.beta.copy_(b)
        ref.alpha.copy_(a.view(ref.alpha.shape)), ref.bn.weight.copy_(g), ref.bn.bias.copy_(b)
    shape = (64, C) if dim == 2 else (8, 9, C)
    for step in range(3):
        for m in (mod, ref):
            m.train(step < 2)
        x = torch.randn(shape) * 2 + torch.arange(C)
        w = torch.randn(shape)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = mod(xa), ref(xb)
        (ya * w).sum().backward()
        (yb * w).sum().backward()
        torch.testing.assert_close(ya, yb, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(mod.running_mean, ref.bn.running_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(mod.running_var, ref.bn.running_var, rtol=1e-6, atol=1e-6)
    # float32 sums over 3 x 64 rows in two different orders (and FMA contractions): a few float32
    # ulps of the terms apart, which after cancellation can exceed 1e-5 of a small total
    torch.testing.assert_close(mod.alpha.grad, ref.alpha.grad.view(-1), rtol=1e-5, atol=3e-5)
    torch.testing.assert_close(mod.gamma.grad, ref.bn.weight.grad, rtol=1e-5, atol=3e-5)
    torch.testing.assert_close(mod.beta.grad, ref.bn.bias.grad, rtol=1e-5, atol=3e-5)


# --- the module, opcheck, torch.compile ------------------------------------------------------------------
def test_module_matches_functional_reference():
    mod = din_ops.nn.Dice(5, affine=True).double()
    assert torch.equal(mod.alpha, torch.zeros(5, dtype=torch.float64)) and torch.equal(mod.gamma, torch.ones(5, dtype=torch.float64))
    assert torch.equal(mod.running_var, torch.ones(5, dtype=torch.float64)) and mod.beta is not None
    assert din_ops.nn.Dice(5).gamma is None and din_ops.nn.Dice(5).beta is None
    with torch.no_grad():
        mod.alpha.uniform_(), mod.beta.normal_()
    x, rows, _, _ = make_case("padded", C=5)
    rm, rv = mod.running_mean.clone(), mod.running_var.clone()
    y = mod(x, **rows)
    yr = R.dice(x, mod.alpha, rm, rv, gamma=mod.gamma, beta=mod.beta, **rows)
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mod.running_var, rv, rtol=1e-12, atol=1e-12)
    mod.eval()
    torch.testing.assert_close(mod(x, **rows), R.dice(x, mod.alpha, rm, rv, gamma=mod.gamma, beta=mod.beta,
                                                      training=False, **rows), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("layout", ["padded", "flat"])
def test_opcheck(layout, affine):
    x, rows, params, stats = make_case(layout, B=3, T=4, C=5, affine=affine)
    lengths = rows.get("lengths")
    for training in (True, False):
        leaves = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in params.items()}
        rm, rv = (None, None) if training else (stats["running_mean"], stats["running_var"])
        args = (x.clone().requires_grad_(), lengths, leaves["alpha"], leaves["gamma"], leaves["beta"], rm, rv, training, 1e-8)
        torch.library.opcheck(ops.dice, args)
        y, mean, var = ops.dice(*args)
        bargs = (torch.randn_like(y), x, lengths, params["alpha"], params["gamma"], params["beta"], mean, var, training, 1e-8)
        torch.library.opcheck(ops.dice_backward, bargs)


@pytest.mark.parametrize("layout", ["padded", "jagged"])
def test_torch_compile_fullgraph(layout):
    mod = din_ops.nn.Dice(5, affine=True).double()
    x, rows, _, _ = make_case(layout, C=5)
    eager = copy.deepcopy(mod)
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    outs = []
    for m in (compiled, eager):
        xl = x.clone().requires_grad_()
        y = m(xl, **rows)
        y.square().sum().backward()
        outs.append([y.detach(), xl.grad] + [p.grad for p in (mod if m is compiled else eager).parameters()]
                    + list((mod if m is compiled else eager).buffers()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_torch_compile_inductor():
    mod = din_ops.nn.Dice(4)
    x = torch.randn(3, 5, 4, requires_grad=True)
    lengths = torch.tensor([5, 0, 2])
    y = torch.compile(copy.deepcopy(mod), fullgraph=True)(x, lengths)
    y.sum().backward()
    xe = x.detach().clone().requires_grad_()
    ye = mod(xe, lengths)
    ye.sum().backward()
    torch.testing.assert_close(y, ye)
    torch.testing.assert_close(x.grad, xe.grad)


# --- bad input: a clear error naming the argument, before any kernel runs -----------------------------
def _call(**over):
    C = 4
    kw = dict(x=torch.randn(2, 3, C), alpha=torch.zeros(C), running_mean=None, running_var=None,
              lengths=torch.tensor([3, 1]), offsets=None, gamma=None, beta=None, training=True, momentum=0.1, eps=1e-8)
    kw.update(over)
    x, alpha, rm, rv = kw.pop("x"), kw.pop("alpha"), kw.pop("running_mean"), kw.pop("running_var")
    return din_ops.dice(x, alpha, rm, rv, **kw)


BAD = {
    "x_dims": (dict(x=torch.randn(2, 3, 4, 1)), "x"),
    "x_dtype": (dict(x=torch.ones(2, 3, 4, dtype=torch.int64)), "x"),
    "x_not_tensor": (dict(x=[[1.0]]), "x"),
    "alpha_shape": (dict(alpha=torch.zeros(5)), "alpha"),
    "alpha_dims": (dict(alpha=torch.zeros(1, 4)), "alpha"),
    "alpha_dtype": (dict(alpha=torch.zeros(4, dtype=torch.float64)), "alpha"),
    "gamma_shape": (dict(gamma=torch.ones(3)), "gamma"),
    "gamma_dtype": (dict(gamma=torch.ones(4, dtype=torch.float16)), "gamma"),
    "beta_shape": (dict(beta=torch.zeros(5)), "beta"),
    "running_mean_shape": (dict(running_mean=torch.zeros(3), running_var=torch.ones(4)), "running_mean"),
    "running_var_shape": (dict(running_mean=torch.zeros(4), running_var=torch.ones(2)), "running_var"),
    "running_var_dtype": (dict(running_mean=torch.zeros(4), running_var=torch.ones(4, dtype=torch.float64)),
                          "running_var"),
    "running_stats_int": (dict(running_mean=torch.zeros(4, dtype=torch.int64), running_var=torch.ones(4)),
                          "running_mean"),
    "running_mean_alone": (dict(running_mean=torch.zeros(4)), "running_var"),
    "eval_without_stats": (dict(training=False), "running_mean"),
    "lengths_negative": (dict(lengths=torch.tensor([-1, 2])), "lengths"),
    "lengths_above_T": (dict(lengths=torch.tensor([4, 2])), "lengths"),
    "lengths_shape": (dict(lengths=torch.tensor([1, 2, 3])), "lengths"),
    "lengths_dtype": (dict(lengths=torch.tensor([1.0, 2.0])), "lengths"),
    "lengths_with_2d_x": (dict(x=torch.randn(6, 4)), "lengths"),
    "offsets_with_3d_x": (dict(lengths=None, offsets=torch.tensor([0, 3, 6])), "offsets"),
    "offsets_and_lengths": (dict(x=torch.randn(6, 4), offsets=torch.tensor([0, 3, 6])), "lengths"),
    "offsets_start": (dict(x=torch.randn(6, 4), lengths=None, offsets=torch.tensor([1, 3, 6])), "offsets[0]"),
    "offsets_end": (dict(x=torch.randn(6, 4), lengths=None, offsets=torch.tensor([0, 3, 5])), "offsets[-1]"),
    "offsets_decreasing": (dict(x=torch.randn(6, 4), lengths=None, offsets=torch.tensor([0, 4, 2, 6])),
                           "non-decreasing"),
    "offsets_dtype": (dict(x=torch.randn(6, 4), lengths=None, offsets=torch.tensor([0.0, 6.0])), "offsets"),
    "eps_zero": (dict(eps=0.0), "eps"),
    "eps_nan": (dict(eps=float("nan")), "eps"),
    "momentum_range": (dict(momentum=1.5), "momentum"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_names_argument(case):
    over, name = BAD[case]
    with pytest.raises((ValueError, TypeError), match=re.escape(name)):
        _call(**over)


def test_bad_input_leaves_running_stats_untouched():
    rm, rv = torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError, match="lengths"):
        _call(running_mean=rm, running_var=rv, lengths=torch.tensor([9, 1]))
    assert torch.equal(rm, torch.zeros(4)) and torch.equal(rv, torch.ones(4))


def test_kernel_rechecks_values_when_called_directly():
    """The registered ops re-check what could index out of bounds, without the Python checks."""
    x, a = torch.randn(2, 3, 4), torch.zeros(4)
    with pytest.raises(RuntimeError, match="lengths"):
        ops.dice(x, torch.tensor([5, 1]), a, None, None, None, None, True, 1e-8)
    with pytest.raises(RuntimeError, match="alpha"):
        ops.dice(x, None, torch.zeros(3), None, None, None, None, True, 1e-8)
    with pytest.raises(RuntimeError, match="running_mean"):
        ops.dice(x, None, a, None, None, None, None, False, 1e-8)
    with pytest.raises(RuntimeError, match="gamma"):
        ops.dice_backward(x, x, None, a, torch.ones(2), None, a, a, True, 1e-8)


# --- the Triton kernels (interpreted on CPU tensors, native on CUDA) --------------------------------------
TRITON_DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 1e-2), (torch.bfloat16, 2e-2, 5e-2)]


def _triton_compare(device, backend, layout, dtype, tol, gtol, training, affine=True, **shape):
    x, rows, params, stats = make_case(layout, dtype=dtype, affine=affine, **shape)
    to = lambda t: t.to(device) if t is not None else None  # noqa: E731
    xd, rd = x.to(device), {k: to(v) for k, v in rows.items()}
    pd, sd = {k: to(v) for k, v in params.items()}, {k: to(v) for k, v in stats.items()}
    with din_ops.backend(backend):
        got = run(din_ops.dice, xd, rd, pd, sd, training)
    want = run(R.dice, upcast(x, params, stats)[0], rows, *upcast(x, params, stats)[1:], training)
    assert_all_close(got[:2], want[:2], rtol=tol, atol=tol * (5 if dtype != torch.float32 else 1))
    for a, b in zip(got[2:-2], want[2:-2]):
        torch.testing.assert_close(a.double().cpu(), b, rtol=gtol, atol=gtol * max(1.0, b.abs().max().item()))
    assert_all_close(got[-2:], want[-2:], rtol=1e-5, atol=1e-5)
    return got


@pytest.mark.parametrize("device,backend", triton_backends())
@pytest.mark.parametrize("dtype,tol,gtol", TRITON_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_triton_matches_reference(device, backend, layout, dtype, tol, gtol):
    _triton_compare(device, backend, layout, dtype, tol, gtol, True, B=5, T=7, C=13)


@pytest.mark.parametrize("device,backend", triton_backends())
@pytest.mark.parametrize("affine", [True, False])
def test_triton_eval_and_affine(device, backend, affine):
    _triton_compare(device, backend, "padded", torch.float32, 1e-5, 1e-5, False, affine=affine, B=4, T=6, C=20)
    _triton_compare(device, backend, "padded", torch.float32, 1e-5, 1e-5, True, affine=affine, B=4, T=6, C=20)


@pytest.mark.parametrize("device,backend", triton_backends())
def test_triton_several_parts_and_channel_blocks(device, backend):
    # 2 channel blocks and more row tiles than one program's share
    _triton_compare(device, backend, "padded", torch.float32, 1e-5, 1e-5, True, B=9, T=70, C=130)


@pytest.mark.parametrize("device,backend", triton_backends())
def test_triton_degenerate_batches(device, backend):
    """Zero and one valid row: no NaN, the reference's values (float64: with variance 0 the
    gradient through the statistics is scaled by 1/sqrt(eps) = 1e4, beyond float32's reach),
    and no running update without valid rows."""
    for lengths in (torch.tensor([0, 0, 0]), torch.tensor([0, 1, 0])):
        got = _triton_compare(device, backend, "padded", torch.float64, 1e-9, 1e-9, True, B=3, T=4, C=5,
                              lengths=lengths)
        assert all(torch.isfinite(t).all() for t in got)
        x, rows, params, stats = make_case("padded", dtype=torch.float32, B=3, T=4, C=5, lengths=lengths)
        with din_ops.backend(backend):
            got = run(din_ops.dice, x.to(device), {"lengths": rows["lengths"].to(device)},
                      {k: v.to(device) for k, v in params.items()}, {k: v.to(device) for k, v in stats.items()})
        assert all(torch.isfinite(t).all() for t in got)
        if int(lengths.sum()) == 0:
            assert torch.equal(got[-2].cpu(), stats["running_mean"]) and torch.equal(got[-1].cpu(), stats["running_var"])


@pytest.mark.parametrize("device,backend", triton_backends())
def test_triton_padding_never_enters(device, backend):
    x, rows, params, stats = make_case("padded", dtype=torch.float32, B=4, T=6, C=5)
    mask = R.valid_mask(rows["lengths"], 4, 6)
    w = torch.randn(x.shape, dtype=torch.float64) * mask[..., None]
    res = []
    for fill in (0.0, 1e6):
        xp = torch.where(mask[..., None], x, fill).to(device)
        with din_ops.backend(backend):
            res.append(run(din_ops.dice, xp, {"lengths": rows["lengths"].to(device)},
                           {k: v.to(device) for k, v in params.items()}, {k: v.to(device) for k, v in stats.items()},
                           grad_w=w))
    a, b = res
    m = mask.to(device)
    assert torch.equal(a[0][m], b[0][m]) and torch.equal(a[1][m], b[1][m])
    for t, u in zip(a[2:], b[2:]):
        assert torch.equal(t, u)


@pytest.mark.parametrize("device,backend", triton_backends())
def test_triton_deterministic(device, backend):
    x, rows, params, stats = make_case("padded", dtype=torch.float32, B=6, T=40, C=24)
    args = (x.to(device), {"lengths": rows["lengths"].to(device)}, {k: v.to(device) for k, v in params.items()},
            {k: v.to(device) for k, v in stats.items()})
    with din_ops.backend(backend):
        a = run(din_ops.dice, *args)
        b = run(din_ops.dice, *args)
    for t, u in zip(a, b):
        assert torch.equal(t, u)


@pytest.mark.parametrize("device,backend", triton_backends())
def test_triton_float64(device, backend):
    x, rows, params, stats = make_case("jagged")
    to = lambda d: {k: (v.to(device) if v is not None else None) for k, v in d.items()}  # noqa: E731
    with din_ops.backend(backend):
        got = run(din_ops.dice, x.to(device), to(rows), to(params), to(stats))
    assert_all_close(got, run(R.dice, x, rows, params, stats), 1e-10, 1e-10)


# --- every CPU code path: run-time ISA choice, dtypes, vector-loop tails -------------------------------
# (dtype, output tolerance, gradient tolerance) against the float64 reference of the same inputs
PATH_DTYPES = [(torch.float32, 1e-5, 1e-4)] + HALF
# C around the 16-lane vectors (masked tails) and N = 0, 1 and a few rows
PATH_SHAPES = [("flat", 0, 16), ("flat", 1, 17), ("flat", 37, 1), ("flat", 5, 15), ("flat", 9, 33),
               ("flat", 3, 80), ("padded", 4, 31), ("padded", 2, 64)]


def check_paths():
    """Forward (training and eval) and backward on every PATH_DTYPES x PATH_SHAPES case, plus NaN
    and inf propagation in half precision, on whichever kernels DIN_OPS_CPU_ISA selects."""
    for dtype, tol, gtol in PATH_DTYPES:
        for layout, n, C in PATH_SHAPES:
            B, T = (n, 1) if layout == "flat" else (n, 6)
            x, rows, params, stats = make_case(layout, B=B, T=T, C=C, dtype=dtype, seed=C + n)
            for training in (True, False):
                got = run(din_ops.dice, x, rows, params, stats, training)
                want = run(R.dice, *upcast(x, params, stats)[:1], rows, *upcast(x, params, stats)[1:], training)
                # a few rows with a small variance make dx ill-conditioned (gamma rstd large): the
                # float32 reference's own error bounds the tolerance from below there
                ref32 = run(R.dice, x.float(), rows, {k: None if v is None else v.float() for k, v in params.items()},
                            stats, training)
                where = f"{dtype} {layout} n={n} C={C} training={training}"
                for i, (a, b) in enumerate(zip(got, want)):
                    assert a.dtype in (dtype, torch.float32), where
                    t = tol if i < 2 else gtol
                    scale = b.abs().max().item() if b.numel() and i in (2, 3, 4) else 1.0
                    ref_err = (ref32[i].double() - b).abs().max().item() if b.numel() else 0.0
                    torch.testing.assert_close(a.double(), b, rtol=t, atol=max(t * max(scale, 1.0), 2 * ref_err),
                                               msg=lambda m: f"{where} result {i}: {m}")
        # NaN and inf at one valid position: NaN there only (inf: p x + (1 - p) alpha x is NaN)
        x, rows, params, stats = make_case("flat", B=6, T=1, C=19, dtype=dtype)
        x = x.clone()
        x[2, 3], x[4, 17] = float("nan"), float("inf")
        for training in (True, False):
            y = din_ops.dice(x, params["alpha"], stats["running_mean"].clone(), stats["running_var"].clone(),
                             gamma=params["gamma"], beta=params["beta"], training=training)
            yr = R.dice(x.double(), params["alpha"].double(), stats["running_mean"].double(),
                        stats["running_var"].double(), gamma=params["gamma"].double(),
                        beta=params["beta"].double(), training=training)
            assert torch.equal(torch.isnan(y), torch.isnan(yr)), f"{dtype} training={training}"


@pytest.mark.parametrize("isa", ["native", "avx512", "avx2", "base"])
def test_kernel_paths_match_reference(isa):
    """The widest kernels this CPU runs (AVX-512 with AVX512-BF16 conversions where present) and
    the narrower builds that DIN_OPS_CPU_ISA forces (avx512: without AVX512-BF16; avx2; base:
    the portable loops), fp32/bf16/fp16, C not a multiple of the vector width, N = 0 and 1."""
    if isa == "native":
        check_paths()
        return
    import os
    script = textwrap.dedent("""
        import sys
        sys.path.insert(0, %r)
        import test_dice
        test_dice.check_paths()
    """) % os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, "-c", script], check=True, env=dict(os.environ, DIN_OPS_CPU_ISA=isa))
