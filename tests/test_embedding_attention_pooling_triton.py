"""The Triton kernels of embedding_attention_pooling (SPEC section 4) against din_ops.reference.

The functions of ``din_ops.triton.embedding_attention_pooling`` are called directly with the op
schemas' arguments (``torch.library`` fake-tensor checks do not run under the interpreter): on
CPU tensors under the Triton interpreter, with a GPU natively on CUDA tensors. Every case
compares the output, the attention weights and the gradients of the query and of every MLP,
activation and Dice parameter with the reference's autograd
(``reference.embedding_attention_pooling``: ``nn.Embedding(sparse=True)`` gathers + the
materialized MLP), and each table's ``(grad_indices, grad_values)`` with the reference's
coalesced sparse gradient restricted to the ids of valid positions other than ``padding_idx``
(the reference also looks up row 0 at padding positions and keeps ``padding_idx`` rows with zero
values; those rows must be zero there). The statistics ops are compared with
``reference.attention_pooling_stats`` on the gathered keys.

Ids at padding positions are garbage (out of range): they must never be read. Tolerances as in
test_attention_pooling_triton.py. Grids are tiny and tiles small (block_m=16).
"""
import contextlib

import pytest
import torch

from din_ops import reference as ref
from din_ops.triton import attention_pooling as tap
from din_ops.triton import embedding_attention_pooling as emb

from conftest import case_lengths, triton_backends

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
DEVICES = [d for d, _ in triton_backends()]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}
GARBAGE = 10**6  # ids at padding positions: out of every table


def _tol(dtype, device, grad=False):
    t = (GRAD_TOL if grad else TOL)[dtype]
    if device == "cuda" and dtype == torch.float32:
        t = 5e-3 if grad else 3e-3  # TF32 products
    return t


@contextlib.contextmanager
def _run(**cfg):
    with tap.configure(block_m=16, block_m_bwd=16), emb.configure(**cfg):
        yield


def _close(got, want, tol, what):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    g, w = got.double().cpu(), want.double().cpu()
    assert torch.isfinite(g).all(), f"{what}: non-finite values"
    err = (g - w).abs().max().item() if g.numel() else 0.0
    scale = max(1.0, w.abs().max().item() if w.numel() else 0.0)
    assert err <= tol * scale, f"{what}: max abs error {err:.3e} > {tol:.1e} * {scale:.3g}"


def make_case(B=3, T=6, widths=(3, 4), E=(7, 5), hidden=(5, 4), C=1, dtype=torch.float64, device="cpu",
              activation="sigmoid", lengths="mixed", jagged=False, padding_idx=(2, -1), affine=True,
              id_dtype=torch.int64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype).to(device)

    D = sum(widths)
    case = dict(query=rnd(*((B, D) if C == 1 else (B, C, D))), activation=activation,
                tables=[rnd(e, w) for e, w in zip(E, widths)], padding_idx=list(padding_idx))
    lens = case_lengths(lengths, B, T, g)
    # few ids per table: duplicates within and across rows
    ids = [torch.randint(0, e, (B, T), generator=g) for e in E]
    if lens is not None:
        pad = torch.arange(T)[None, :] >= lens[:, None]
        ids = [i.masked_fill(pad, GARBAGE) for i in ids]
    if jagged:
        valid = torch.arange(T)[None, :] < lens[:, None]
        case["ids"] = [i[valid].to(id_dtype).to(device) for i in ids]
        offs = torch.zeros(B + 1, dtype=torch.int64)
        offs[1:] = torch.cumsum(lens, 0)
        case["offsets"] = offs.to(device)
    else:
        case["ids"] = [i.to(id_dtype).to(device) for i in ids]
        if lens is not None:
            case["lengths"] = lens.to(torch.int32).to(device)
    dims = [4 * D, *hidden, 1]
    case["weights"] = [rnd(dims[i + 1], dims[i], s=dims[i] ** -0.5 * 1.5) for i in range(len(dims) - 1)]
    case["biases"] = [rnd(dims[i + 1], s=0.3) for i in range(len(dims) - 1)]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if activation == "prelu":
        case["act"] = [rnd(h, s=0.3) for h in hidden]
    if activation == "dice":
        case["act"] = [rnd(h, s=0.3) for h in hidden]
        case["mean"] = [rnd(h, s=0.3).to(acc) for h in hidden]
        case["var"] = [(rnd(h, s=0.3).abs() + 0.5).to(acc) for h in hidden]
        if affine:
            case["gamma"] = [1.0 + rnd(h, s=0.2) for h in hidden]
            case["beta"] = [rnd(h, s=0.2) for h in hidden]
    return case


