"""Second-order gradients (``create_graph=True``) of every differentiable op against din_ops.reference.

A backward that runs with ``create_graph=True`` differentiates the op's reference computation, so
its gradients carry a graph. Checked here: ``gradgradcheck`` in float64 (fast mode, small shapes),
and ``grad(grad(<outs, v>, x, create_graph=True) . u, x)`` against the reference for every input,
with the create_graph first-order gradients equal to the fused backward's. The fused backward ops
and the in-place MBA update raise instead of yielding zeros.
"""
import pytest
import torch
from torch.autograd import gradgradcheck

import din_ops
from din_ops import reference as R

from conftest import triton_backends

ops = torch.ops.din_ops
F64 = torch.float64
# differentiating an op without an autograd kernel only warns (and yields zeros): fail instead
pytestmark = pytest.mark.filterwarnings("error:.*an autograd kernel was not registered:UserWarning")


def rnd(g, *shape, s=1.0):
    return torch.randn(shape, generator=g, dtype=F64) * s


def offsets_of(lengths):
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])


def second_order(call, impl, leaves, seed=1):
    """First-order gradients of ``<outs, v>`` (create_graph) and ``grad(<first, u>)``, zeros for None."""
    xs = [t.detach().clone().requires_grad_() for t in leaves]
    outs = call(impl, *xs)
    g = torch.Generator().manual_seed(seed)
    vs = [rnd(g, *o.shape).to(o.dtype) for o in outs]
    us = [rnd(g, *x.shape).to(x.dtype) for x in xs]
    first = torch.autograd.grad(outs, xs, vs, create_graph=True, allow_unused=True)
    s = sum((f * u).sum() for f, u in zip(first, us) if f is not None and f.requires_grad)
    second = (torch.autograd.grad(s, xs, allow_unused=True) if torch.is_tensor(s) and s.requires_grad
              else [None] * len(xs))

    def zeros_for_none(ts):
        return [torch.zeros_like(x) if t is None else t.detach() for t, x in zip(ts, xs)]

    return zeros_for_none(first), zeros_for_none(second)


