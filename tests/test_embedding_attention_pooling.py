"""embedding_attention_pooling (SPEC section 4) against din_ops.reference.

The reference gathers the keys with ``nn.Embedding(sparse=True)`` lookups, concatenates them and
runs ``reference.attention_pooling``; autograd gives every gradient, the tables' as sparse
tensors, which are coalesced for the comparison. Every case compares the output, the attention
weights, the Dice running statistics and the gradient of every input and parameter, the sparse
table gradients by their indices (exactly) and values.

The CPU kernels cut the rows into chunks of gathered keys; ``_chunk(n)`` shrinks the chunk so
that small inputs run the multi-chunk paths (one row per chunk with n=1).

Tolerances (max abs error relative to the reference's largest magnitude): float64 1e-10,
float32 1e-5 (5e-5 on gradients: sums over every position), and for float16 / bfloat16 against a float64 reference of the rounded inputs
5e-3 / 4e-2 on outputs and 2e-2 / 1e-1 on gradients.
"""
import contextlib
import copy
import pickle

import pytest
import torch
from torch import nn

import din_ops
from din_ops import _C
from din_ops import reference as ref

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 5e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}


@contextlib.contextmanager
def _chunk(elems):
    prev = _C._set_embedding_chunk_elems(elems)
    try:
        yield
    finally:
        _C._set_embedding_chunk_elems(prev)


def _make(B=5, T=7, widths=(3, 4), rows=(11, 6), hidden=(6, 4), C=None, act="sigmoid", dtype=torch.float64,
          seed=0, lengths=None, id_dtype=torch.int64, affine=False):
    g = torch.Generator().manual_seed(seed)
    D = sum(widths)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()

    tables = [rnd(e, w) for e, w in zip(rows, widths)]
    if lengths is None:
        lengths = torch.randint(0, T + 1, (B,), generator=g)
        if B > 1:
            lengths[0], lengths[1] = 0, T  # an empty row and a full one
    ids = [torch.randint(0, e, (B, T), generator=g).to(id_dtype) for e in rows]
    pad = torch.arange(T) >= lengths.unsqueeze(1)
    for i, e in zip(ids, rows):
        i[pad] = e + 1000  # out of range: padding must never be read
    query = rnd(B, D) if C is None else rnd(B, C, D)
    dims = [4 * D, *hidden]
    weights = [rnd(dims[i + 1], dims[i]) for i in range(len(hidden))] + [rnd(1, dims[-1])]
    biases = [rnd(h) for h in hidden] + [rnd(1)]
    kw = {}
    if act == "prelu":
        kw["prelu_weights"] = [rnd(h) for h in hidden]
    if act in ("dice", "dice_eval"):
        kw["dice_alpha"] = [rnd(h) for h in hidden]
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        kw["dice_running_mean"] = [torch.randn(h, generator=g).to(acc) * 0.1 for h in hidden]
        kw["dice_running_var"] = [torch.rand(h, generator=g).to(acc) + 0.5 for h in hidden]
        kw["training"] = act == "dice"
        if affine:
            kw["dice_gamma"] = [rnd(h) for h in hidden]
            kw["dice_beta"] = [rnd(h) for h in hidden]
    return dict(query=query, tables=tables, ids=ids, lengths=lengths, weights=weights, biases=biases,
                act="dice" if act == "dice_eval" else act, kw=kw)


def _jagged(case):
    T = case["ids"][0].shape[1]
    mask = torch.arange(T) < case["lengths"].unsqueeze(1)
    offsets = torch.zeros(len(case["lengths"]) + 1, dtype=torch.int64)
    offsets[1:] = case["lengths"].cumsum(0)
    return [i[mask] for i in case["ids"]], offsets


def _params(case):
    kw = case["kw"]
    out = [case["query"], *case["tables"], *case["weights"], *case["biases"]]
    for k in ("prelu_weights", "dice_alpha", "dice_gamma", "dice_beta"):
        out += list(kw.get(k) or [])
    return out