_PARAMS = ("weights", "biases", "act", "mean", "var", "gamma", "beta")


def _leaves(case):
    c = {}
    for k, v in case.items():
        if k in ("query", "tables") or k in _PARAMS:
            if isinstance(v, list):
                c[k] = [t.detach().clone().requires_grad_(True) for t in v]
            else:
                c[k] = v.detach().clone().requires_grad_(True)
        else:
            c[k] = v
    return c


def _ref_options(c, act):
    kw = dict(activation=act)
    if act == "prelu":
        kw["prelu_weights"] = c["act"]
    if act == "dice":
        kw.update(dice_alpha=c["act"], dice_running_mean=c["mean"], dice_running_var=c["var"],
                  dice_gamma=c.get("gamma"), dice_beta=c.get("beta"))
    return kw


def _pad_arg(case):
    return [None if p < 0 else p for p in case["padding_idx"]]


def _expected_ids(case, f):
    """Distinct ids of valid positions other than padding_idx, ascending."""
    idx = case["ids"][f].cpu().long()
    if "lengths" in case:
        valid = torch.arange(idx.shape[1])[None, :] < case["lengths"].cpu().long()[:, None]
        idx = idx[valid]
    idx = torch.unique(idx.reshape(-1))
    return idx[idx != case["padding_idx"][f]]


def _check_sparse(case, gi, gv, ref_tables, tol):
    for f, t in enumerate(ref_tables):
        want_ids = _expected_ids(case, f)
        assert gi[f].dtype == torch.int64 and torch.equal(gi[f].cpu(), want_ids), \
            f"grad_indices[{f}]: {gi[f].tolist()} != {want_ids.tolist()}"
        dense = t.grad.coalesce().to_dense() if t.grad is not None else torch.zeros_like(t)
        _close(gv[f], dense[want_ids.to(dense.device)], tol, f"grad_values[{f}]")
        rest = torch.ones(dense.shape[0], dtype=torch.bool)
        rest[want_ids] = False
        assert (dense[rest.to(dense.device)] == 0).all(), f"table {f}: the reference has gradient off the valid ids"


def _op_lists(c, act):
    return (c.get("act", []), c.get("mean", []), c.get("var", []), c.get("gamma", []), c.get("beta", []))


def check(case, normalization="none", scale=0.7, **cfg):
    """Forward and backward against the reference (Dice in eval with the given statistics)."""
    act = case["activation"]
    device = case["query"].device.type
    dtype = case["query"].dtype
    lengths, offsets = case.get("lengths"), case.get("offsets")
    c = _leaves(case)
    r_out, r_attn = ref.embedding_attention_pooling(
        c["query"], c["tables"], c["ids"], c["weights"], c["biases"], lengths=lengths, offsets=offsets,
        padding_idx=_pad_arg(case), normalization=normalization, scale=scale, training=False,
        return_weights=True, **_ref_options(c, act))
    g = torch.Generator().manual_seed(1)
    go = torch.randn(r_out.shape, generator=g, dtype=torch.float64).to(dtype).to(device)
    ga = torch.randn(r_attn.shape, generator=g, dtype=torch.float64).to(dtype).to(device)
    ((r_out * go).sum() + (r_attn * ga).sum()).backward()

    lists = _op_lists(case, act)
    with _run(**cfg):
        out, attn = emb.embedding_attention_pooling(
            case["query"], case["tables"], case["ids"], lengths, offsets, case["padding_idx"], case["weights"],
            case["biases"], *(x or None for x in lists), act, normalization, scale, 1e-8)
        res = emb.embedding_attention_pooling_backward(
            go, ga, attn, case["query"], case["tables"], case["ids"], lengths, offsets, case["padding_idx"],
            case["weights"], case["biases"], *lists, act, normalization, scale, 1e-8)
    _close(out, r_out.detach(), _tol(dtype, device), "out")
    _close(attn, r_attn.detach(), _tol(dtype, device), "attn")
    gt = _tol(dtype, device, grad=True)
    assert len(res) == 10
    dq, gi, gv = res[0], res[1], res[2]
    _close(dq, c["query"].grad, gt, "grad query")
    _check_sparse(case, gi, gv, c["tables"], gt)
    for name, got in zip(_PARAMS, res[3:]):
        want = c.get(name, [])
        assert len(got) == len(want), f"grad {name}: {len(got)} tensors, expected {len(want)}"
        for i, (a, w) in enumerate(zip(got, want)):
            _close(a, w.grad, gt, f"grad {name}[{i}]")
    return out, attn, res


