"""No host synchronization on the CUDA paths, and CUDA-graph capture of DIN inference (GPU only).

Every op (forward and backward), the MBA optimizers' step and DIN's forward and backward run
under ``torch.cuda.set_sync_debug_mode("error")``: any host synchronization (``.item()``,
``bool()`` of a tensor, a blocking host <-> device copy, ``nonzero``, ``torch.unique``, ...)
raises a RuntimeError. Each case runs once before that (compiling the Triton kernels, which is
one-time setup), then again under the error mode. The value checks are the default device-side
asserts (``din_ops.set_cuda_value_checks("async")``) and, where it matters, ``"off"``.

Then DIN inference is captured in a ``torch.cuda.CUDAGraph`` with static inputs and replayed on
new inputs: the replay equals the eager forward.

The tests marked ``cuda_only`` need a CUDA GPU and are skipped without one. The tests named
``*triton*`` run everywhere: the same ops on CPU tensors through the Triton launchers (under
``TRITON_INTERPRET=1`` without a GPU) with the CUDA code paths selected (device-side asserts for
the value checks, no CPU re-checks in the launchers), under a dispatch mode that fails on every
torch operation that reads a tensor on the host (``.item()``, ``bool()``, ``nonzero``,
``torch.unique``, boolean-mask indexing, ``repeat_interleave`` without ``output_size``, a tensor
built from host data). The device-side assert path on CPU tensors is also tested in
tests/test_bad_input.py (``test_async_value_checks_on_cpu``).
"""
import contextlib
import os
import subprocess
import sys
import textwrap
import traceback

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import din_ops
from din_ops import models
from din_ops.optim import MBAAdagrad, MBASGD

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = "cuda"
CHECK_MODES = ("async", "off")