def _run(fn, case, jagged, normalization, padding_idx, cast=None):
    """Output, weights, running statistics and gradients of every parameter for ``fn``."""
    kw = dict(case["kw"])
    for k in ("dice_running_mean", "dice_running_var"):
        if k in kw:
            kw[k] = [t.clone() for t in kw[k]]
    tensors = _params(case)
    if cast is not None:
        tensors = [t.detach().to(cast).requires_grad_() for t in tensors]
    nt, nw = len(case["tables"]), len(case["weights"])
    query, tables = tensors[0], tensors[1:1 + nt]
    weights, biases = tensors[1 + nt:1 + nt + nw], tensors[1 + nt + nw:1 + nt + 2 * nw]
    rest = tensors[1 + nt + 2 * nw:]
    for k in ("prelu_weights", "dice_alpha", "dice_gamma", "dice_beta"):
        if kw.get(k) is not None:
            n = len(kw[k])
            kw[k], rest = rest[:n], rest[n:]
    if jagged:
        ids, offsets = _jagged(case)
        layout = dict(offsets=offsets)
    else:
        ids, layout = case["ids"], dict(lengths=case["lengths"])
    out, w = fn(query, tables, ids, weights, biases, padding_idx=padding_idx, activation=case["act"],
                normalization=normalization, return_weights=True, **layout, **kw)
    g = torch.Generator().manual_seed(1)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    gw = torch.randn(w.shape, generator=g, dtype=torch.float64).to(w.dtype)
    grads = torch.autograd.grad((out * go).sum() + (w * gw).sum(), tensors, allow_unused=True)
    stats = [t for k in ("dice_running_mean", "dice_running_var") for t in kw.get(k, [])]
    return out, w, stats, grads


def _scale(t):
    return max(1.0, t.detach().abs().max().item()) if t.numel() else 1.0


def _close(got, want, tol, what):
    if want is None:
        assert got is None or (not got.is_sparse and got.abs().max() == 0), what
        return
    if want.is_sparse:
        want = want.coalesce()
        assert got.is_sparse and got.is_coalesced(), what
        assert torch.equal(got.indices(), want.indices()), f"{what}: rows {got.indices()} != {want.indices()}"
        got, want = got.values(), want.values()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if want.numel() == 0:
        return
    err = (got.double() - want.double()).abs().max().item() / _scale(want)
    assert err <= tol, f"{what}: error {err:.3g} > {tol}"


def _compare(case, jagged, normalization="none", padding_idx=None, dtype=torch.float64):
    got = _run(din_ops.embedding_attention_pooling, case, jagged, normalization, padding_idx)
    want = _run(ref.embedding_attention_pooling, case, jagged, normalization, padding_idx,
                cast=None if dtype == torch.float64 else torch.float64)
    tol, gtol = TOL[dtype], GRAD_TOL[dtype]
    _close(got[0], want[0], tol, "out")
    _close(got[1], want[1], tol, "weights")
    for i, (a, b) in enumerate(zip(got[2], want[2])):
        _close(a, b, tol, f"running stats {i}")
    for i, (a, b) in enumerate(zip(got[3], want[3])):
        _close(a, b, gtol, f"grad {i}")


LAYOUTS = [pytest.param(False, id="padded"), pytest.param(True, id="jagged")]
ACTS = ["sigmoid", "relu", "prelu", "dice", "dice_eval", "identity"]