# --- activations x normalizations x layouts (float64, tight) -----------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalization", ["none", "softmax"])
@pytest.mark.parametrize("layout", ["padded", "jagged"])
@pytest.mark.parametrize("act", ["sigmoid", "prelu", "dice"])
def test_activations(device, normalization, layout, act):
    check(make_case(activation=act, jagged=layout == "jagged", device=device), normalization)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["padded", "jagged", "full"])
def test_three_tables_candidates(device, layout):
    # 3 tables of widths 2, 5, 1; C = 3 candidates; padding_idx on two tables; int32 ids
    case = make_case(B=3, T=5, widths=(2, 5, 1), E=(4, 6, 3), hidden=(6,), C=3, activation="dice", affine=False,
                     jagged=layout == "jagged", lengths="none" if layout == "full" else "mixed",
                     padding_idx=(1, -1, 0), id_dtype=torch.int32, device=device)
    check(case, "softmax")
    check(case, "none", scale=1.3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths", ["mixed", "none"])
def test_chunks(device, lengths):
    # chunks of one row (padded): the sparse rows sum over chunks, parameter gradients too
    case = make_case(B=4, T=5, activation="prelu", lengths=lengths, device=device)
    check(case, "softmax", chunk_bytes=1)
    case = make_case(B=5, T=3, C=2, activation="sigmoid", lengths=lengths, device=device, seed=3)
    check(case, "none", chunk_bytes=2 * 3 * 7 * 8)  # two rows per chunk, the last one short
    case = make_case(B=3, T=4, activation="dice", lengths=lengths, dtype=torch.bfloat16, device=device, seed=4)
    check(case, "softmax", chunk_bytes=1)  # half-precision parameter gradients summed over chunks


@pytest.mark.parametrize("device", DEVICES)
def test_hot_ids(device):
    # ~45 occurrences per id of table 0: more than one lane block (BK = 32) per id; in chunks too
    case = make_case(B=3, T=30, E=(2, 3), hidden=(4,), activation="sigmoid", lengths="full", padding_idx=(-1, -1),
                     device=device)
    check(case, "softmax")
    check(case, "none", chunk_bytes=2 * 30 * 7 * 8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_empty_rows(device, normalization):
    case = make_case(B=3, T=4, activation="sigmoid", lengths="full", device=device)
    case["lengths"] = torch.tensor([0, 3, 0], dtype=torch.int64, device=device)
    for i in case["ids"]:
        i[0] = GARBAGE
        i[2] = GARBAGE
        i[1, 3:] = GARBAGE
    out, attn, _ = check(case, normalization)
    assert (out[0] == 0).all() and (out[2] == 0).all() and (attn[1, 3:] == 0).all()
    # every row empty: no distinct id
    case["lengths"] = torch.zeros(3, dtype=torch.int64, device=device)
    _, _, res = check(case, normalization)
    assert all(g.numel() == 0 for g in res[1]) and [tuple(v.shape) for v in res[2]] == [(0, 3), (0, 4)]
    # jagged with N = 0, padded with T = 0
    case = make_case(B=2, T=4, activation="prelu", jagged=True, lengths="full", device=device)
    case["ids"] = [i[:0] for i in case["ids"]]
    case["offsets"] = torch.zeros(3, dtype=torch.int64, device=device)
    check(case, normalization)
    check(make_case(B=2, T=0, lengths="full", device=device), normalization)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["padded", "jagged"])
def test_zero_batch(device, layout):
    case = make_case(B=0, T=4, activation="dice", jagged=layout == "jagged", lengths="full", device=device)
    out, attn, res = check(case, "softmax")
    assert out.shape == (0, 7) and all(g.numel() == 0 for g in res[1])


@pytest.mark.parametrize("device", DEVICES)
def test_padding_idx_everywhere(device):
    # every valid id of table 0 is its padding_idx: table 0 gets no row, table 1 its usual ones
    case = make_case(B=2, T=4, E=(3, 4), activation="sigmoid", lengths="full", device=device)
    case["ids"][0] = torch.full_like(case["ids"][0], 1)
    case["padding_idx"] = [1, -1]
    _, _, res = check(case)
    assert res[1][0].numel() == 0 and res[2][0].shape == (0, 3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes(device, dtype):
    case = make_case(B=3, T=7, activation="dice", dtype=dtype, device=device)
    check(case, "softmax")


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    case = make_case(B=4, T=6, E=(3, 2), activation="sigmoid", lengths="full", device=device)
    lists = _op_lists(case, "sigmoid")
    args = (case["query"], case["tables"], case["ids"], None, None)
    with _run():
        out, attn = emb.embedding_attention_pooling(*args, case["padding_idx"], case["weights"], case["biases"], None,
                                                    None, None, None, None, "sigmoid", "softmax", 1.0, 1e-8)
        go = torch.randn_like(out)
        runs = [emb.embedding_attention_pooling_backward(go, None, attn, *args, case["padding_idx"], case["weights"],
                                                         case["biases"], *lists, "sigmoid", "softmax", 1.0, 1e-8)
                for _ in range(2)]
    for a, b in zip(runs[0][2], runs[1][2]):
        assert torch.equal(a, b)


# --- statistics ops ------------------------------------------------------------------------------
def check_stats(case, L, **cfg):
    act = case["activation"]
    device = case["query"].device.type
    dtype = case["query"].dtype
    lengths, offsets = case.get("lengths"), case.get("offsets")
    c = _leaves(case)
    keys = ref.embedding_keys(c["tables"], c["ids"], lengths=lengths, offsets=offsets, padding_idx=_pad_arg(case))
    sub = {k: c[k][:L] for k in ("act", "mean", "var", "gamma", "beta") if k in c}
    r_mean, r_var = ref.attention_pooling_stats(
        c["query"], keys, c["weights"][:L + 1], c["biases"][:L + 1], lengths=lengths, offsets=offsets,
        activation=act, dice_alpha=sub.get("act"), dice_mean=sub.get("mean"), dice_var=sub.get("var"),
        dice_gamma=sub.get("gamma"), dice_beta=sub.get("beta"))
    g = torch.Generator().manual_seed(2)
    gm = torch.randn(r_mean.shape, generator=g, dtype=torch.float64).to(r_mean.dtype).to(device)
    gvv = torch.randn(r_var.shape, generator=g, dtype=torch.float64).to(r_var.dtype).to(device)
    ((r_mean * gm).sum() + (r_var * gvv).sum()).backward()
    lists = [case.get(k, [])[:L] for k in ("act", "mean", "var", "gamma", "beta")]
    with _run(**cfg):
        mean, var = emb.embedding_attention_pooling_stats(
            case["query"], case["tables"], case["ids"], lengths, offsets, case["padding_idx"],
            case["weights"][:L + 1], case["biases"][:L + 1], *(x or None for x in lists), act, 1e-8)
        res = emb.embedding_attention_pooling_stats_backward(
            gm, gvv, mean, case["query"], case["tables"], case["ids"], lengths, offsets, case["padding_idx"],
            case["weights"][:L + 1], case["biases"][:L + 1], *lists, act, 1e-8)
    tol = _tol(dtype, device)
    _close(mean, r_mean.detach(), tol, "mean")
    _close(var, r_var.detach(), tol, "var")
    gt = _tol(dtype, device, grad=True)
    _close(res[0], c["query"].grad, gt, "grad query")
    _check_sparse(case, res[1], res[2], c["tables"], gt)
    names = ("weights", "biases", "act", "mean", "var", "gamma", "beta")
    for name, got in zip(names, res[3:]):
        want = c.get(name, [])
        want = want[:L + 1] if name in ("weights", "biases") else want[:L]
        assert len(got) == len(want), f"grad {name}: {len(got)} tensors, expected {len(want)}"
        for i, (a, w) in enumerate(zip(got, want)):
            _close(a, w.grad if w.grad is not None else torch.zeros_like(w), gt, f"grad {name}[{i}]")
    return mean, var


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["padded", "jagged"])
@pytest.mark.parametrize("L", [0, 1])
def test_stats(device, layout, L):
    case = make_case(B=3, T=5, C=2 if L else 1, activation="dice", jagged=layout == "jagged", device=device)
    check_stats(case, L)


@pytest.mark.parametrize("device", DEVICES)
def test_stats_chunks(device):
    case = make_case(B=4, T=5, activation="dice", device=device, seed=5)
    check_stats(case, 1, chunk_bytes=1)
    # one valid pair in the batch: var is -0.0 (the attention stats' marker), over chunks too
    case = make_case(B=3, T=2, activation="dice", lengths="full", device=device)
    case["lengths"] = torch.tensor([0, 1, 0], dtype=torch.int32, device=device)
    for i in case["ids"]:
        i[0] = i[2] = i[1, 1] = GARBAGE
    mean, var = check_stats(case, 0, chunk_bytes=1)
    assert (var == 0).all() and torch.signbit(var).all()


# --- direct-call checks on CPU tensors ------------------------------------------------------------
def test_ids_out_of_range_cpu():
    case = make_case(B=2, T=4, lengths="mixed")
    case["ids"][1] = case["ids"][1].clone()
    case["ids"][1][0, 0] = 5  # table 1 has 5 rows
    with pytest.raises(RuntimeError, match=r"ids\[1\]"):
        emb.embedding_attention_pooling(case["query"], case["tables"], case["ids"], case["lengths"], None,
                                        case["padding_idx"], case["weights"], case["biases"], None, None, None,
                                        None, None, "sigmoid", "none", 1.0, 1e-8)
    with pytest.raises(RuntimeError, match="sum D_f"):
        emb.embedding_attention_pooling(case["query"][:, :5], case["tables"], case["ids"], case["lengths"], None,
                                        case["padding_idx"], case["weights"], case["biases"], None, None, None,
                                        None, None, "sigmoid", "none", 1.0, 1e-8)


# --- host reads: none in the forward ops, one per table in the backward ---------------------------
@pytest.mark.parametrize("layout", ["padded", "jagged"])
def test_host_reads(monkeypatch, layout):
    """The CUDA code paths on CPU tensors (the CPU value checks off), under the dispatch mode of
    test_cuda_sync that records every host read: none in the forward and statistics ops, and in
    each backward one per table (the number of distinct ids, a boolean-mask index)."""
    if DEVICES != ["cpu"]:
        pytest.skip("the interpreter's check; tests/test_cuda_sync.py has the CUDA one")
    import triton.runtime.interpreter as interp
    from torch.utils._python_dispatch import _disable_current_modes
    from test_cuda_sync import HostReads

    call = interp.GridExecutor.__call__

    def launch(self, *args, **kwargs):  # the interpreted kernel is not the launcher
        with _disable_current_modes():
            return call(self, *args, **kwargs)

    monkeypatch.setattr(interp.GridExecutor, "__call__", launch)
    monkeypatch.setattr(tap, "_CHECK_CPU_VALUES", False)
    case = make_case(B=4, T=5, widths=(2, 3, 2), E=(5, 4, 3), hidden=(4, 3), activation="dice",
                     jagged=layout == "jagged", padding_idx=(1, -1, 0))
    lists = _op_lists(case, "dice")
    rows = (case["query"], case["tables"], case["ids"], case.get("lengths"), case.get("offsets"))
    with _run(chunk_bytes=1):  # several chunks (padded)
        spy = HostReads()
        with spy:
            out, attn = emb.embedding_attention_pooling(*rows, case["padding_idx"], case["weights"], case["biases"],
                                                        *lists, "dice", "softmax", 1.0, 1e-8)
            mean, var = emb.embedding_attention_pooling_stats(*rows, case["padding_idx"], case["weights"][:2],
                                                              case["biases"][:2], *(x[:1] for x in lists), "dice",
                                                              1e-8)
        assert not spy.found, "host reads in the forward:\n" + "\n".join(spy.found)
        for fn, args in [
                (emb.embedding_attention_pooling_backward,
                 (torch.ones_like(out), None, attn, *rows, case["padding_idx"], case["weights"], case["biases"],
                  *lists, "dice", "softmax", 1.0, 1e-8)),
                (emb.embedding_attention_pooling_stats_backward,
                 (torch.ones_like(mean), torch.ones_like(var), mean, *rows, case["padding_idx"], case["weights"][:2],
                  case["biases"][:2], *(x[:1] for x in lists), "dice", 1e-8))]:
            spy = HostReads()
            with spy:
                fn(*args)
            assert len(spy.found) == 3 and all("boolean mask" in f for f in spy.found), "\n".join(spy.found)