@contextlib.contextmanager
def no_sync():
    """Raises on any host synchronization inside (torch's sync debug mode)."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()  # a failing device-side assert shows here


def run_strict(fn, mode="async"):
    """``fn()`` once to warm up (Triton compiles), then under the error mode; returns the second result."""
    with din_ops.cuda_value_checks(mode):
        fn()
        with no_sync():
            return fn()


# --- the harness catches what it should -------------------------------------------------------
@cuda_only
def test_sync_mode_is_caught():
    """``set_cuda_value_checks("sync")`` reads lengths on the host: the error mode sees it."""
    x = torch.randn(4, 6, 8, device=DEV)
    lengths = torch.tensor([6, 2, 0, 5], device=DEV)
    alpha = torch.zeros(8, device=DEV)
    din_ops.dice(x, alpha, lengths=lengths)  # warm up
    with din_ops.cuda_value_checks("sync"), pytest.raises(RuntimeError, match="synchroniz"):
        with no_sync():
            din_ops.dice(x, alpha, lengths=lengths)


# --- attention_pooling -------------------------------------------------------------------------
def _lengths(B, T, g):
    L = torch.randint(0, T + 1, (B,), generator=g)
    L[0] = T
    return L


@cuda_only
@pytest.mark.parametrize("mode", CHECK_MODES)
@pytest.mark.parametrize("layout", ["padded", "padded_all_valid", "jagged"])
@pytest.mark.parametrize("activation,normalization", [("sigmoid", "none"), ("dice", "softmax"),
                                                      ("prelu", "none")])
@pytest.mark.parametrize("candidates", [0, 3])
def test_attention_pooling_no_sync(mode, layout, activation, normalization, candidates):
    g = torch.Generator().manual_seed(0)
    B, T, D = 6, 9, 8
    att = din_ops.nn.AttentionPooling(D, (16, 8), activation=activation, normalization=normalization).to(DEV)
    att.train()  # Dice: batch statistics (attention_pooling_stats and its backward), running update
    L = _lengths(B, T, g)
    keys_padded = torch.randn(B, T, D, generator=g)
    q_shape = (B, candidates, D) if candidates else (B, D)
    query = torch.randn(*q_shape, generator=g).to(DEV).requires_grad_()
    if layout == "jagged":
        valid = torch.arange(T)[None, :] < L[:, None]
        keys = keys_padded[valid].to(DEV).requires_grad_()
        kw = dict(offsets=torch.nn.functional.pad(L.cumsum(0), (1, 0)).to(DEV))
    else:
        keys = keys_padded.to(DEV).requires_grad_()
        kw = dict(lengths=L.to(DEV)) if layout == "padded" else {}

    def step():
        for p in list(att.parameters()) + [query, keys]:
            p.grad = None
        out, w = att(query, keys, return_weights=True, **kw)
        (out.square().sum() + w.sum()).backward()
        return out.detach(), keys.grad

    out, dk = run_strict(step, mode)
    assert torch.isfinite(out).all() and torch.isfinite(dk).all()
    att.eval()
    if activation == "dice":  # eval: the running statistics
        with torch.no_grad():
            run_strict(lambda: att(query, keys, **kw), mode)


# --- dice --------------------------------------------------------------------------------------
@cuda_only
@pytest.mark.parametrize("mode", CHECK_MODES)
@pytest.mark.parametrize("layout", ["rows", "padded", "jagged"])
@pytest.mark.parametrize("affine", [False, True])
def test_dice_no_sync(mode, layout, affine):
    g = torch.Generator().manual_seed(1)
    B, T, C = 5, 7, 24
    dice = din_ops.nn.Dice(C, affine=affine).to(DEV)
    if layout == "padded":
        x = torch.randn(B, T, C, generator=g).to(DEV).requires_grad_()
        kw = dict(lengths=_lengths(B, T, g).to(DEV))
    elif layout == "jagged":
        x = torch.randn(11, C, generator=g).to(DEV).requires_grad_()
        kw = dict(offsets=torch.tensor([0, 4, 4, 11], device=DEV))
    else:
        x = torch.randn(13, C, generator=g).to(DEV).requires_grad_()
        kw = {}

    def step(training=True):
        dice.train(training)
        x.grad = None
        y = dice(x, **kw)
        y.square().sum().backward()
        return y.detach(), x.grad

    y, dx = run_strict(step, mode)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    run_strict(lambda: step(training=False), mode)


# --- MBA ---------------------------------------------------------------------------------------
def _mba_case(N=500, D=16, M=1500, hot=700, dtype=torch.float32, float_freq=False, seed=2, device=DEV):
    """Indices with one row hit ``hot`` times (more than the Triton kernels' PIECE: two-level sum)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, N, (M,), generator=g)
    idx[torch.randperm(M, generator=g)[:hot]] = 7
    freq = torch.randint(0, 50, (N,), generator=g)
    if float_freq:
        freq = freq.double()
    w = torch.randn(N, D, generator=g).to(dtype)
    grad = torch.randn(M, D, generator=g).to(dtype)
    return w.to(device), idx.to(device), grad.to(device), freq.to(device)


@cuda_only
@pytest.mark.parametrize("mode", CHECK_MODES)
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adagrad_rowwise"])
@pytest.mark.parametrize("float_freq", [False, True])
@pytest.mark.parametrize("padding_idx", [None, 3])
def test_mba_sparse_update_no_sync(mode, optimizer, float_freq, padding_idx):
    w, idx, grad, freq = _mba_case(float_freq=float_freq)
    state = None
    if optimizer == "adagrad":
        state = torch.zeros_like(w)
    elif optimizer == "adagrad_rowwise":
        state = torch.zeros(w.shape[0], device=DEV)
    w_ref = w.cpu()
    st_ref = None if state is None else state.cpu()

    def step():
        return din_ops.mba_sparse_update_(w, idx, grad, freq, lr=0.1, lam=0.3, optimizer=optimizer, state=state,
                                          padding_idx=padding_idx)

    run_strict(step, mode)
    for _ in range(2):  # the same two steps on the CPU kernels
        din_ops.mba_sparse_update_(w_ref, idx.cpu(), grad.cpu(), freq.cpu(), lr=0.1, lam=0.3, optimizer=optimizer,
                                   state=st_ref, padding_idx=padding_idx)
    torch.testing.assert_close(w.cpu(), w_ref, rtol=1e-5, atol=1e-5)
    if state is not None:
        torch.testing.assert_close(state.cpu(), st_ref, rtol=1e-5, atol=1e-5)


@cuda_only
def test_mba_update_deterministic_no_sync():
    w, idx, grad, freq = _mba_case(M=5000, hot=3000)
    outs = []
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            wc = w.clone()
            run_strict(lambda: din_ops.mba_sparse_update_(wc, idx, grad, freq, lr=0.1, lam=0.3))
            outs.append(wc)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(outs[0], outs[1])


@cuda_only
@pytest.mark.parametrize("mode", CHECK_MODES)
@pytest.mark.parametrize("padding_idx", [None, 7])
def test_mba_penalty_no_sync(mode, padding_idx):
    w, idx, _, freq = _mba_case(float_freq=True)
    wg = w.clone().requires_grad_()

    def step():
        wg.grad = None
        p = din_ops.mba_penalty(wg, idx, freq, 0.5, padding_idx)
        p.backward()
        return p.detach(), wg.grad

    p, gw = run_strict(step, mode)
    wc = w.cpu().requires_grad_()
    p_ref = din_ops.mba_penalty(wc, idx.cpu(), freq.cpu(), 0.5, padding_idx)
    p_ref.backward()
    torch.testing.assert_close(p.cpu(), p_ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw.cpu(), wc.grad, rtol=1e-5, atol=1e-6)


@cuda_only
def test_frequency_counter_no_sync():
    counter = din_ops.FrequencyCounter(100, padding_idx=0, device=DEV)
    idx = torch.randint(0, 100, (64, 10), device=DEV)
    run_strict(lambda: counter.update(idx))
    assert counter.total == 2 * int((idx != 0).sum())


# --- the optimizers and DIN --------------------------------------------------------------------
ITEMS, CATS, FIELDS = 60, 7, (11, 3)


def _din_batch(B=16, T=12, seed=0, jagged=False, device=DEV):
    g = torch.Generator().manual_seed(seed)
    L = torch.randint(1, T + 1, (B,), generator=g)
    L[0] = T
    valid = torch.arange(T)[None, :] < L[:, None]
    b = dict(users=torch.stack([torch.randint(1, n + 1, (B,), generator=g) for n in FIELDS], 1),
             items=torch.randint(1, ITEMS + 1, (B,), generator=g),
             categories=torch.randint(1, CATS + 1, (B,), generator=g),
             hist_items=torch.randint(1, ITEMS + 1, (B, T), generator=g) * valid,
             hist_categories=torch.randint(1, CATS + 1, (B, T), generator=g) * valid,
             lengths=L)
    if jagged:
        b["hist_items"], b["hist_categories"] = b["hist_items"][valid], b["hist_categories"][valid]
        b["offsets"] = torch.nn.functional.pad(L.cumsum(0), (1, 0))
        del b["lengths"]
    labels = torch.randint(0, 2, (B,), generator=g).float()
    return {k: v.to(device) for k, v in b.items()}, labels.to(device)


def _din(sparse, device=DEV, **kw):
    torch.manual_seed(0)
    cfg = dict(embed_dim=8, attention_units=(16, 8), mlp_units=(24, 8), attention_activation="dice",
               mlp_activation="dice")
    cfg.update(kw)
    return models.DIN(ITEMS, CATS, FIELDS, sparse=sparse, **cfg).to(device)


@cuda_only
@pytest.mark.parametrize("mode", CHECK_MODES)
@pytest.mark.parametrize("jagged", [False, True])
@pytest.mark.parametrize("cfg", [dict(), dict(attention_activation="sigmoid", mlp_activation="prelu",
                                              attention_normalization="softmax")], ids=["dice", "sigmoid-prelu"])
def test_din_forward_backward_no_sync(mode, jagged, cfg):
    # dense embedding gradients: torch's own sparse embedding backward drops padding_idx with a
    # boolean mask, which synchronizes (not din_ops; the optimizer test below covers sparse tables)
    model = _din(sparse=False, **cfg)
    batch, labels = _din_batch(jagged=jagged)
    loss_fn = nn.BCEWithLogitsLoss()

    def step():
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(**batch), labels)
        loss.backward()
        return loss.detach()

    loss = run_strict(step, mode)
    assert torch.isfinite(loss)
    model.eval()
    with torch.no_grad():
        run_strict(lambda: model(**batch), mode)
        one = {k: v[:1] for k, v in _din_batch()[0].items()}
        cands = torch.randint(1, ITEMS + 1, (20,), device=DEV), torch.randint(1, CATS + 1, (20,), device=DEV)
        run_strict(lambda: model.score(one["users"], *cands, one["hist_items"], one["hist_categories"],
                                       one["lengths"]), mode)