@pytest.mark.parametrize("jagged", LAYOUTS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("normalization", ["none", "softmax"])
@pytest.mark.parametrize("chunk", [None, 1, 40], ids=["one-chunk", "row-chunks", "mixed-chunks"])
def test_matches_reference(jagged, act, normalization, chunk):
    case = _make(act=act, hidden=(6, 4) if act != "identity" else (5,))
    with _chunk(chunk) if chunk else contextlib.nullcontext():
        _compare(case, jagged, normalization, padding_idx=[0, None])


@pytest.mark.parametrize("jagged", LAYOUTS)
@pytest.mark.parametrize("act", ["sigmoid", "prelu", "dice"])
@pytest.mark.parametrize("chunk", [None, 1])
def test_candidates(jagged, act, chunk):
    case = _make(act=act, C=3)
    with _chunk(chunk) if chunk else contextlib.nullcontext():
        _compare(case, jagged, "softmax", padding_idx=2)


@pytest.mark.parametrize("jagged", LAYOUTS)
def test_three_tables_int32_ids_affine_dice(jagged):
    case = _make(widths=(2, 5, 3), rows=(4, 30, 9), act="dice", affine=True, id_dtype=torch.int32, hidden=(7,))
    with _chunk(25):
        _compare(case, jagged, "none", padding_idx=[None, 3, -1])


@pytest.mark.parametrize("jagged", LAYOUTS)
def test_large_table_sorted_path(jagged):
    # far more rows than positions: the distinct ids come from a sort, not a mark per row
    case = _make(rows=(100000, 7), B=6, T=9)
    _compare(case, jagged, "softmax", padding_idx=[5, None])


@pytest.mark.parametrize("jagged", LAYOUTS)
@pytest.mark.parametrize("act", ["sigmoid", "dice"])
def test_long_rows_and_many_chunks(jagged, act):
    case = _make(B=4, T=300, act=act, lengths=torch.tensor([300, 0, 123, 299]), rows=(50, 9))
    with _chunk(700):
        _compare(case, jagged, "softmax")


@pytest.mark.parametrize("jagged", LAYOUTS)
@pytest.mark.parametrize("act", ["sigmoid", "dice"])
def test_empty_batches(jagged, act):
    for B, lengths in ((0, torch.zeros(0, dtype=torch.int64)), (3, torch.zeros(3, dtype=torch.int64))):
        case = _make(B=B, T=4, lengths=lengths, act=act)
        got = _run(din_ops.embedding_attention_pooling, case, jagged, "softmax", None)
        want = _run(ref.embedding_attention_pooling, case, jagged, "softmax", None)
        _close(got[0], want[0], 1e-12, "out")
        assert got[0].abs().max() == 0 if got[0].numel() else True
        for i, (a, b) in enumerate(zip(got[3], want[3])):
            if b is not None and b.is_sparse:
                assert a.is_sparse and a._nnz() == 0, f"grad {i}"
            else:
                _close(a, b, 1e-12, f"grad {i}")


def test_one_valid_pair_dice():
    case = _make(B=3, T=4, lengths=torch.tensor([0, 1, 0]), act="dice")
    for chunk in (None, 1):
        with _chunk(chunk) if chunk else contextlib.nullcontext():
            _compare(case, False, "none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("jagged", LAYOUTS)
def test_low_precision(dtype, jagged):
    case = _make(dtype=dtype, act="prelu", B=6, T=20, rows=(40, 12))
    with _chunk(200):
        _compare(case, jagged, "softmax", padding_idx=0, dtype=dtype)


def test_duplicates_sum_in_position_order_whatever_the_threads():
    case = _make(B=40, T=30, rows=(5, 3), act="dice")  # every id many times
    results = []
    for threads in (1, 2):
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            results.append(_run(din_ops.embedding_attention_pooling, case, False, "softmax", None))
        finally:
            torch.set_num_threads(prev)
    for a, b in zip(results[0][3], results[1][3]):
        if a.is_sparse:
            assert torch.equal(a.values(), b.values()) and torch.equal(a.indices(), b.indices())
    _compare(case, False, "softmax")


def test_gradcheck_float64():
    # no padding_idx: its rows are read by the forward but get no gradient, as in nn.Embedding
    case = _make(B=3, T=4, widths=(2, 3), rows=(5, 4), hidden=(3,), act="dice", C=2)
    nt = len(case["tables"])
    from din_ops.nn import _DenseGrad

    def f(query, t0, t1, w0, w1, b0, b1, a0):
        tables = [_DenseGrad.apply(t0), _DenseGrad.apply(t1)]
        return din_ops.embedding_attention_pooling(
            query, tables, case["ids"], [w0, w1], [b0, b1], lengths=case["lengths"], activation="dice",
            dice_alpha=[a0], normalization="softmax", return_weights=True)

    args = [case["query"], *case["tables"], *case["weights"], *case["biases"], *case["kw"]["dice_alpha"]]
    assert nt == 2
    with _chunk(8):
        assert torch.autograd.gradcheck(f, args, atol=1e-7)


def _op_args(case, jagged=False):
    ids, layout = (_jagged(case) if jagged else (case["ids"], None))
    lengths = None if jagged else case["lengths"]
    offsets = layout if jagged else None
    tensors = [t.detach().requires_grad_() for t in _params(case)]
    nt, nw = len(case["tables"]), len(case["weights"])
    return (tensors[0], tensors[1:1 + nt], ids, lengths, offsets, [0, -1], tensors[1 + nt:1 + nt + nw],
            tensors[1 + nt + nw:1 + nt + 2 * nw], None, None, None, None, None, case["act"], "softmax", 1.0, 1e-8)


@pytest.mark.parametrize("jagged", LAYOUTS)
def test_opcheck(jagged):
    case = _make(B=3, T=4, hidden=(3,))
    torch.library.opcheck(torch.ops.din_ops.embedding_attention_pooling.default, _op_args(case, jagged))


@pytest.mark.parametrize("jagged", LAYOUTS)
def test_opcheck_stats(jagged):
    case = _make(B=3, T=4, hidden=(3, 2), act="dice")
    q, tables, ids, lengths, offsets, pads, weights, biases = _op_args(case, jagged)[:8]
    alpha = [a.detach().requires_grad_() for a in case["kw"]["dice_alpha"]]
    mean, var = [case["kw"]["dice_running_mean"][0]], [case["kw"]["dice_running_var"][0]]
    args = (q, tables, ids, lengths, offsets, pads, weights[:2], biases[:2], alpha[:1], mean, var, None, None,
            "dice", 1e-8)
    torch.library.opcheck(torch.ops.din_ops.embedding_attention_pooling_stats.default, args)


def test_compile_fullgraph_matches_eager():
    case = _make(B=4, T=6, act="prelu")
    fn = torch.compile(din_ops.embedding_attention_pooling, fullgraph=True, dynamic=False)
    got = _run(fn, case, False, "softmax", [0, None])
    want = _run(din_ops.embedding_attention_pooling, case, False, "softmax", [0, None])
    for a, b in zip(got[3], want[3]):
        _close(a, b, 1e-12, "grad")
    _close(got[0], want[0], 1e-12, "out")


def test_export():
    emb = [nn.Embedding(20, 4, sparse=True), nn.Embedding(9, 4, sparse=True)]
    m = din_ops.nn.EmbeddingAttentionPooling(emb, hidden_units=(6,))

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.ModuleList(emb)
            self.pool = m

        def forward(self, q, a, b, lengths):
            return self.pool(q, [a, b], lengths=lengths)

    w = Wrap().eval()
    args = (torch.randn(3, 8), torch.randint(0, 20, (3, 5)), torch.randint(0, 9, (3, 5)), torch.tensor([5, 0, 2]))
    B, T = torch.export.Dim("B", min=1), torch.export.Dim("T", min=1)
    ep = torch.export.export(w, args, dynamic_shapes=({0: B}, {0: B, 1: T}, {0: B, 1: T}, {0: B}))
    other = (torch.randn(4, 8), torch.randint(0, 20, (4, 7)), torch.randint(0, 9, (4, 7)), torch.tensor([7, 1, 0, 3]))
    torch.testing.assert_close(ep.module()(*other), w(*other), rtol=0, atol=1e-6)


def test_double_backward_raises():
    case = _make(B=2, T=3)
    out = din_ops.embedding_attention_pooling(case["query"], case["tables"], case["ids"], case["weights"],
                                              case["biases"], lengths=case["lengths"])
    with pytest.raises(RuntimeError, match="embedding_attention_pooling.*second-order"):
        torch.autograd.grad(out.sum(), case["query"], create_graph=True)


def test_autocast_runs_in_the_tables_dtype():
    case = _make(B=3, T=4, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = din_ops.embedding_attention_pooling(case["query"].bfloat16(), case["tables"], case["ids"],
                                                  case["weights"], case["biases"], lengths=case["lengths"])
    assert out.dtype == torch.float32
    want = ref.embedding_attention_pooling(case["query"].bfloat16().float(), case["tables"], case["ids"],
                                           case["weights"], case["biases"], lengths=case["lengths"])
    _close(out, want, 1e-5, "out")


# --- bad input ---------------------------------------------------------------------------------
def _call(case, **over):
    args = dict(query=case["query"], tables=case["tables"], ids=case["ids"], weights=case["weights"],
                biases=case["biases"])
    kw = dict(lengths=case["lengths"])
    for k, v in over.items():
        (args if k in args else kw)[k] = v
    return din_ops.embedding_attention_pooling(args["query"], args["tables"], args["ids"], args["weights"],
                                               args["biases"], **kw)


def test_bad_input_names_the_argument():
    case = _make(B=3, T=4, rows=(11, 6))
    ids = [i.clone() for i in case["ids"]]
    ids[1][1, 0] = 6  # row 1 is full (lengths[1] == T): a valid position
    with pytest.raises(RuntimeError, match=r"ids\[1\]"):
        _call(case, ids=ids)
    ids[1][1, 0] = -1
    with pytest.raises(RuntimeError, match=r"ids\[1\]"):
        _call(case, ids=ids)
    with pytest.raises(ValueError, match=r"ids\[1\] must have the shape"):
        _call(case, ids=[case["ids"][0], case["ids"][1][:, :2]])
    with pytest.raises(ValueError, match="widths"):
        _call(case, tables=[case["tables"][0], case["tables"][1][:, :2]])
    with pytest.raises(ValueError, match="one index tensor per table"):
        _call(case, ids=case["ids"][:1])
    with pytest.raises(ValueError, match=r"ids\[0\] must be int32 or int64"):
        _call(case, ids=[case["ids"][0].float(), case["ids"][1]])
    with pytest.raises(ValueError, match=r"padding_idx\[0\]"):
        _call(case, padding_idx=[11, None])
    with pytest.raises(ValueError, match=r"tables\[0\] must have dtype"):
        _call(case, tables=[case["tables"][0].float(), case["tables"][1]])
    with pytest.raises(ValueError, match="lengths"):
        _call(case, lengths=torch.tensor([1, 5, 0]))
    with pytest.raises(ValueError, match="offsets"):
        _call(case, ids=[i[:, 0] for i in case["ids"]], lengths=None)


# --- module and model ------------------------------------------------------------------------------
def test_module_shares_tables_and_keeps_state_dict_small():
    item, cat = nn.Embedding(30, 4, padding_idx=0, sparse=True), nn.Embedding(7, 4, padding_idx=0)
    m = din_ops.nn.EmbeddingAttentionPooling([item, cat], hidden_units=(8, 4), activation="dice")
    assert all(k.startswith("attention.") for k in m.state_dict())
    assert m.embeddings[0] is item
    q = torch.randn(3, 8)
    hist = [torch.randint(0, 30, (3, 6)), torch.randint(0, 7, (3, 6))]
    lengths = torch.tensor([6, 2, 0])
    m(q, hist, lengths=lengths).sum().backward()
    assert item.weight.grad.is_sparse and not cat.weight.grad.is_sparse  # cat is sparse=False
    keys = torch.cat([item(hist[0]), cat(hist[1])], -1)
    m2 = copy.deepcopy(m)
    torch.testing.assert_close(m2.attention(q, keys, lengths=lengths), m(q, hist, lengths=lengths))
    m3 = pickle.loads(pickle.dumps(m))
    torch.testing.assert_close(m3(q, hist, lengths=lengths), m(q, hist, lengths=lengths))


def test_din_uses_it_and_trains_with_mba_like_eager():
    torch.manual_seed(0)
    kwargs = dict(num_items=40, num_categories=6, user_fields=(5,), embed_dim=4, attention_units=(8, 4),
                  attention_activation="dice", mlp_units=(8,))
    a = din_ops.models.DIN(backend="din_ops", **kwargs)
    b = din_ops.models.DIN(backend="eager", **kwargs)
    b.load_state_dict(a.state_dict())
    assert a._history_pooling is not None and b._history_pooling is None
    B, T = 16, 9
    g = torch.Generator().manual_seed(3)
    batch = dict(users=torch.randint(1, 6, (B, 1), generator=g), items=torch.randint(1, 41, (B,), generator=g),
                 categories=torch.randint(1, 7, (B,), generator=g), hist_items=torch.randint(1, 41, (B, T), generator=g),
                 hist_categories=torch.randint(1, 7, (B, T), generator=g),
                 lengths=torch.randint(0, T + 1, (B,), generator=g))
    freq = {e.weight: torch.randint(0, 5, (e.num_embeddings,)) for e in a.tables().values()}
    freq_b = {e.weight: freq[ea.weight] for ea, e in zip(a.tables().values(), b.tables().values())}
    opt_a = din_ops.optim.MBAAdagrad([e.weight for e in a.tables().values()], lr=0.1, lam=0.01, frequencies=freq, padding_idx=0)
    opt_b = din_ops.optim.MBAAdagrad([e.weight for e in b.tables().values()], lr=0.1, lam=0.01, frequencies=freq_b, padding_idx=0)
    pad = torch.arange(T) >= batch["lengths"].unsqueeze(1)
    for k in ("hist_items", "hist_categories"):  # 0 pads: the eager tables then see no padding ids
        batch[k][pad] = 0
    y = torch.randint(0, 2, (B,), generator=g).float()
    for _ in range(3):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(**batch), y)
            loss.backward()
            opt.step()
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
