"""autocast (SPEC, policies): attention_pooling runs in the autocast dtype like nn.Linear, Dice in
the dtype of its input like BatchNorm, the MBA ops are not cast.

The expected values come from din_ops.reference run in float32 on the inputs rounded to the
autocast dtype (what the fused op sees), so they are independent of the code under test.
Tolerances: bf16 5e-2, fp16 1e-2 (relative to the magnitude, outputs rounded once).
"""
import pytest
import torch

import din_ops
from din_ops import reference as R

from conftest import devices

ops = torch.ops.din_ops
TOL = {torch.bfloat16: 5e-2, torch.float16: 1e-2}
LOW = [torch.bfloat16, torch.float16]


def _case(device, act="sigmoid", C=None, B=5, T=6, D=8, hidden=(7, 5), seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(device)

    q = rnd(B, D) if C is None else rnd(B, C, D)
    k = rnd(B, T, D)
    lengths = torch.tensor([T, 0, 3, 1, T - 1][:B]).to(device)
    dims = [4 * D, *hidden, 1]
    W = [rnd(dims[i + 1], dims[i], s=dims[i] ** -0.5) for i in range(len(dims) - 1)]
    b = [rnd(dims[i + 1], s=0.1) for i in range(len(dims) - 1)]
    kw = {}
    if act == "prelu":
        kw["prelu_weights"] = [rnd(h, s=0.3) for h in hidden]
    if act == "dice":
        kw["dice_alpha"] = [rnd(h, s=0.5) for h in hidden]
        kw["dice_gamma"] = [1 + rnd(h, s=0.2) for h in hidden]
        kw["dice_beta"] = [rnd(h, s=0.2) for h in hidden]
        kw["dice_running_mean"] = [torch.zeros(h, device=device) for h in hidden]
        kw["dice_running_var"] = [torch.ones(h, device=device) for h in hidden]
    return q, k, lengths, W, b, kw


def _leaves(q, k, W, b, kw):
    params = [t for n in ("prelu_weights", "dice_alpha", "dice_gamma", "dice_beta") for t in kw.get(n, [])]
    return [q, k, *W, *b, *params]


def _rebind(leaves, W, b, kw):
    q, k = leaves[0], leaves[1]
    n = len(W)
    W, b = leaves[2:2 + n], leaves[2 + n:2 + 2 * n]
    it = iter(leaves[2 + 2 * n:])
    kw = dict(kw)
    for name in ("prelu_weights", "dice_alpha", "dice_gamma", "dice_beta"):
        if name in kw:
            kw[name] = [next(it) for _ in kw[name]]
    for name in ("dice_running_mean", "dice_running_var"):
        if name in kw:
            kw[name] = [t.clone() for t in kw[name]]
    return q, k, W, b, kw


def _run(fn, leaves, W, b, kw, act, lengths, coef, autocast_dtype=None, **opts):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    q, k, W_, b_, kw_ = _rebind(leaves, W, b, kw)
    device = q.device.type
    if autocast_dtype is None:
        out = fn(q, k, W_, b_, lengths=lengths, activation=act, **kw_, **opts)
    else:
        with torch.autocast(device, dtype=autocast_dtype):
            out = fn(q, k, W_, b_, lengths=lengths, activation=act, **kw_, **opts)
    (out.float() * coef).sum().backward()
    stats = kw_.get("dice_running_mean", []) + kw_.get("dice_running_var", [])
    return out, [t.grad for t in leaves], leaves, stats


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("act", ["sigmoid", "prelu", "dice", "dice_eval"])
@pytest.mark.parametrize("normalization", ["none", "softmax"])
@pytest.mark.parametrize("C", [None, 3])
def test_attention_pooling_runs_in_autocast_dtype(device, dtype, act, normalization, C):
    q, k, lengths, W, b, kw = _case(device, act="dice" if act == "dice_eval" else act, C=C)
    training = act != "dice_eval"
    act = "dice" if act == "dice_eval" else act
    if act == "dice":
        kw["training"] = training
    leaves = _leaves(q, k, W, b, kw)
    coef = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(device)

    out, grads, got_leaves, stats = _run(din_ops.attention_pooling, leaves, W, b, kw, act, lengths, coef,
                                         autocast_dtype=dtype, normalization=normalization)
    assert out.dtype == dtype
    for g, leaf in zip(grads, got_leaves):
        assert g is not None and g.dtype == leaf.dtype == torch.float32  # grads in the params' dtype
    for s in stats:
        assert s.dtype == torch.float32

    rounded = [t.to(dtype).float() for t in leaves]
    kw_r = {n: ([t.to(dtype).float() for t in v] if n not in ("dice_running_mean", "dice_running_var") else v)
            if isinstance(v, list) else v for n, v in kw.items()}
    want, want_grads, _, want_stats = _run(R.attention_pooling, rounded, W, b, kw_r, act, lengths, coef,
                                           normalization=normalization)
    tol = TOL[dtype]
    scale = float(want.detach().abs().max().clamp_min(1))
    torch.testing.assert_close(out.float(), want, rtol=tol, atol=tol * scale)
    for i, (g, w) in enumerate(zip(grads, want_grads)):
        s = float(w.abs().max().clamp_min(1))
        torch.testing.assert_close(g, w, rtol=tol, atol=2 * tol * s, msg=lambda m: f"grad {i}: {m}")
    for s, w in zip(stats, want_stats):
        torch.testing.assert_close(s, w, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", devices())
def test_op_called_directly_is_cast(device):
    """The policy is registered with torch.library: a direct torch.ops call is cast as well."""
    q, k, lengths, W, b, _ = _case(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out, attn = ops.attention_pooling(q, k, lengths, None, W, b, [], [], [], [], [], "sigmoid", "none",
                                          1.0, 1e-8)
    assert out.dtype == attn.dtype == torch.bfloat16
    want, want_attn = ops.attention_pooling(q.bfloat16(), k.bfloat16(), lengths, None,
                                            [w.bfloat16() for w in W], [t.bfloat16() for t in b],
                                            [], [], [], [], [], "sigmoid", "none", 1.0, 1e-8)
    assert torch.equal(out, want) and torch.equal(attn, want_attn)


@pytest.mark.parametrize("device", devices())
def test_mixed_dtypes_from_autocast_layers(device):
    """What a model does: a bf16 query from an nn.Linear under autocast, fp32 keys and parameters."""
    att = din_ops.nn.AttentionPooling(8, (6,), activation="dice").to(device)
    lin = torch.nn.Linear(8, 8).to(device)
    q, k, lengths, _, _, _ = _case(device, D=8)
    with torch.autocast(device, dtype=torch.bfloat16):
        query = lin(q)
        assert query.dtype == torch.bfloat16 and k.dtype == torch.float32
        out = att(query, k, lengths)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert lin.weight.grad.dtype == torch.float32 and att.layers[0].weight.grad.dtype == torch.float32
    assert att.dice[0].running_mean.dtype == torch.float32


@pytest.mark.parametrize("device", devices())
def test_float64_is_not_cast(device):
    q, k, lengths, W, b, _ = _case(device)
    q, k, W, b = q.double(), k.double(), [w.double() for w in W], [t.double() for t in b]
    with torch.autocast(device, dtype=torch.bfloat16):
        out = din_ops.attention_pooling(q, k, W, b, lengths=lengths)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, R.attention_pooling(q, k, W, b, lengths=lengths), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["2d", "padded"])
def test_dice_runs_in_input_dtype(device, training, layout):
    """Dice after a bf16 nn.Linear: output bf16 (like BatchNorm1d under autocast), parameters fp32."""
    torch.manual_seed(0)
    C = 6
    lin = torch.nn.Linear(5, C).to(device)
    d = din_ops.nn.Dice(C, affine=True).to(device)
    with torch.no_grad():
        d.alpha.uniform_(-0.5, 0.5)
        d.gamma.uniform_(0.5, 1.5)
        d.beta.uniform_(-0.2, 0.2)
    d.train(training)
    x = torch.randn(4, 7, 5, device=device) if layout == "padded" else torch.randn(9, 5, device=device)
    lengths = torch.tensor([7, 0, 3, 5], device=device) if layout == "padded" else None
    with torch.autocast(device, dtype=torch.bfloat16):
        h = lin(x)
        assert h.dtype == torch.bfloat16
        y = d(h, lengths=lengths) if lengths is not None else d(h)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert d.alpha.grad.dtype == torch.float32 and d.alpha.grad is not None
    rm = torch.zeros(C, device=device)
    rv = torch.ones(C, device=device)
    if not training:
        rm, rv = d.running_mean.clone(), d.running_var.clone()
    want = R.dice(h.detach().float(), d.alpha.detach().bfloat16().float(), rm, rv, lengths=lengths,
                  gamma=d.gamma.detach().bfloat16().float(), beta=d.beta.detach().bfloat16().float(),
                  training=training, eps=d.eps)
    torch.testing.assert_close(y.float(), want, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("device", devices())
def test_din_model_under_autocast(device):
    """A whole DIN under autocast: din_ops and the eager backend agree within bf16 tolerance."""
    torch.manual_seed(0)
    kw = dict(embed_dim=8, attention_units=(16, 8), attention_activation="dice", mlp_units=(16,))
    fused = din_ops.models.DIN(30, 6, (5,), backend="din_ops", **kw).to(device)
    eager = din_ops.models.DIN(30, 6, (5,), backend="eager", **kw).to(device)
    eager.load_state_dict(fused.state_dict())
    B, T = 6, 5
    g = torch.Generator().manual_seed(1)
    users = torch.randint(1, 6, (B, 1), generator=g).to(device)
    items = torch.randint(1, 31, (B,), generator=g).to(device)
    cats = torch.randint(1, 7, (B,), generator=g).to(device)
    hist_i = torch.randint(1, 31, (B, T), generator=g).to(device)
    hist_c = torch.randint(1, 7, (B, T), generator=g).to(device)
    lengths = torch.tensor([5, 0, 2, 1, 4, 3], device=device)
    outs = []
    for m in (fused, eager):
        with torch.autocast(device, dtype=torch.bfloat16):
            outs.append(m(users, items, cats, hist_i, hist_c, lengths=lengths))
    torch.testing.assert_close(outs[0].float(), outs[1].float(), rtol=5e-2, atol=5e-2)


def test_compile_under_autocast():
    q, k, lengths, W, b, _ = _case("cpu")

    def f(q, k, lengths):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return din_ops.attention_pooling(q, k, W, b, lengths=lengths)

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, lengths)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, f(q, k, lengths))


@pytest.mark.parametrize("device", devices())
def test_mba_ops_are_not_cast(device):
    w = torch.randn(10, 4, device=device, requires_grad=True)
    idx = torch.tensor([1, 3, 3], device=device)
    freq = torch.ones(10, dtype=torch.int64, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        p = din_ops.mba_penalty(w, idx, freq, 0.5)
    assert p.dtype == torch.float32
    torch.testing.assert_close(p, R.mba_penalty(w, idx, freq, 0.5))