@cuda_only
@pytest.mark.parametrize("mode", CHECK_MODES)
@pytest.mark.parametrize("make_opt", [
    lambda m, f: MBASGD(m.parameters(), lr=0.05, lam=0.01, padding_idx=din_ops.optim.embedding_padding(m)),
    lambda m, f: MBAAdagrad(m.parameters(), lr=0.05, lam=0.01, padding_idx=din_ops.optim.embedding_padding(m)),
    lambda m, f: MBAAdagrad(m.parameters(), lr=0.05, lam=0.01, rowwise=True, frequencies=f,
                            padding_idx=din_ops.optim.embedding_padding(m)),
], ids=["MBASGD-online", "MBAAdagrad-online", "MBAAdagrad-rowwise-given"])
def test_mba_optimizers_step_no_sync(mode, make_opt):
    model = _din(sparse=True)
    batch, labels = _din_batch()
    freqs = {e.weight: torch.randint(0, 9, (e.num_embeddings,), device=DEV).double() for e in model.tables().values()}
    opt = make_opt(model, freqs)
    loss_fn = nn.BCEWithLogitsLoss()
    with din_ops.cuda_value_checks(mode):
        for i in range(3):
            opt.zero_grad()
            loss_fn(model(**batch), labels).backward()  # torch's sparse embedding backward syncs
            assert model.item_embedding.weight.grad.is_sparse
            if i == 0:
                opt.step()  # warm up
            else:
                with no_sync():
                    opt.step()
    for p in model.parameters():
        assert torch.isfinite(p).all()


