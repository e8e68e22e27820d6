"""NaN and inf propagate as in din_ops.reference, in every op, backend and dtype.

Rules: a NaN or inf key at a valid position poisons its own row only, NaN in a query poisons its
row, NaN or inf in padding changes nothing, NaN in a weight, bias, alpha or statistic poisons what
uses it, NaN in an MBA gradient or weight row poisons that row only, and no finite input creates
a NaN. Compared with the reference: the isnan and isinf masks of every output exactly, the values
with equal_nan, and the NaN masks of the gradients. For an inf input, gradients are compared by
their non-finite positions: there the reference's 0 * inf (p exactly 0 in Dice, the unfolded
[q, k, q - k, q * k] layer) meets a clamped exp or the folded first layer here.

Oracles: attention_pooling is the reference evaluated row by row on the valid positions only
(on its padded batch, 0 * NaN from a NaN weight reaches the padding's gradients, where no
backend computes); in Dice training the batch couples the rows and the full reference is used.
Dice is the reference with the padding kept out of the statistics by a select instead of a
product (NaN * 0 is NaN). Under the Triton interpreter, tl.maximum / tl.minimum return the
non-NaN operand as they do on GPUs (the interpreter's np.maximum would propagate it).
"""
import contextlib

import numpy as np
import pytest
import torch

import din_ops
from din_ops import reference as R
from din_ops.triton import attention_pooling as tap

from conftest import triton_backends

NAN, INF = float("nan"), float("inf")
TRITON = triton_backends()
BACKENDS = [("cpu", "cpp")] + TRITON
ACC = {torch.float64: torch.float64, torch.float32: torch.float32, torch.bfloat16: torch.float32,
       torch.float16: torch.float32}
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-3}

pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning"),
]


@contextlib.contextmanager
def backend(device, name):
    """The backend under test; the interpreter with the GPU's NaN-dropping tl.maximum/minimum."""
    if device == "cpu" and name == "triton":
        from triton.runtime import interpreter

        builder = interpreter.InterpreterBuilder
        saved = builder.create_maxnumf, builder.create_minnumf
        builder.create_maxnumf = lambda self, a, b: self.binary_op(a, b, np.fmax)
        builder.create_minnumf = lambda self, a, b: self.binary_op(a, b, np.fmin)
        try:
            with din_ops.backend("triton"), tap.configure(block_m=16, block_m_bwd=16):
                yield
        finally:
            builder.create_maxnumf, builder.create_minnumf = saved
    else:
        with din_ops.backend(name):
            yield


def _to(ts, **kw):
    if isinstance(ts, list):
        return [t.to(**kw) for t in ts]
    return ts.to(**kw) if isinstance(ts, torch.Tensor) else ts