def plain_grads(call, leaves, seed=1):
    """The same first-order gradients through the fused backward (create_graph=False)."""
    xs = [t.detach().clone().requires_grad_() for t in leaves]
    outs = call(din_ops, *xs)
    g = torch.Generator().manual_seed(seed)
    vs = [rnd(g, *o.shape).to(o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, xs, vs, allow_unused=True)
    return [torch.zeros_like(x) if t is None else t for t, x in zip(grads, xs)]


def assert_close_all(got, want, tol, what):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, (what, i)
        scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
        err = (a.double() - b.double()).abs().max().item() if b.numel() else 0.0
        assert err <= tol * scale, f"{what}: input {i} differs by {err:.3g} (scale {scale:.3g})"


def check_against_reference(call, leaves, tol=1e-9, seed=1):
    first, second = second_order(call, din_ops, leaves, seed)
    ref_first, ref_second = second_order(call, R, leaves, seed)
    assert_close_all(first, ref_first, tol, "first-order")
    assert_close_all(second, ref_second, tol, "second-order")
    assert any(t.abs().max() > 0 for t in ref_second if t.numel())  # a non-trivial check
    assert_close_all(plain_grads(call, leaves, seed), first, tol, "fused vs create_graph first-order")


# --- attention_pooling ---------------------------------------------------------------------------
def attention_case(act="sigmoid", normalization="none", layout="padded", C=1, lengths=(4, 0, 2), T=4, D=3,
                   hidden=(4, 3), affine=True, scale=0.7, dtype=F64, seed=0):
    """Leaf tensors (query, keys, weights, biases, activation parameters) and ``call(impl, *leaves)``."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths, dtype=torch.int64)
    B = lengths.numel()
    q = rnd(g, B, D) if C == 1 else rnd(g, B, C, D)
    if layout == "padded":
        k, rows = rnd(g, B, T, D), dict(lengths=lengths)
    else:
        k, rows = rnd(g, int(lengths.sum()), D), dict(offsets=offsets_of(lengths))
    dims = [4 * D, *hidden, 1]
    groups = {"weights": [rnd(g, dims[i + 1], dims[i], s=dims[i] ** -0.5) for i in range(len(dims) - 1)],
              "biases": [rnd(g, dims[i + 1], s=0.3) + 0.3 for i in range(len(dims) - 1)]}  # live ReLUs
    kw = dict(activation="dice" if act.startswith("dice") else act, normalization=normalization,
              scale=scale, return_weights=True, **rows)
    buffers = {}
    if act == "prelu":
        groups["prelu_weights"] = [rnd(g, h, s=0.3) for h in hidden]
    elif act.startswith("dice"):
        groups["dice_alpha"] = [rnd(g, h, s=0.5) for h in hidden]
        if affine:
            groups["dice_gamma"] = [1 + rnd(g, h, s=0.2) for h in hidden]
            groups["dice_beta"] = [rnd(g, h, s=0.2) for h in hidden]
        acc = F64 if dtype == F64 else torch.float32
        buffers = {"dice_running_mean": [rnd(g, h, s=0.3).to(acc) for h in hidden],
                   "dice_running_var": [(rnd(g, h, s=0.3).abs() + 0.5).to(acc) for h in hidden]}
        kw["training"] = act == "dice"
    leaves = [q.to(dtype), k.to(dtype)] + [t.to(dtype) for grp in groups.values() for t in grp]
    sizes = [len(grp) for grp in groups.values()]

    def call(impl, q, k, *rest):
        args = {}
        for name, n in zip(groups, sizes):
            args[name], rest = list(rest[:n]), rest[n:]
        running = {name: [t.clone() for t in ts] for name, ts in buffers.items()}  # updated in training
        return impl.attention_pooling(q, k, args.pop("weights"), args.pop("biases"), **args, **running, **kw)

    return leaves, call


ACTS = ["sigmoid", "relu", "prelu", "identity", "dice", "dice_eval"]


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("normalization", ["none", "softmax"])
@pytest.mark.parametrize("layout", ["padded", "jagged"])
@pytest.mark.parametrize("C", [1, 2])
def test_attention_pooling_second_order_matches_reference(act, normalization, layout, C):
    leaves, call = attention_case(act, normalization, layout, C, affine=C == 1)
    check_against_reference(call, leaves)


@pytest.mark.parametrize("act, normalization, layout, C, lengths, hidden, affine", [
    ("sigmoid", "none", "padded", 1, (3, 0, 2), (4, 3), True),
    ("relu", "softmax", "jagged", 2, (3, 1, 0), (4,), True),
    ("prelu", "softmax", "padded", 2, (2, 3), (3, 2), True),
    ("identity", "none", "jagged", 1, (1,), (), True),
    ("dice", "none", "jagged", 1, (4, 0, 2), (4, 3), True),
    ("dice", "softmax", "padded", 2, (3, 2, 1), (3,), False),
    ("dice_eval", "softmax", "jagged", 2, (2, 0, 3), (3, 2), True),
    ("dice", "softmax", "padded", 1, (0, 0), (3,), True),  # no valid position at all
    ("sigmoid", "softmax", "padded", 1, (), (3,), True),  # B = 0
    ("dice", "none", "jagged", 2, (), (3,), True),  # B = 0
])
def test_attention_pooling_gradgradcheck(act, normalization, layout, C, lengths, hidden, affine):
    leaves, call = attention_case(act, normalization, layout, C, lengths=lengths, T=3, D=2, hidden=hidden,
                                  affine=affine)
    leaves = [t.requires_grad_() for t in leaves]
    assert gradgradcheck(lambda *xs: call(din_ops, *xs), leaves, fast_mode=True, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_pooling_second_order_low_precision(dtype):
    """Gradients come back in the input dtype; the recompute runs at float32."""
    leaves, call = attention_case("dice", "softmax", "padded", 2, dtype=dtype)
    first, second = second_order(call, din_ops, leaves)
    ref_first, ref_second = second_order(call, R, [t.double() for t in leaves])
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for got, want in ((first, ref_first), (second, ref_second)):
        assert all(a.dtype == dtype for a in got)
        assert_close_all([a.double() for a in got], want, tol, str(dtype))


def test_attention_pooling_shared_parameter_tensor():
    """One tensor passed as two arguments (a PReLU alpha shared by both layers) gets both partials."""
    leaves, call = attention_case("prelu", "softmax", "padded", 1, hidden=(3, 3))
    shared = lambda impl, *xs: call(impl, *xs, xs[-1])  # noqa: E731
    check_against_reference(shared, leaves[:-1])


# --- attention_pooling_stats (Dice statistics inside the unit) ------------------------------------------
def stats_case(layer, layout, C, lengths=(4, 0, 2), T=4, D=3, hidden=(4, 3), affine=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths, dtype=torch.int64)
    B = lengths.numel()
    q = rnd(g, B, D) if C == 1 else rnd(g, B, C, D)
    if layout == "padded":
        k, lens, offs = rnd(g, B, T, D), lengths, None
    else:
        k, lens, offs = rnd(g, int(lengths.sum()), D), None, offsets_of(lengths)
    dims = [4 * D, *hidden]
    W = [rnd(g, dims[i + 1], dims[i], s=dims[i] ** -0.5) for i in range(layer + 1)]
    b = [rnd(g, dims[i + 1], s=0.3) for i in range(layer + 1)]
    below = hidden[:layer]
    alpha = [rnd(g, h, s=0.5) for h in below]
    mean = [rnd(g, h, s=0.3) for h in below]
    var = [rnd(g, h, s=0.3).abs() + 0.5 for h in below]
    gamma = [1 + rnd(g, h, s=0.2) for h in below] if affine else []
    beta = [rnd(g, h, s=0.2) for h in below] if affine else []
    groups = [W, b, alpha, mean, var, gamma, beta]
    leaves = [q, k] + [t for grp in groups for t in grp]
    sizes = [len(grp) for grp in groups]

    def call(impl, q, k, *rest):
        lists = []
        for n in sizes:
            lists.append(list(rest[:n]))
            rest = rest[n:]
        W, b, alpha, mean, var, gamma, beta = lists
        if impl is R:
            return R.attention_pooling_stats(q, k, W, b, lengths=lens, offsets=offs, dice_alpha=alpha,
                                             dice_mean=mean, dice_var=var, dice_gamma=gamma or None,
                                             dice_beta=beta or None, eps=1e-5)
        return ops.attention_pooling_stats(q, k, lens, offs, W, b, alpha, mean, var, gamma, beta, "dice", 1e-5)

    return leaves, call


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("layout", ["padded", "jagged"])
@pytest.mark.parametrize("C", [1, 2])
def test_attention_pooling_stats_second_order_matches_reference(layer, layout, C):
    leaves, call = stats_case(layer, layout, C, affine=C == 1)
    assert_close_all(call(din_ops, *leaves), call(R, *leaves), 1e-10, "statistics")
    check_against_reference(call, leaves)


@pytest.mark.parametrize("layout, C, lengths", [("padded", 2, (3, 0, 1)), ("jagged", 1, (2, 3)), ("padded", 1, ())])
def test_attention_pooling_stats_gradgradcheck(layout, C, lengths):
    leaves, call = stats_case(1, layout, C, lengths=lengths, T=3, D=2, hidden=(3, 2))
    leaves = [t.requires_grad_() for t in leaves]
    assert gradgradcheck(lambda *xs: call(din_ops, *xs), leaves, fast_mode=True, atol=1e-6, rtol=1e-4)


# --- dice ----------------------------------------------------------------------------------------------
def dice_case(layout, training, affine, lengths=(4, 0, 1), T=4, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths, dtype=torch.int64)
    rows = {}
    if layout == "padded":
        x = rnd(g, lengths.numel(), T, C)
        rows["lengths"] = lengths
    else:
        x = rnd(g, int(lengths.sum()), C)
        if layout == "jagged":
            rows["offsets"] = offsets_of(lengths)
    leaves = [x, rnd(g, C, s=0.5)] + ([1 + rnd(g, C, s=0.2), rnd(g, C, s=0.2)] if affine else [])
    rm, rv = rnd(g, C, s=0.3), rnd(g, C, s=0.3).abs() + 0.5

    def call(impl, x, alpha, gamma=None, beta=None):
        return (impl.dice(x, alpha, rm.clone(), rv.clone(), gamma=gamma, beta=beta, training=training,
                          eps=1e-5, **rows),)

    return leaves, call


@pytest.mark.parametrize("layout", ["flat", "padded", "jagged"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_dice_second_order_matches_reference(layout, training, affine):
    leaves, call = dice_case(layout, training, affine)
    check_against_reference(call, leaves)


@pytest.mark.parametrize("lengths", [(1, 0), (0, 0)])
def test_dice_second_order_degenerate_batches(lengths):
    """One valid row (variance 0) and none at all: finite, and equal to the reference."""
    leaves, call = dice_case("padded", True, True, lengths=lengths, T=2)
    first, second = second_order(call, din_ops, leaves)
    ref_first, ref_second = second_order(call, R, leaves)
    assert all(torch.isfinite(t).all() for t in first + second)
    assert_close_all(first, ref_first, 1e-9, "first-order")
    assert_close_all(second, ref_second, 1e-9, "second-order")


@pytest.mark.parametrize("layout, training, affine", [
    ("flat", True, True), ("padded", True, False), ("jagged", True, True),
    ("padded", False, True), ("flat", False, False),
])
def test_dice_gradgradcheck(layout, training, affine):
    leaves, call = dice_case(layout, training, affine, lengths=(3, 0, 2), T=3, C=2)
    leaves = [t.requires_grad_() for t in leaves]
    assert gradgradcheck(lambda *xs: call(din_ops, *xs), leaves, fast_mode=True, atol=1e-6, rtol=1e-4)


# --- mba_penalty ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding_idx", [None, 2, -1])
def test_mba_penalty_second_order(padding_idx):
    g = torch.Generator().manual_seed(0)
    w = rnd(g, 7, 3)
    idx = torch.tensor([2, 5, 5, 0, 6, 2, 2])  # duplicates, the padding row
    freq = torch.tensor([0, 1, 4, 2, 2, 5, 1])  # row 0 is present but counted 0 times (taken as 1)

    def call(impl, w):
        return (impl.mba_penalty(w, idx, freq, 0.3, padding_idx),)

    check_against_reference(call, [w])
    assert gradgradcheck(lambda w: call(din_ops, w), [w.clone().requires_grad_()], fast_mode=True)


# --- what cannot be differentiated raises ---------------------------------------------------------------
def test_fused_backward_ops_raise_when_differentiated():
    leaves, _ = attention_case("dice", "softmax", "padded", 1)
    q, k, W0, W1, W2, b0, b1, b2, *act = leaves
    lengths = torch.tensor([4, 0, 2])
    stats = ([torch.zeros(h, dtype=F64) for h in (4, 3)], [torch.ones(h, dtype=F64) for h in (4, 3)])
    rest = ([W0, W1, W2], [b0, b1, b2], act[:2], *stats, act[2:4], act[4:6], "dice", "softmax", 0.7, 1e-5)
    out, attn = ops.attention_pooling(q, k, lengths, None, *rest)
    grads = ops.attention_pooling_backward(torch.randn_like(out).requires_grad_(), None, attn, q, k, lengths, None,
                                           *rest)
    with pytest.raises(RuntimeError, match="din_ops::attention_pooling_backward"):
        grads[0].sum().backward()

    x = torch.randn(5, 3, dtype=F64, requires_grad=True)
    alpha = torch.randn(3, dtype=F64, requires_grad=True)
    _, mean, var = ops.dice(x, None, alpha, None, None, None, None, True, 1e-5)
    dx = ops.dice_backward(torch.randn(5, 3, dtype=F64), x, None, alpha, None, None, mean, var, True, 1e-5)[0]
    with pytest.raises(RuntimeError, match="din_ops::dice_backward"):
        dx.sum().backward()

    w = torch.randn(4, 2, dtype=F64, requires_grad=True)
    gw = ops.mba_penalty_backward(torch.tensor(1.0, dtype=F64), w, torch.tensor([1, 1, 3]), torch.ones(4), 0.5, None)
    with pytest.raises(RuntimeError, match="din_ops::mba_penalty_backward"):
        gw.sum().backward()

    sl, scall = stats_case(1, "padded", 1)
    m, v = scall(din_ops, *sl)
    sq, sk, sW0, sW1, sb0, sb1, sa, smean, svar, sgam, sbet = sl
    gs = ops.attention_pooling_stats_backward(torch.ones_like(m).requires_grad_(), torch.ones_like(v), m, sq, sk,
                                              torch.tensor([4, 0, 2]), None, [sW0, sW1], [sb0, sb1], [sa],
                                              [smean], [svar], [sgam], [sbet], "dice", 1e-5)
    with pytest.raises(RuntimeError, match="din_ops::attention_pooling_stats_backward"):
        gs[0].sum().backward()


def test_mba_sparse_update_is_not_differentiable():
    w = torch.randn(6, 2, dtype=F64)
    idx, freq = torch.tensor([1, 4, 1]), torch.ones(6)
    g = torch.randn(3, 2, dtype=F64, requires_grad=True)
    with pytest.raises(RuntimeError, match="din_ops::mba_sparse_update_"):
        ops.mba_sparse_update_(w, idx, g * 2, freq, None, 0.1, 0.1, "sgd", None, 1e-10)
    param = torch.nn.Parameter(w.clone())
    with pytest.raises(RuntimeError, match="din_ops::mba_sparse_update_"):
        ops.mba_sparse_update_(param, idx, g.detach(), freq, None, 0.1, 0.1, "sgd", None, 1e-10)

    # an update of a tensor autograd saved for a double backward is detected, not used silently
    grad_w, = torch.autograd.grad((param ** 3).sum(), param, create_graph=True)
    din_ops.mba_sparse_update_(param, idx, g.detach(), freq, lr=0.1, lam=0.1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        grad_w.sum().backward()


# --- Triton kernels (interpreted on CPU) -----------------------------------------------------------------
@pytest.mark.parametrize("device, backend", triton_backends())
def test_triton_second_order(device, backend):
    from din_ops.triton import attention_pooling as tap

    leaves, call = attention_case("dice", "softmax", "jagged", 1, lengths=(3, 0, 2), D=2, hidden=(3,))
    dleaves, dcall = dice_case("padded", True, True, lengths=(3, 1), T=3, C=2)
    leaves, dleaves = [t.to(device) for t in leaves], [t.to(device) for t in dleaves]
    with din_ops.backend(backend), tap.configure(block_m=16, block_m_bwd=16):
        first, second = second_order(call, din_ops, leaves)
        dfirst, dsecond = second_order(dcall, din_ops, dleaves)
    ref_first, ref_second = second_order(call, R, leaves)
    dref_first, dref_second = second_order(dcall, R, dleaves)
    assert_close_all(first + second, ref_first + ref_second, 1e-9, "attention_pooling")
    assert_close_all(dfirst + dsecond, dref_first + dref_second, 1e-9, "dice")