# --- CUDA graphs -------------------------------------------------------------------------------
def _like(static, seed):
    """New inputs with the shapes of ``static``: new ids, lengths permuted (the same N)."""
    g = torch.Generator().manual_seed(seed)
    new = {}
    for k, v in static.items():
        if k == "users":
            new[k] = torch.stack([torch.randint(1, n + 1, (v.shape[0],), generator=g) for n in FIELDS], 1)
        elif k in ("items", "hist_items"):
            new[k] = torch.randint(1, ITEMS + 1, tuple(v.shape), generator=g)
        elif k in ("categories", "hist_categories"):
            new[k] = torch.randint(1, CATS + 1, tuple(v.shape), generator=g)
    L = static["lengths"] if "lengths" in static else static["offsets"].diff()
    L = L.cpu()[torch.randperm(L.numel(), generator=g)]
    if "lengths" in static:
        new["lengths"] = L
    else:
        new["offsets"] = torch.nn.functional.pad(L.cumsum(0), (1, 0))
    return {k: v.to(DEV) for k, v in new.items()}


@cuda_only
@pytest.mark.parametrize("mode", CHECK_MODES)
@pytest.mark.parametrize("jagged", [False, True])
@pytest.mark.parametrize("cfg", [dict(), dict(attention_activation="sigmoid", mlp_activation="prelu",
                                              attention_normalization="softmax")], ids=["dice", "sigmoid-prelu"])