def assert_same(got, want, what, tol):
    """Same NaN and inf positions, close values elsewhere."""
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    assert g.shape == w.shape, f"{what}: shape {tuple(g.shape)} != {tuple(w.shape)}"
    assert torch.equal(g.isnan(), w.isnan()), \
        f"{what}: NaN at {g.isnan().nonzero().tolist()[:6]}, reference at {w.isnan().nonzero().tolist()[:6]}"
    assert torch.equal(g.isinf(), w.isinf()), \
        f"{what}: inf at {g.isinf().nonzero().tolist()[:6]}, reference at {w.isinf().nonzero().tolist()[:6]}"
    torch.testing.assert_close(g, w, rtol=tol, atol=tol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def assert_same_nan(got, want, what, tol):
    """Gradients: same NaN positions, close values where both are finite."""
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    assert torch.equal(g.isnan(), w.isnan()), \
        f"{what}: NaN at {g.isnan().nonzero().tolist()[:6]}, reference at {w.isnan().nonzero().tolist()[:6]}"
    fin = g.isfinite() & w.isfinite()
    scale = max(1.0, float(w[fin].abs().max())) if fin.any() else 1.0
    torch.testing.assert_close(g[fin], w[fin], rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


# --- attention_pooling ------------------------------------------------------------------------
LENS = [5, 2, 0]  # row 0 is poisoned, row 1 must not change, row 2 is empty


def ap_case(act="sigmoid", C=1, layout="padded", dtype=torch.float64, device="cpu", hidden=(6, 3), D=4,
            lens=LENS, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype).to(device)

    B, T = len(lens), max(lens)
    lengths = torch.tensor(lens, device=device)
    case = dict(query=rnd(B, D) if C == 1 else rnd(B, C, D), activation="dice" if act.startswith("dice") else act,
                training=act == "dice")
    keys = rnd(B, T, D)
    if layout == "jagged":
        case["keys"] = R.padded_to_jagged(keys, lengths)
        case["offsets"] = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    else:
        case["keys"], case["lengths"] = keys, lengths
    dims = [4 * D, *hidden, 1]
    case["weights"] = [rnd(dims[i + 1], dims[i], s=1.5 * dims[i] ** -0.5) for i in range(len(dims) - 1)]
    case["biases"] = [rnd(dims[i + 1], s=0.3) for i in range(len(dims) - 1)]
    if act == "prelu":
        case["prelu_weights"] = [rnd(h, s=0.3) for h in hidden]
    if act.startswith("dice"):
        case["dice_alpha"] = [rnd(h, s=0.3) for h in hidden]
        case["dice_running_mean"] = [rnd(h, s=0.3).to(ACC[dtype]) for h in hidden]
        case["dice_running_var"] = [(rnd(h, s=0.3).abs() + 0.5).to(ACC[dtype]) for h in hidden]
        case["dice_gamma"] = [1.0 + rnd(h, s=0.2) for h in hidden]
        case["dice_beta"] = [rnd(h, s=0.2) for h in hidden]
    return case


_AP_LEAVES = ("query", "keys", "weights", "biases", "prelu_weights", "dice_alpha", "dice_gamma", "dice_beta",
              "dice_running_mean", "dice_running_var")


def _ap_clone(case, dtype=None):
    c = {}
    for k, v in case.items():
        if isinstance(v, (torch.Tensor, list)):
            v = [t.detach().clone() for t in v] if isinstance(v, list) else v.detach().clone()
            if dtype is not None and k not in ("lengths", "offsets"):
                v = _to(v, dtype=dtype)
        c[k] = v
    names = [n for n in _AP_LEAVES if n in c and not (c["training"] and n.startswith("dice_running"))]
    for n in names:
        for t in c[n] if isinstance(c[n], list) else [c[n]]:
            t.requires_grad_(True)
    return c, names


def _loss_coefs(out_shape, attn_shape, dtype, device):
    g = torch.Generator().manual_seed(1)
    go = torch.randn(out_shape, generator=g, dtype=torch.float64).to(dtype).to(device)
    ga = torch.randn(attn_shape, generator=g, dtype=torch.float64).to(dtype).to(device)
    return go, ga


def _grads(c, names):
    grads = {}
    for n in names:
        for i, t in enumerate(c[n] if isinstance(c[n], list) else [c[n]]):
            grads[f"{n}[{i}]"] = t.grad if t.grad is not None else torch.zeros_like(t)
    return grads


def _stats(c):
    """The running statistics after the update (Dice training)."""
    if not c["training"]:
        return []
    return [t.detach() for t in c.get("dice_running_mean", []) + c.get("dice_running_var", [])]


def ap_run(case, normalization, scale=0.7):
    """The op: out, attention weights, every gradient of a random linear functional of both."""
    c, names = _ap_clone(case)
    kw = {k: v for k, v in c.items() if k not in ("query", "keys", "weights", "biases")}
    out, attn = din_ops.attention_pooling(c["query"], c["keys"], c["weights"], c["biases"],
                                          normalization=normalization, scale=scale, return_weights=True, **kw)
    go, ga = _loss_coefs(out.shape, attn.shape, out.dtype, out.device)
    ((out * go).sum() + (attn * ga).sum()).backward()
    return out.detach(), attn.detach(), _grads(c, names), _stats(c)


def ap_oracle(case, normalization, scale=0.7):
    """The reference on the same data (float64 for bf16/fp16), row by row on the valid positions."""
    dtype = case["query"].dtype
    c, names = _ap_clone(_to_cpu(case), torch.float64 if dtype in (torch.bfloat16, torch.float16) else None)
    q, k = c["query"], c["keys"]
    single, jagged = q.dim() == 2, "offsets" in c
    kw = {n: v for n, v in c.items() if n not in ("query", "keys", "weights", "biases", "lengths", "offsets")}
    if c["training"]:  # Dice batch statistics couple the rows
        rows = dict(offsets=c["offsets"]) if jagged else dict(lengths=c["lengths"])
        out, attn = R.attention_pooling(q, k, c["weights"], c["biases"], normalization=normalization, scale=scale,
                                        return_weights=True, **rows, **kw)
        go, ga = _loss_coefs(out.shape, attn.shape, out.dtype, "cpu")
        ((out * go).sum() + (attn * ga).sum()).backward()
        return out.detach(), attn.detach(), _grads(c, names), _stats(c)
    lens = (c["offsets"].diff() if jagged else c["lengths"]).tolist()
    starts = c["offsets"][:-1].tolist() if jagged else [0] * len(lens)
    attn_shape = ((k.shape[0],) if single else (k.shape[0], q.shape[1])) if jagged else \
        ((q.shape[0], k.shape[1]) if single else (q.shape[0], q.shape[1], k.shape[1]))
    go, ga = _loss_coefs(q.shape, attn_shape, q.dtype, "cpu")
    out, attn = torch.zeros(q.shape, dtype=q.dtype), torch.zeros(attn_shape, dtype=q.dtype)
    loss = torch.zeros((), dtype=q.dtype)
    for b, (n, s0) in enumerate(zip(lens, starts)):
        if n == 0:
            continue
        kb = k[s0:s0 + n][None] if jagged else k[b:b + 1, :n]
        o, w = R.attention_pooling(q[b:b + 1], kb, c["weights"], c["biases"], normalization=normalization,
                                   scale=scale, return_weights=True, **kw)
        o, w = o[0], w[0]  # [(C,) D], [(C,) n]
        out[b] = o.detach()
        if jagged:
            attn[s0:s0 + n] = w.detach() if single else w.detach().t()
            gw = ga[s0:s0 + n] if single else ga[s0:s0 + n].t()
        else:
            attn[b, ..., :n] = w.detach()
            gw = ga[b, ..., :n]
        loss = loss + (o * go[b]).sum() + (w * gw).sum()
    if loss.requires_grad:
        loss.backward()
    return out, attn, _grads(c, names), []


def _to_cpu(case):
    return {k: _to(v, device="cpu") for k, v in case.items()}


def _valid(case):
    """Valid key positions (over keys' leading dims) and rows with at least one of them."""
    if "offsets" in case:
        n = case["keys"].shape[0]
        return torch.ones(n, dtype=torch.bool), case["offsets"].diff().cpu() > 0
    lengths = case["lengths"].cpu()
    return R.valid_mask(lengths, case["keys"].shape[0], case["keys"].shape[1]), lengths > 0


def ap_check(case, normalization, inf_input=False):
    """The op against the oracle; returns the op's results."""
    dtype = case["query"].dtype
    got = ap_run(case, normalization)
    want = ap_oracle(case, normalization)
    tol = TOL[dtype]
    assert_same(got[0], want[0], "out", tol)
    assert_same(got[1], want[1], "attention weights", tol)
    for i, (a, b) in enumerate(zip(got[3], want[3])):
        if inf_input:  # the reference keeps +-inf in the units its first layer does not make NaN
            assert torch.equal(a.isfinite().cpu(), b.isfinite()), f"running statistics {i}"
        else:
            assert_same(a, b, f"running statistics {i}", tol)
    kmask, qmask = _valid(case)
    for name, g in got[2].items():
        w = want[2][name]
        g = g.cpu()
        if name.startswith(("keys", "query")):
            m = kmask if name.startswith("keys") else qmask
            assert torch.equal(g[~m], torch.zeros_like(g[~m])), f"grad {name}: padding or empty rows not 0"
            g, w = g[m], w[m]
        elif inf_input:
            # inf in q or k: the reference's unfolded first layer mixes inf and NaN per hidden
            # unit; every parameter gradient it leaves non-finite must be non-finite here too
            assert not (g.isfinite() & ~w.isfinite()).any(), f"grad {name}: finite where the reference is not"
            continue
        assert_same_nan(g, w, f"grad {name}", 10 * tol)
    return got


def poison(case, site, C):
    """Puts a NaN/inf at ``site``; False when the case has no such site."""
    q_at = (0, 1) if C == 1 else (0, 1, 1)
    k_at = (1, 2) if "offsets" in case else (0, 1, 2)  # row 0, position 1, channel 2
    if site in ("key_nan", "key_inf", "key_ninf", "query_nan", "query_inf"):
        t, at = (case["keys"], k_at) if site.startswith("key") else (case["query"], q_at)
        t[at] = {"nan": NAN, "inf": INF, "ninf": -INF}[site.split("_")[1]]
        return True
    if site.startswith(("w", "b")) and site[1].isdigit() or site.startswith(("wo", "bo")):
        group = case["weights"] if site[0] == "w" else case["biases"]
        layer = -1 if site[1] == "o" else int(site[1])
        group[layer].view(-1)[1 if group[layer].numel() > 1 else 0] = {"nan": NAN, "inf": INF, "ninf": -INF}[
            site.split("_")[1]]
        return True
    key = {"alpha_nan": "prelu_weights" if "prelu_weights" in case else "dice_alpha", "gamma_nan": "dice_gamma",
           "beta_nan": "dice_beta", "mean_nan": "dice_running_mean", "var_nan": "dice_running_var"}[site]
    if key not in case or (key.startswith("dice_running") and case["training"]):
        return False
    case[key][0][1] = NAN
    return True


NAN_SITES = ["key_nan", "query_nan", "w0_nan", "w1_nan", "wo_nan", "b0_nan", "bo_nan", "alpha_nan", "gamma_nan",
             "beta_nan", "mean_nan", "var_nan"]
ACTS = ["sigmoid", "relu", "prelu", "dice", "dice_eval", "identity"]


def _rows_unchanged(got, clean, case, rows=(1, 2)):
    """Outputs and key/query gradients of the rows that hold no NaN, bit for bit."""
    starts = case["offsets"][:-1].tolist() if "offsets" in case else None
    for b in rows:
        assert torch.equal(got[0][b], clean[0][b]), f"out of row {b} changed"
        q = got[2]["query[0]"]
        assert torch.equal(q[b], clean[2]["query[0]"][b]), f"grad query of row {b} changed"
        if starts is None:
            assert torch.equal(got[1][b], clean[1][b]), f"attention weights of row {b} changed"
            assert torch.equal(got[2]["keys[0]"][b], clean[2]["keys[0]"][b]), f"grad keys of row {b} changed"
        else:
            n = LENS[b]
            sl = slice(starts[b], starts[b] + n)
            assert torch.equal(got[1][sl], clean[1][sl]), f"attention weights of row {b} changed"
            assert torch.equal(got[2]["keys[0]"][sl], clean[2]["keys[0]"][sl]), f"grad keys of row {b} changed"


@pytest.mark.parametrize("normalization", ["none", "softmax"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("layout,C", [("padded", 1), ("jagged", 3)])
def test_attention_nan_cpp_float64(act, normalization, layout, C):
    clean = None
    for site in NAN_SITES:
        case = ap_case(act, C, layout)
        if not poison(case, site, C):
            continue
        got = ap_check(case, normalization)
        if site in ("key_nan", "query_nan") and act != "dice":  # Dice training: the batch statistics mix rows
            clean = clean or ap_run(ap_case(act, C, layout), normalization)
            _rows_unchanged(got, clean, case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act,normalization", [("sigmoid", "softmax"), ("relu", "none"), ("prelu", "softmax"),
                                               ("dice_eval", "none"), ("dice", "softmax")])
def test_attention_nan_cpp_low_precision(dtype, act, normalization):
    for site in ["key_nan", "query_nan", "w1_nan", "alpha_nan", "mean_nan", "beta_nan"]:
        case = ap_case(act, 1, "padded", dtype)
        if poison(case, site, 1):
            ap_check(case, normalization)


TRITON_CASES = [  # (act, normalization, layout, C, dtype, sites): every activation, NaN where it hurt
    ("sigmoid", "softmax", "padded", 1, torch.float64, ["key_nan", "bo_ninf"]),
    ("relu", "none", "jagged", 1, torch.float64, ["key_nan", "w1_nan"]),
    ("relu", "softmax", "padded", 3, torch.float32, ["query_nan"]),
    ("prelu", "none", "padded", 1, torch.float64, ["alpha_nan", "key_nan"]),
    ("dice_eval", "none", "padded", 3, torch.float64, ["mean_nan", "var_nan", "beta_nan"]),
    ("dice_eval", "softmax", "jagged", 1, torch.bfloat16, ["mean_nan"]),
    ("dice", "softmax", "padded", 1, torch.float64, ["key_nan", "gamma_nan"]),
    ("identity", "softmax", "jagged", 3, torch.float64, ["wo_nan", "bo_ninf"]),
]


@pytest.mark.parametrize("device,backend_name", TRITON)
@pytest.mark.parametrize("act,normalization,layout,C,dtype,sites", TRITON_CASES,
                         ids=[f"{a}-{n}-{lay}-C{c}-{str(d)[6:]}" for a, n, lay, c, d, _ in TRITON_CASES])
def test_attention_nan_triton(device, backend_name, act, normalization, layout, C, dtype, sites):
    for site in sites:
        case = ap_case(act, C, layout, dtype, device)
        assert poison(case, site, C)
        with backend(device, backend_name):
            got = ap_check(case, normalization)
        if site == "key_nan" and act != "dice":
            with backend(device, backend_name):
                clean = ap_run(ap_case(act, C, layout, dtype, device), normalization)
            _rows_unchanged(got, clean, case)


@pytest.mark.parametrize("device,backend_name", BACKENDS)
@pytest.mark.parametrize("site", ["key_inf", "key_ninf", "query_inf"])
def test_attention_inf_input_poisons_its_row(device, backend_name, site):
    """An inf key or query element: the row's outputs are NaN as the reference's (its first layer
    gives inf - inf for weights of mixed sign), not +-inf in one channel; other rows unchanged."""
    cases = [("sigmoid", "none", "padded", 1), ("relu", "softmax", "jagged", 3), ("dice_eval", "none", "padded", 1)]
    if backend_name == "cpp":
        cases += [("prelu", "softmax", "padded", 1), ("identity", "none", "jagged", 1), ("dice", "none", "padded", 1)]
    for act, normalization, layout, C in cases:
        case = ap_case(act, C, layout, device=device)
        poison(case, site, C)
        with backend(device, backend_name):
            got = ap_check(case, normalization, inf_input=True)
            if act != "dice":
                _rows_unchanged(got, ap_run(ap_case(act, C, layout, device=device), normalization), case)
        assert (got[0][0, 1] if C > 1 and site.startswith("query") else got[0][0]).isnan().all()


@pytest.mark.parametrize("device,backend_name", BACKENDS)
def test_attention_padding_garbage_changes_nothing(device, backend_name):
    for act, normalization in [("relu", "softmax"), ("dice", "none")] if backend_name == "cpp" else [("relu", "softmax")]:
        case = ap_case(act, 1, "padded", device=device)
        mask = R.valid_mask(case["lengths"].cpu(), 3, 5).to(device)
        dirty = {**case, "keys": case["keys"].clone()}
        dirty["keys"][~mask] = NAN
        dirty["keys"][2, 1] = INF
        dirty["keys"][1, 3:] = -INF
        with backend(device, backend_name):
            got, clean = ap_run(dirty, normalization), ap_run(case, normalization)
        for a, b in zip(got[:2], clean[:2]):
            assert torch.equal(a, b)
        for name in got[2]:
            assert torch.equal(got[2][name], clean[2][name]), name


def _scores_case(dtype, device, big, T=5, B=3):
    """No hidden layer: score = W0 [q, k, q - k, q * k] + b, about big * (1 +- 0.3) per position."""
    case = ap_case("identity", 1, "padded", dtype, device, hidden=(), lens=[T, 2, 1][:B] + [T] * (B - 3))
    with torch.no_grad():
        w = case["weights"][0].double()
        case["weights"][0] = (w / w.abs().max() * abs(big) * 0.05).to(dtype)
        case["biases"][0] = torch.full((1,), big, dtype=dtype, device=device)
    return case


@pytest.mark.parametrize("device,backend_name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_scores_stay_finite(device, backend_name, dtype):
    """Scores and sigmoid inputs around +-1e4 (and -1e32 for softmax) give finite results."""
    for big in [1e4, -1e4] + ([-1e32] if dtype == torch.float32 else []):
        for act, normalization in [("identity", "softmax"), ("identity", "none")]:
            case = _scores_case(dtype, device, big)
            with backend(device, backend_name):
                out, attn, grads, _ = ap_run(case, normalization, scale=1.0)
            want = ap_oracle(case, normalization, scale=1.0)
            for name, t in [("out", out), ("attn", attn)] + list(grads.items()):
                assert t.isfinite().all(), f"{name} at scores ~{big:g}: not finite"
            if normalization == "softmax":
                assert_same(attn, want[1], f"softmax weights at scores ~{big:g}", TOL[dtype])
    for act in ["sigmoid", "dice_eval"]:  # hidden pre-activations of +-1e4
        case = ap_case(act, 1, "padded", dtype, device, hidden=(4,))
        with torch.no_grad():
            case["weights"][0].mul_(2e4)
        with backend(device, backend_name):
            out, attn, grads, _ = ap_run(case, "softmax")
        for name, t in [("out", out), ("attn", attn)] + list(grads.items()):
            assert t.isfinite().all(), f"{act}: {name} not finite"


@pytest.mark.parametrize("device,backend_name", BACKENDS)
def test_long_row_softmax_is_finite(device, backend_name):
    T = 3000 if backend_name == "cpp" else 200
    case = _scores_case(torch.float32, device, 30.0, T=T, B=1)
    with backend(device, backend_name):
        out, attn, grads, _ = ap_run(case, "softmax", scale=1.0)
    want = ap_oracle(case, "softmax", scale=1.0)
    assert_same(out, want[0], "out", 1e-4)
    assert_same(attn, want[1], "attn", 1e-4)
    for name, t in grads.items():
        assert t.isfinite().all(), name


@pytest.mark.parametrize("device,backend_name", BACKENDS)
def test_module_eval_nan_running_mean(device, backend_name):
    """The reported case: nn.AttentionPooling with Dice in eval mode and a NaN running mean."""
    torch.manual_seed(0)
    m = din_ops.nn.AttentionPooling(4, (6, 3), activation="dice", normalization="softmax").to(device).eval()
    with torch.no_grad():
        for d in m.dice:
            d.alpha.uniform_(-0.5, 0.5)
        m.dice[0].running_mean[1] = NAN
    q, k = torch.randn(3, 4, device=device), torch.randn(3, 5, 4, device=device)
    lengths = torch.tensor([5, 2, 0], device=device)
    with backend(device, backend_name):
        out = m(q, k, lengths=lengths)
    assert out[:2].isnan().all() and torch.equal(out[2], torch.zeros_like(out[2]))


# --- dice ---------------------------------------------------------------------------------------
def dice_case(layout, dtype=torch.float64, device="cpu", affine=True, seed=0, B=4, T=5, C=6):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * s

    lengths = torch.tensor([T, 2, 0, 3])[:B]
    rows = {}
    if layout == "padded":
        x, rows = rnd(B, T, C), dict(lengths=lengths.to(device))
    elif layout == "flat":
        x = rnd(B * T, C)
    else:
        x = rnd(int(lengths.sum()), C)
        rows = dict(offsets=torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(device))
    params = dict(alpha=rnd(C, s=0.5), gamma=1 + rnd(C, s=0.2) if affine else None,
                  beta=rnd(C, s=0.3) if affine else None)
    params = {k: None if v is None else v.to(dtype).to(device) for k, v in params.items()}
    stats = dict(running_mean=rnd(C, s=0.1).to(ACC[dtype]).to(device),
                 running_var=(rnd(C, s=0.1).abs() + 0.5).to(ACC[dtype]).to(device))
    return x.to(dtype).to(device), rows, params, stats


def dice_oracle(x, alpha, running_mean, running_var, *, lengths=None, offsets=None, gamma=None, beta=None,
                training=True, momentum=0.1, eps=1e-8):
    """reference.dice with the padding kept out of the statistics by a select, not by * 0."""
    if x.dim() == 3:
        mask = R.valid_mask(lengths, x.shape[0], x.shape[1])
    else:
        mask = torch.ones(x.shape[0], dtype=torch.bool)
    if training:
        xf = x.to(torch.float64) if x.dtype == torch.float64 else x.float()
        mean, var, n = R.masked_moments(torch.where(mask[..., None], xf, torch.zeros((), dtype=xf.dtype)), mask)
        R._update_running(running_mean, running_var, mean.detach(), var.detach(), n, momentum)
        mean, var = mean.to(x.dtype), var.to(x.dtype)
    else:
        mean, var = running_mean.to(x.dtype), running_var.to(x.dtype)
    return R.dice_pointwise(x, alpha, mean, var, gamma, beta, eps)


def dice_run(fn, x, rows, params, stats, training, dtype=None):
    x = x.detach().clone()
    params = {k: None if v is None else v.detach().clone() for k, v in params.items()}
    stats = {k: v.clone() for k, v in stats.items()}
    if dtype is not None:
        x, rows = _to(x, dtype=dtype, device="cpu"), {k: v.cpu() for k, v in rows.items()}
        params = {k: None if v is None else v.to(dtype=dtype, device="cpu") for k, v in params.items()}
        stats = {k: v.to(dtype=dtype, device="cpu") for k, v in stats.items()}
    leaves = [x] + [v for v in params.values() if v is not None]
    for t in leaves:
        t.requires_grad_(True)
    y = fn(x, params["alpha"], stats["running_mean"], stats["running_var"], gamma=params["gamma"],
           beta=params["beta"], training=training, **rows)
    g = torch.Generator().manual_seed(3)
    y.backward(torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype).to(y.device))
    return y.detach(), [t.grad for t in leaves], [stats["running_mean"], stats["running_var"]]


def dice_poison(site, x, params, stats, layout):
    at = (0, 1, 2) if layout == "padded" else (1, 2)
    if site.startswith("x_"):
        x[at] = {"x_nan": NAN, "x_inf": INF, "x_ninf": -INF}[site]
    elif site == "padding":
        if layout != "padded":
            return False
        x[1, 3, 2], x[2, 0, 1] = NAN, INF
        x[3, 4, :] = -INF
    elif site in ("alpha_nan", "gamma_nan", "beta_nan", "beta_inf"):
        t = params[site.split("_")[0]]
        if t is None:
            return False
        t[2] = NAN if site.endswith("nan") else INF
    else:
        stats["running_mean" if site.startswith("mean") else "running_var"][2] = NAN if site.endswith("nan") else INF
    return True


DICE_SITES = ["x_nan", "x_inf", "x_ninf", "padding", "alpha_nan", "gamma_nan", "beta_nan", "beta_inf", "mean_nan",
              "var_nan", "mean_inf"]


def dice_check(x, rows, params, stats, training, inf_input=False):
    """The op against the oracle. With an inf input the gradients are compared by their
    non-finite positions: where the reference's p is exactly 0 or 1, 0 * inf gives it NaN where
    the kernels' clamped exp leaves p ~1e-38 and an inf."""
    dtype = x.dtype
    y, grads, st = dice_run(din_ops.dice, x, rows, params, stats, training)
    up = torch.float64 if dtype in (torch.bfloat16, torch.float16) else None
    wy, wgrads, wst = dice_run(dice_oracle, x, rows, params, stats, training, up or dtype)
    tol = TOL[dtype]
    assert_same(y, wy, "y", tol)
    for i, (a, b) in enumerate(zip(st, wst)):
        assert_same(a, b, ["running_mean", "running_var"][i], tol)
    for i, (a, b) in enumerate(zip(grads, wgrads)):
        name = f"grad {['x', *[k for k in params if params[k] is not None]][i]}"
        if inf_input:
            assert torch.equal(a.isfinite().cpu(), b.isfinite()), f"{name}: non-finite positions differ"
        else:
            assert_same_nan(a, b, name, 10 * tol)
    return y, grads


def _dice_cases(training):
    for site in DICE_SITES:
        if training and site.startswith(("mean", "var")):
            continue
        yield site


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("layout", ["padded", "flat", "jagged"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_dice_nan_inf_cpp(dtype, layout, affine, training):
    for site in _dice_cases(training):
        x, rows, params, stats = dice_case(layout, dtype, affine=affine)
        if dice_poison(site, x, params, stats, layout):
            dice_check(x, rows, params, stats, training, inf_input="inf" in site or site == "padding")


DICE_TRITON = [("padded", True, True, torch.float64), ("jagged", False, False, torch.float32),
               ("padded", True, False, torch.bfloat16), ("flat", True, True, torch.float32)]


@pytest.mark.parametrize("device,backend_name", TRITON)
@pytest.mark.parametrize("layout,affine,training,dtype", DICE_TRITON,
                         ids=[f"{lay}-{'affine' if a else 'plain'}-{'train' if t else 'eval'}-{str(d)[6:]}"
                              for lay, a, t, d in DICE_TRITON])
def test_dice_nan_inf_triton(device, backend_name, layout, affine, training, dtype):
    sites = ["x_nan", "x_inf", "padding", "alpha_nan", "beta_nan"] + ([] if training else ["mean_nan", "var_nan"])
    for site in sites:
        x, rows, params, stats = dice_case(layout, dtype, device, affine=affine)
        if dice_poison(site, x, params, stats, layout):
            with backend(device, backend_name):
                dice_check(x, rows, params, stats, training, inf_input="inf" in site or site == "padding")


@pytest.mark.parametrize("device,backend_name", BACKENDS)
def test_dice_inf_running_mean_over_many_parts(device, backend_name):
    """An inf in training: the batch mean is inf (sum / n), not inf - inf from merging parts."""
    x = torch.randn(700, 3, dtype=torch.float64).to(device)
    x[5, 1] = INF
    x[400, 2] = -INF
    rm, rv = torch.zeros(3, dtype=torch.float64, device=device), torch.ones(3, dtype=torch.float64, device=device)
    rm2, rv2 = rm.clone(), rv.clone()
    alpha = torch.full((3,), 0.2, dtype=torch.float64, device=device)
    with backend(device, backend_name):
        y = din_ops.dice(x, alpha, rm, rv, training=True)
    want = dice_oracle(x.cpu(), alpha.cpu(), rm2.cpu(), rv2.cpu(), training=True)
    assert_same(rm, rm2.cpu(), "running_mean", 1e-9)
    assert_same(rv, rv2.cpu(), "running_var", 1e-9)
    assert_same(y, want, "y", 1e-9)


@pytest.mark.parametrize("device,backend_name", BACKENDS)
def test_dice_large_inputs_stay_finite(device, backend_name):
    """Sigmoid inputs of +-1e4 (eval and training) give finite outputs and gradients."""
    for dtype in [torch.float32, torch.bfloat16]:
        for training in [True, False]:
            x, rows, params, stats = dice_case("padded", dtype, device)
            x = (x.double() * 1e4).to(dtype)
            stats["running_var"].fill_(1e-6)
            with backend(device, backend_name):
                y, grads = dice_check(x, rows, params, stats, training)
            assert y.isfinite().all() and all(g.isfinite().all() for g in grads)


# --- mba ----------------------------------------------------------------------------------------
OPTIMIZERS = ["sgd", "adagrad", "adagrad_rowwise"]


def mba_case(dtype, optimizer, device="cpu", hot=False, seed=0, N=12, D=5):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype)
    idx = torch.tensor([3, 5, 3, 7, 9, 5, 3, 0, 11])
    if hot:  # row 3 takes the hot-row path of the kernels
        idx = torch.cat([idx, torch.full((300,), 3)])
    grad = torch.randn(idx.numel(), D, generator=g, dtype=torch.float64).to(dtype)
    freq = torch.randint(0, 6, (N,), generator=g)
    st = None
    if optimizer == "adagrad":
        st = torch.rand(N, D, generator=g, dtype=torch.float64).to(ACC[dtype])
    elif optimizer == "adagrad_rowwise":
        st = torch.rand(N, generator=g, dtype=torch.float64).to(ACC[dtype])
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(w), to(idx), to(grad), to(freq), to(st)


def mba_poison(site, w, grad, st):
    if site == "grad_nan":
        grad[2, 1] = NAN  # one of row 3's three occurrences
    elif site == "grad_inf":
        grad[2, 1] = INF
    elif site == "grad_inf_minus_inf":
        grad[0, 1], grad[2, 1] = INF, -INF  # inf - inf inside row 3's sum
    elif site == "weight_nan":
        w[5, 2] = NAN
    elif site == "weight_inf":
        w[5, 2] = INF
    elif site == "absent_rows":  # rows not in the batch are never read
        w[4] = NAN
        w[6, 1] = INF
    elif site in ("state_nan", "state_inf"):
        if st is None:
            return False
        st.view(st.shape[0], -1)[7, 0] = NAN if site == "state_nan" else INF
    return True


MBA_SITES = ["grad_nan", "grad_inf", "grad_inf_minus_inf", "weight_nan", "weight_inf", "absent_rows", "state_nan",
             "state_inf"]


def mba_check(w, idx, grad, freq, st, optimizer):
    dtype = w.dtype
    w1, s1 = w.clone(), None if st is None else st.clone()
    din_ops.mba_sparse_update_(w1, idx, grad, freq, lr=0.1, lam=0.01, optimizer=optimizer, state=s1)
    w2, s2 = w.cpu().clone(), None if st is None else st.cpu().clone()
    R.mba_sparse_update_(w2, idx.cpu(), grad.cpu(), freq.cpu(), lr=0.1, lam=0.01, optimizer=optimizer, state=s2)
    tol = TOL[dtype] if dtype != torch.bfloat16 else 2e-2
    assert_same(w1, w2, "weight", tol)
    if st is not None:
        assert_same(s1, s2, "state", tol)
    # rows whose gradient, weight and state are finite end finite
    bad = ~(w.isfinite().all(1) & (st.view(st.shape[0], -1).isfinite().all(1) if st is not None else True))
    for j, row in zip(idx.tolist(), grad):
        bad[j] |= ~row.isfinite().all()
    assert w1[~bad].isfinite().all()
    return w1


@pytest.mark.parametrize("device,backend_name", BACKENDS)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_mba_update_nan_inf(device, backend_name, optimizer):
    dtypes = [torch.float64, torch.float32, torch.bfloat16, torch.float16] if backend_name == "cpp" else \
        [torch.float32, torch.bfloat16]
    for dtype in dtypes:
        for hot in [False, True]:
            for site in MBA_SITES:
                w, idx, grad, freq, st = mba_case(dtype, optimizer, device, hot)
                if not mba_poison(site, w, grad, st):
                    continue
                clean = mba_case(dtype, optimizer, device, hot)
                with backend(device, backend_name):
                    got = mba_check(w, idx, grad, freq, st, optimizer)
                    want_clean = clean[0].clone()
                    din_ops.mba_sparse_update_(want_clean, clean[1], clean[2], clean[3], lr=0.1, lam=0.01,
                                               optimizer=optimizer, state=clean[4])
                # every row but the poisoned one is bit for bit the clean run's
                row = {"weight_nan": 5, "weight_inf": 5, "state_nan": 7, "state_inf": 7}.get(site, 3)
                keep = torch.ones(w.shape[0], dtype=torch.bool, device=w.device)
                keep[row] = False
                if site == "absent_rows":
                    keep[:] = True
                    assert torch.equal(got[4].isnan(), w[4].isnan())
                    keep[4] = keep[6] = False
                assert torch.equal(got[keep], want_clean[keep]), f"{site}: other rows changed"


@pytest.mark.parametrize("device,backend_name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_mba_penalty_nan_inf(device, backend_name, dtype):
    for site in ["weight_nan", "weight_inf", "absent_rows"]:
        w, idx, _, freq, _ = mba_case(dtype, "sgd", device)
        mba_poison(site, w, torch.zeros(1, 1), None)
        wa, wb = w.clone().requires_grad_(), w.cpu().clone().requires_grad_()
        with backend(device, backend_name):
            pa = din_ops.mba_penalty(wa, idx, freq, 0.01)
            pa.backward()
        pb = R.mba_penalty(wb, idx.cpu(), freq.cpu(), 0.01)
        pb.backward()
        assert_same(pa.reshape(1), pb.reshape(1), f"{site}: penalty", TOL[dtype])
        assert_same(wa.grad, wb.grad, f"{site}: penalty gradient", TOL[dtype])


@pytest.mark.parametrize("device,backend_name", BACKENDS)
def test_mba_nan_frequency_reaches_its_row(device, backend_name):
    """The public functions reject a NaN n_j, torch.compile skips that check: the kernels then
    give the reference's clamp_min(1) result, NaN on that row only."""
    w, idx, grad, _, st = mba_case(torch.float32, "adagrad_rowwise", device)
    freq = torch.full((w.shape[0],), 2.0, device=device)
    freq[5] = NAN
    w1, s1 = w.clone(), st.clone()
    with backend(device, backend_name):
        torch.ops.din_ops.mba_sparse_update_(w1, idx, grad, freq, s1, 0.1, 0.01, "adagrad_rowwise", None, 1e-10)
        pen = torch.ops.din_ops.mba_penalty(w, idx, freq, 0.01, None)
    w2, s2 = w.cpu().clone(), st.cpu().clone()
    R.mba_sparse_update_(w2, idx.cpu(), grad.cpu(), freq.cpu(), lr=0.1, lam=0.01, optimizer="adagrad_rowwise", state=s2)
    assert_same(w1, w2, "weight", 1e-5)
    assert_same(s1, s2, "state", 1e-5)
    assert w1[5].isnan().all() and pen.isnan()
