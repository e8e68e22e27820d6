"""ONNX export (din_ops/onnx.py): models that use din_ops go through ``torch.onnx.export`` (dynamo)
with each op translated to standard ONNX operators, and ONNX Runtime gives eager's outputs
within 1e-5 (float32) at the traced shape and at other batch sizes and history lengths."""
import copy

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import din_ops  # noqa: E402
from din_ops.models import DIN  # noqa: E402

TOL = 1e-5


def _export(module, args, path, dynamic_shapes, **kw):
    torch.onnx.export(module, args, f=str(path), dynamo=True, dynamic_shapes=dynamic_shapes, verbose=False, **kw)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(sess, args):
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, {n: a.numpy() for n, a in zip(names, args)})


def _din_inputs(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(1, 10, (B, 1), generator=g), torch.randint(1, 100, (B,), generator=g),
            torch.randint(1, 20, (B,), generator=g), torch.randint(1, 100, (B, T), generator=g),
            torch.randint(1, 20, (B, T), generator=g), torch.randint(0, T + 1, (B,), generator=g))


_B, _T = torch.export.Dim("B", min=1, max=4096), torch.export.Dim("T", min=1, max=4096)
_DIN_DYNAMIC = ({0: _B}, {0: _B}, {0: _B}, {0: _B, 1: _T}, {0: _B, 1: _T}, {0: _B})


@pytest.mark.parametrize("activation,normalization,mlp", [
    ("sigmoid", "none", "prelu"), ("dice", "softmax", "dice"), ("prelu", "softmax", "relu"),
    ("relu", "none", "prelu"), ("identity", "softmax", "prelu")])
def test_din_onnx_runtime_equals_eager(tmp_path, activation, normalization, mlp):
    torch.manual_seed(0)
    m = DIN(100, 20, user_fields=(10,), embed_dim=8, attention_activation=activation,
            attention_normalization=normalization, mlp_activation=mlp)
    m.train()
    for s in range(3):  # running statistics away from their initial values
        m(*_din_inputs(16, 9, 100 + s))
    m.eval()
    sess = _export(m, _din_inputs(4, 7, 1), tmp_path / "din.onnx", _DIN_DYNAMIC)
    for B, T in [(4, 7), (9, 3), (1, 20), (33, 1)]:
        args = _din_inputs(B, T, B * 100 + T)
        got = _run(sess, args)[0]
        want = m(*args).detach().numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


def test_din_serving_onnx(tmp_path):
    """DIN.serving(): one user, C candidates, dynamic C and T."""
    torch.manual_seed(1)
    m = DIN(100, 20, user_fields=(10, 3), embed_dim=8).eval()
    C, T = torch.export.Dim("C", min=1, max=4096), torch.export.Dim("T", min=1, max=4096)

    def request(C_, T_, seed):
        g = torch.Generator().manual_seed(seed)
        return (torch.tensor([[3, 1]]), torch.randint(1, 100, (C_,), generator=g),
                torch.randint(1, 20, (C_,), generator=g), torch.randint(1, 100, (1, T_), generator=g),
                torch.randint(1, 20, (1, T_), generator=g), torch.tensor([max(T_ - 2, 0)]))

    sess = _export(m.serving(), request(8, 20, 0), tmp_path / "serve.onnx",
                   (None, {0: C}, {0: C}, {1: T}, {1: T}, None))
    for C_, T_ in [(8, 20), (1, 5), (100, 3), (3, 50)]:
        args = request(C_, T_, C_ + T_)
        np.testing.assert_allclose(_run(sess, args)[0], m.score(*args).detach().numpy(), rtol=0, atol=TOL)


class _Unit(torch.nn.Module):
    """The op on its own: jagged or padded keys, C candidates, both outputs."""

    def __init__(self, jagged, activation, normalization):
        super().__init__()
        self.jagged = jagged
        self.pool = din_ops.nn.AttentionPooling(6, hidden_units=(7, 5), activation=activation,
                                                normalization=normalization)

    def forward(self, query, keys, rows):
        kw = dict(offsets=rows) if self.jagged else dict(lengths=rows)
        return self.pool(query, keys, return_weights=True, **kw)


def _unit_inputs(jagged, B, C, T, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0] = 0  # an empty row
    q = torch.randn(B, C, 6, generator=g)
    if jagged:
        offsets = torch.zeros(B + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(lengths, 0)
        return q, torch.randn(int(offsets[-1]), 6, generator=g), offsets
    keys = torch.randn(B, T, 6, generator=g)
    keys[1, int(lengths[1]):] = float("nan")  # padding is never read
    return q, keys, lengths


@pytest.mark.parametrize("jagged", [False, True], ids=["padded", "jagged"])
@pytest.mark.parametrize("activation,normalization", [("sigmoid", "softmax"), ("prelu", "none")])
def test_attention_pooling_onnx(tmp_path, jagged, activation, normalization):
    torch.manual_seed(2)
    m = _Unit(jagged, activation, normalization).eval()
    B, N, C = torch.export.Dim("B", min=2, max=4096), torch.export.Dim("N", min=1), torch.export.Dim("C", max=64)
    T = torch.export.Dim("T", min=1, max=4096)
    dyn = (({0: B, 1: C}, {0: N}, {0: B + 1}) if jagged else ({0: B, 1: C}, {0: B, 1: T}, {0: B}))
    sess = _export(m, _unit_inputs(jagged, 5, 3, 8, 0), tmp_path / "unit.onnx", dyn)
    for Bv, Cv, Tv in [(5, 3, 8), (2, 1, 4), (17, 4, 11)]:
        args = _unit_inputs(jagged, Bv, Cv, Tv, Bv * Cv + Tv)
        got = _run(sess, args)
        want = [t.detach().numpy() for t in m(*args)]
        for g_, w_ in zip(got, want):
            assert np.isfinite(g_).all()
            np.testing.assert_allclose(g_, w_, rtol=0, atol=TOL)


def test_translation_table_explicit(tmp_path):
    """The translations passed explicitly (custom_translation_table) give the same model."""
    from din_ops.onnx import translation_table

    torch.manual_seed(3)
    m = DIN(100, 20, user_fields=(10,), embed_dim=8).eval()
    sess = _export(m, _din_inputs(4, 7, 1), tmp_path / "t.onnx", _DIN_DYNAMIC,
                   custom_translation_table=translation_table())
    args = _din_inputs(6, 5, 2)
    np.testing.assert_allclose(_run(sess, args)[0], m(*args).detach().numpy(), rtol=0, atol=TOL)


def test_torch_rechub_export_onnx(tmp_path):
    """A converted torch-rechub DIN still goes through the library's own CTRTrainer.export_onnx."""
    from compat_libs import require

    require("torch_rechub", "torch_rechub.models.ranking.din")
    from torch_rechub.trainers import CTRTrainer

    import din_ops.compat.torch_rechub as tr
    from test_compat_torch_rechub import _din, _din_input

    torch.manual_seed(4)
    m = _din(att_activation="prelu").float().eval()
    c = tr.convert(copy.deepcopy(m)).eval()
    path = tmp_path / "rechub.onnx"
    CTRTrainer(c, device="cpu", model_path=str(tmp_path)).export_onnx(str(path), batch_size=4, seq_length=6)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for B, T in [(4, 6), (9, 6), (3, 11)]:
        x, _ = _din_input(B=B, T=T, seed=B + T)
        feed = {i.name: x[i.name].numpy() for i in sess.get_inputs()}
        got = sess.run(None, feed)[0].reshape(-1)
        np.testing.assert_allclose(got, m(x).detach().numpy().reshape(-1), rtol=0, atol=TOL)