def test_din_inference_cuda_graph(mode, jagged, cfg):
    model = _din(sparse=True, **cfg)
    with torch.no_grad():  # running statistics away from their initial values
        for s in range(3):
            model(**_din_batch(seed=10 + s, jagged=jagged)[0])
    model.eval()
    static, _ = _din_batch(seed=0, jagged=jagged)
    with din_ops.cuda_value_checks(mode), torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up on a side stream, as torch.cuda.graphs asks
            for _ in range(3):
                model(**static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(**static)
        for seed in (1, 2, 3):
            new = _like(static, seed)
            for k in static:
                static[k].copy_(new[k])
            graph.replay()
            eager = model(**new)
            torch.testing.assert_close(static_out, eager, rtol=1e-6, atol=1e-6)
        with no_sync():  # replaying reads nothing back either
            graph.replay()


@cuda_only
def test_din_score_cuda_graph():
    model = _din(sparse=True).eval()
    one = {k: v[:1] for k, v in _din_batch()[0].items()}
    C = 32
    static = dict(users=one["users"].clone(), items=torch.randint(1, ITEMS + 1, (C,), device=DEV),
                  categories=torch.randint(1, CATS + 1, (C,), device=DEV), hist_items=one["hist_items"].clone(),
                  hist_categories=one["hist_categories"].clone(), lengths=one["lengths"].clone())
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                model.score(**static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model.score(**static)
        new = dict(static, items=torch.randint(1, ITEMS + 1, (C,), device=DEV),
                   lengths=torch.tensor([5], device=DEV))
        for k in static:
            static[k].copy_(new[k])
        graph.replay()
        torch.testing.assert_close(static_out, model.score(**new), rtol=1e-6, atol=1e-6)


# --- a failing device-side assert names the argument --------------------------------------------
ASSERT_SCRIPT = textwrap.dedent("""
    import torch, din_ops
    q, k = torch.randn(3, 4, device="cuda"), torch.randn(3, 5, 4, device="cuda")
    W, b = [torch.randn(6, 16, device="cuda"), torch.randn(1, 6, device="cuda")], [torch.zeros(6, device="cuda"),
                                                                                   torch.zeros(1, device="cuda")]
    din_ops.attention_pooling(q, k, W, b, lengths=torch.tensor([5, 9, 0], device="cuda"))
    torch.cuda.synchronize()
    print("NO ERROR")
""")


@cuda_only
def test_async_assert_names_the_argument():
    """A device-side assert stops the CUDA context: run it in a subprocess."""
    r = subprocess.run([sys.executable, "-c", ASSERT_SCRIPT], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, DIN_OPS_CUDA_VALUE_CHECKS="async"))
    out = r.stdout + r.stderr
    assert "NO ERROR" not in out and r.returncode != 0, out[-3000:]
    assert "device-side assert" in out, out[-3000:]
    assert "lengths must lie in [0, T=5]" in out, out[-3000:]


@cuda_only
def test_off_mode_clamps_without_error():
    q, k = torch.randn(3, 4, device=DEV), torch.randn(3, 5, 4, device=DEV)
    W = [torch.randn(6, 16, device=DEV), torch.randn(1, 6, device=DEV)]
    b = [torch.zeros(6, device=DEV), torch.zeros(1, device=DEV)]
    with din_ops.cuda_value_checks("off"):
        out = din_ops.attention_pooling(q, k, W, b, lengths=torch.tensor([5, 9, 0], device=DEV))
        torch.cuda.synchronize()
    ref = din_ops.attention_pooling(q.cpu(), k.cpu(), [w.cpu() for w in W], [x.cpu() for x in b],
                                    lengths=torch.tensor([5, 5, 0]))
    torch.testing.assert_close(out.cpu()[[0, 2]], ref[[0, 2]], rtol=1e-3, atol=1e-3)


# --- everywhere: the CUDA code paths on CPU tensors read nothing on the host ---------------------
class HostReads(TorchDispatchMode):
    """Records every torch operation that reads tensor data on the host (a device
    synchronization on CUDA tensors). The din_ops ops run their Triton launchers inside the mode
    (the kernels themselves, interpreted, run outside it)."""

    READS = {"aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.nonzero", "aten.nonzero_numpy",
             "aten._unique", "aten._unique2", "aten.unique_dim", "aten.unique_consecutive",
             "aten.unique_dim_consecutive", "aten.masked_select", "aten.equal", "aten.allclose",
             # a tensor built from host data (torch.tensor): a host-to-device copy on CUDA
             "aten.lift_fresh", "aten.lift_fresh_copy"}

    def __init__(self):
        super().__init__()
        self.found = []

    def _flag(self, func, why):
        here = [f"{os.path.basename(f.filename)}:{f.name}" for f in traceback.extract_stack()
                if "din_ops" in f.filename and "/tests/" not in f.filename]
        self.found.append(f"{func} ({why}) at {' <- '.join(reversed(here[-4:]))}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket._qualified_op_name).replace("::", ".")
        if name in self.READS:
            self._flag(func, "host read")
        elif name == "aten.repeat_interleave" and kwargs.get("output_size") is None and \
                not (len(args) > 2 and args[2] is not None):
            self._flag(func, "no output_size")
        elif name in ("aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"):
            idx = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in idx or ()):
                self._flag(func, "boolean mask")
        if func.namespace == "din_ops":
            op = func._schema.name.split("::")[1]
            with self:
                return din_ops._library._triton_impls[op](*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_paths_on_cpu(monkeypatch):
    """CPU tensors take what CUDA tensors take: device-side asserts for the value checks, the
    Triton launchers without their CPU re-checks; every host read is recorded."""
    pytest.importorskip("triton")
    if not din_ops._library.triton_interpret():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest without a GPU)")
    import triton.runtime.interpreter as interp
    from din_ops.triton import attention_pooling as tap, dice as tdice, mba as tmba

    monkeypatch.setattr(din_ops._library, "_ASYNC_CHECKS_ON_CPU", True)
    for m in (tap, tdice, tmba):
        monkeypatch.setattr(m, "_CHECK_CPU_VALUES", False)
    monkeypatch.setattr(tmba, "PIECE", 8)  # hot rows: the two-level sum
    call = interp.GridExecutor.__call__

    def launch(self, *args, **kwargs):  # the interpreted kernel: not the launcher's business
        with _disable_current_modes():
            return call(self, *args, **kwargs)

    monkeypatch.setattr(interp.GridExecutor, "__call__", launch)
    spy = HostReads()
    with din_ops.backend("triton"), spy:
        yield spy
    assert not spy.found, "host reads on the CUDA path:\n" + "\n".join(spy.found)


def test_triton_host_read_detector_detects():
    t = torch.tensor([3, 1, 3, 0])
    spy = HostReads()
    with spy:
        int(t.max())
        bool((t > 0).any())
        t[t > 0]
        torch.unique(t)
        torch.repeat_interleave(t, t)
        torch.repeat_interleave(t, t, output_size=7)  # fine
        torch.tensor([1.0])
        torch.sort(t)  # fine
    assert len(spy.found) == 6, spy.found


@pytest.mark.parametrize("layout", ["padded", "padded_all_valid", "jagged"])
@pytest.mark.parametrize("activation,normalization,candidates", [("sigmoid", "none", 0), ("dice", "softmax", 0),
                                                                 ("dice", "none", 3), ("prelu", "softmax", 2)])
def test_triton_attention_pooling_reads_nothing_on_the_host(monkeypatch, layout, activation, normalization,
                                                            candidates):
    g = torch.Generator().manual_seed(0)
    B, T, D = 4, 6, 4
    att = din_ops.nn.AttentionPooling(D, (8, 4), activation=activation, normalization=normalization)
    L = _lengths(B, T, g)
    query = torch.randn(*((B, candidates, D) if candidates else (B, D)), generator=g).requires_grad_()
    keys = torch.randn(B, T, D, generator=g)
    if layout == "jagged":
        keys = keys[torch.arange(T)[None, :] < L[:, None]]
        kw = dict(offsets=torch.nn.functional.pad(L.cumsum(0), (1, 0)))
    else:
        kw = dict(lengths=L) if layout == "padded" else {}
    keys.requires_grad_()
    with cuda_paths_on_cpu(monkeypatch):
        out, w = att(query, keys, return_weights=True, **kw)
        (out.square().sum() + w.sum()).backward()
        att.eval()
        with torch.no_grad():
            att(query, keys, **kw)
    assert torch.isfinite(out).all() and torch.isfinite(keys.grad).all()


@pytest.mark.parametrize("layout", ["rows", "padded", "jagged"])
def test_triton_dice_reads_nothing_on_the_host(monkeypatch, layout):
    g = torch.Generator().manual_seed(1)
    dice = din_ops.nn.Dice(6, affine=True)
    kw = {}
    if layout == "padded":
        x, kw = torch.randn(3, 5, 6, generator=g), dict(lengths=torch.tensor([5, 0, 2]))
    elif layout == "jagged":
        x, kw = torch.randn(7, 6, generator=g), dict(offsets=torch.tensor([0, 5, 5, 7]))
    else:
        x = torch.randn(7, 6, generator=g)
    x.requires_grad_()
    with cuda_paths_on_cpu(monkeypatch):
        dice(x, **kw).square().sum().backward()
        dice.eval()
        dice(x, **kw).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adagrad_rowwise"])
@pytest.mark.parametrize("float_freq", [False, True])
def test_triton_mba_reads_nothing_on_the_host(monkeypatch, optimizer, float_freq):
    w, idx, grad, freq = _mba_case(N=30, D=5, M=60, hot=25, float_freq=float_freq, device="cpu")
    state = {"sgd": None, "adagrad": torch.zeros_like(w), "adagrad_rowwise": torch.zeros(30)}[optimizer]
    w_ref, st_ref = w.clone(), None if state is None else state.clone()
    wg = w.clone().requires_grad_()
    with cuda_paths_on_cpu(monkeypatch):
        din_ops.mba_sparse_update_(w, idx, grad, freq, lr=0.1, lam=0.3, optimizer=optimizer, state=state,
                                   padding_idx=3)
        din_ops.mba_penalty(wg, idx, freq, 0.5, 3).backward()
        din_ops.FrequencyCounter(30, padding_idx=0).update(idx)
    din_ops.mba_sparse_update_(w_ref, idx, grad, freq, lr=0.1, lam=0.3, optimizer=optimizer, state=st_ref,
                               padding_idx=3)
    torch.testing.assert_close(w, w_ref, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("jagged", [False, True])
def test_triton_din_and_optimizers_read_nothing_on_the_host(monkeypatch, jagged):
    model = _din(sparse=False, device="cpu", embed_dim=4, attention_units=(8,), mlp_units=(8,))
    batch, labels = _din_batch(B=4, T=5, jagged=jagged, device="cpu")
    one = {k: v[:1] for k, v in _din_batch(B=4, T=5, device="cpu")[0].items()}
    cands = torch.tensor([1, 2, 3]), torch.tensor([1, 1, 2])
    with cuda_paths_on_cpu(monkeypatch):
        nn.functional.binary_cross_entropy_with_logits(model(**batch), labels).backward()
        model.eval()
        with torch.no_grad():
            model(**batch)
            model.score(one["users"], *cands, one["hist_items"], one["hist_categories"], one["lengths"])
    # the optimizers' step, sparse tables (torch's sparse embedding backward masks the padding row
    # on the host: outside the check)
    sparse = _din(sparse=True, device="cpu", embed_dim=4, attention_units=(8,), mlp_units=(8,))
    freqs = {sparse.item_embedding.weight: torch.rand(ITEMS + 1, dtype=torch.float64) * 5}
    pads = din_ops.optim.embedding_padding(sparse)
    for opt in (MBASGD(sparse.parameters(), lr=0.05, lam=0.01, padding_idx=pads, frequencies=freqs),
                MBAAdagrad(sparse.parameters(), lr=0.05, lam=0.01, padding_idx=pads),
                MBAAdagrad(sparse.parameters(), lr=0.05, lam=0.01, rowwise=True, padding_idx=pads)):
        opt.zero_grad()
        with din_ops.backend("triton"):
            nn.functional.binary_cross_entropy_with_logits(sparse(**batch), labels).backward()
        with cuda_paths_on_cpu(monkeypatch):
            opt.step()
