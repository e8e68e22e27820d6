"""din_ops.compat.deepctr_torch against DeepCTR-Torch 0.3.0 itself (installed by the test set-up).

Outputs, every gradient (inputs and parameters) and the running statistics of the converted
modules equal the originals: in float64 to 1e-10 (relative to the largest value). In float32 both
are compared with the float64 original: the converted module's error is at most 1e-5 (relative)
or 4x the original float32 module's own error, whichever is larger (Dice's gradients through the
batch variance lose a few digits in float32 in both implementations).
"""
import copy
import warnings

import pytest
import torch
from torch import nn

from compat_libs import require

require("deepctr_torch", "deepctr_torch")

from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat  # noqa: E402
from deepctr_torch.layers.activation import Dice  # noqa: E402
from deepctr_torch.layers.core import LocalActivationUnit  # noqa: E402
from deepctr_torch.layers.sequence import AttentionSequencePoolingLayer  # noqa: E402
from deepctr_torch.models import DIN  # noqa: E402

import din_ops  # noqa: E402
import din_ops.compat.deepctr_torch as dc  # noqa: E402
from din_ops import reference as ref  # noqa: E402
from din_ops.compat._common import Unsupported  # noqa: E402
from compat_check import close as _close, compare as _compare, compare32 as _compare32  # noqa: E402
from compat_check import randomize as _randomize  # noqa: E402

ACTIVATIONS = ["sigmoid", "Dice", "prelu", "relu", "linear"]


def _batch(B, T, D, dtype, min_len=1):
    q = torch.randn(B, 1, D, dtype=dtype, requires_grad=True)
    k = torch.randn(B, T, D, dtype=dtype, requires_grad=True)
    L = torch.randint(min_len, T + 1, (B, 1))
    L[0] = T  # one full row, the others padded
    return q, k, L


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("weight_normalization", [False, True])
@pytest.mark.parametrize("return_score", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_attention_sequence_pooling_layer_float64(activation, weight_normalization, return_score, train):
    torch.manual_seed(1)
    m = _randomize(AttentionSequencePoolingLayer((13, 7), activation, weight_normalization=weight_normalization,
                                                 return_score=return_score, embedding_dim=5)).double()
    c = dc.convert(copy.deepcopy(m))
    assert isinstance(c, AttentionSequencePoolingLayer) and type(c) is not AttentionSequencePoolingLayer
    _compare(m, c, _batch(7, 11, 5, torch.float64), torch.float64, train)


@pytest.mark.parametrize("activation", ["sigmoid", "Dice"])
@pytest.mark.parametrize("weight_normalization", [False, True])
def test_attention_sequence_pooling_layer_float32(activation, weight_normalization):
    torch.manual_seed(2)
    m = AttentionSequencePoolingLayer((80, 40), activation, weight_normalization=weight_normalization,
                                      embedding_dim=8)
    c = dc.convert(copy.deepcopy(m))
    _compare32(m, c, _batch(37, 23, 8, torch.float32))


def test_supports_masking_with_holes():
    """``supports_masking=True`` takes any [B, T] mask; the valid positions are gathered."""
    torch.manual_seed(3)
    m = _randomize(AttentionSequencePoolingLayer((9,), "Dice", supports_masking=True, embedding_dim=4)).double()
    c = dc.convert(copy.deepcopy(m))
    q, k, _ = _batch(5, 7, 4, torch.float64)
    mask = torch.rand(5, 7) < 0.6
    mask[:, 0] = True
    for rs in (False, True):
        m.return_score = c.return_score = rs
        _compare(m, c, (q, k, None, mask), torch.float64, steps=1)


@pytest.mark.parametrize("activation", ["Dice", "sigmoid", "prelu"])
def test_local_activation_unit(activation):
    """A stand-alone unit returns the scores of every position."""
    torch.manual_seed(4)
    m = _randomize(LocalActivationUnit((11, 6), embedding_dim=3, activation=activation)).double()
    c = dc.convert(copy.deepcopy(m))
    q = torch.randn(4, 1, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(4, 9, 3, dtype=torch.float64, requires_grad=True)
    for train in (True, False):
        _compare(m, c, (q, k), torch.float64, train)


@pytest.mark.parametrize("dim", [2, 3])
def test_dice(dim):
    torch.manual_seed(5)
    m = Dice(6, dim=dim).double()
    with torch.no_grad():
        m.alpha.normal_()
        m.bn.weight.normal_()
        m.bn.bias.normal_()
    c = dc.convert(copy.deepcopy(m))
    x = torch.randn(*((9, 6) if dim == 2 else (4, 6, 5)), dtype=torch.float64, requires_grad=True)
    if dim == 3:
        x = x.detach().transpose(1, 2).requires_grad_()  # DeepCTR's 3-D Dice is channels-last: [B, T, C]
    for train in (True, False):
        _compare(m, c, (x,), torch.float64, train)


def _din(dnn_activation="relu", att_activation="Dice", weight_normalization=False):
    cols = [SparseFeat("user", 5, embedding_dim=4), SparseFeat("item_id", 12, embedding_dim=4),
            SparseFeat("cate_id", 6, embedding_dim=4),
            VarLenSparseFeat(SparseFeat("hist_item_id", 12, embedding_dim=4, embedding_name="item_id"), 8,
                             length_name="seq_length"),
            VarLenSparseFeat(SparseFeat("hist_cate_id", 6, embedding_dim=4, embedding_name="cate_id"), 8,
                             length_name="seq_length")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = DIN(cols, ["item_id", "cate_id"], dnn_hidden_units=(16, 8), dnn_activation=dnn_activation,
                    att_hidden_size=(12, 6), att_activation=att_activation,
                    att_weight_normalization=weight_normalization, init_std=0.3)
    return model


def _din_input(model, B=9, T=8):
    g = torch.Generator().manual_seed(6)
    L = torch.randint(1, T + 1, (B,), generator=g)
    cols = {"user": torch.randint(0, 5, (B,), generator=g), "item_id": torch.randint(1, 12, (B,), generator=g),
            "cate_id": torch.randint(1, 6, (B,), generator=g),
            "hist_item_id": torch.randint(1, 12, (B, T), generator=g) * (torch.arange(T) < L[:, None]),
            "hist_cate_id": torch.randint(1, 6, (B, T), generator=g) * (torch.arange(T) < L[:, None]),
            "seq_length": L}
    X = torch.zeros(B, max(e for _, e in model.feature_index.values()), dtype=torch.float64)
    for name, (s, e) in model.feature_index.items():
        X[:, s:e] = cols[name].reshape(B, -1).double()
    return X


@pytest.mark.parametrize("att_activation", ["Dice", "sigmoid"])
@pytest.mark.parametrize("weight_normalization", [False, True])
def test_din_model(att_activation, weight_normalization):
    torch.manual_seed(7)
    m = _din(att_activation=att_activation, weight_normalization=weight_normalization).double()
    c = dc.convert(copy.deepcopy(m))
    assert set(c.state_dict()) == set(m.state_dict())
    assert type(c.attention).__name__.startswith("DinOps")
    _compare(m, c, (_din_input(m),), torch.float64)
    _compare(m, c, (_din_input(m),), torch.float64, train=False)


def test_weights_and_state_dict_are_kept():
    m = _din()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    params = [id(p) for p in m.parameters()]
    assert dc.convert(m) is m
    assert [id(p) for p in m.parameters()] == params
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
    dc.convert(m)  # idempotent
    m.load_state_dict(sd)


# --- the documented differences ----------------------------------------------------------------
def test_difference_dice_statistics_include_padding():
    """DeepCTR-Torch's Dice statistics count padded positions; ``dice_statistics="valid"`` does not."""
    torch.manual_seed(8)
    m = _randomize(AttentionSequencePoolingLayer((9, 5), "Dice", embedding_dim=4)).double()
    lib = dc.convert(copy.deepcopy(m))
    valid = dc.convert(copy.deepcopy(m), dice_statistics="valid")
    q, k, L = _batch(6, 10, 4, torch.float64, min_len=2)
    L[1:] = torch.randint(2, 8, (5, 1))
    out, out_lib, out_valid = m(q, k, L), lib(q, k, L), valid(q, k, L)
    _close(out_lib, out, torch.float64, "library statistics")
    assert (out_valid - out).abs().max() > 1e-3  # padding moved the statistics
    # the corrected unit is the paper's: Dice statistics over the real behaviours only
    lau = m.local_att
    want = ref.attention_pooling(
        q[:, 0], k, [l.weight for l in lau.dnn.linears] + [lau.dense.weight],
        [l.bias for l in lau.dnn.linears] + [lau.dense.bias], lengths=L[:, 0], activation="dice",
        dice_alpha=[a.alpha.reshape(-1) for a in lau.dnn.activation_layers],
        dice_gamma=[a.bn.weight for a in lau.dnn.activation_layers],
        dice_beta=[a.bn.bias for a in lau.dnn.activation_layers], eps=1e-8)
    _close(out_valid[:, 0], want, torch.float64, "valid statistics vs reference")
    # with no padding the two agree
    full = torch.full_like(L, k.shape[1])
    _close(valid(q, k, full), m(q, k, full), torch.float64, "no padding")


def test_difference_empty_history_softmax():
    """An empty history: DeepCTR-Torch averages the padded keys, din_ops returns 0."""
    torch.manual_seed(9)
    m = _randomize(AttentionSequencePoolingLayer((7,), "sigmoid", weight_normalization=True, embedding_dim=3)).double()
    c = dc.convert(copy.deepcopy(m))
    q, k, L = _batch(3, 5, 3, torch.float64)
    L[2] = 0
    o1, o2 = m(q, k, L), c(q, k, L)
    _close(o2[:2], o1[:2], torch.float64, "non-empty rows")
    _close(o1[2, 0], k[2].mean(0), torch.float64, "DeepCTR-Torch: mean of the padding")
    assert torch.equal(o2[2], torch.zeros_like(o2[2]))


def test_difference_din_dnn_dice_works_after_conversion():
    """``DIN(dnn_activation="dice")`` fails in DeepCTR-Torch (Dice(dim=3) gets 2-D input); converted, it runs."""
    torch.manual_seed(10)
    m = _din(dnn_activation="dice").double()
    X = _din_input(m)
    with pytest.raises(AssertionError):
        m(X)
    c = dc.convert(m)
    y = c(X)
    assert y.shape == (X.shape[0], 1) and torch.isfinite(y).all()
    # its Dice is the paper's over the batch: the same as a 2-D DeepCTR Dice with the same weights
    d3 = c.dnn.activation_layers[0]
    d2 = Dice(d3.bn.num_features, dim=2).double()
    d2.load_state_dict({k: v.reshape(-1) if k == "alpha" else v for k, v in d3.state_dict().items()})
    x = torch.randn(6, d3.bn.num_features, dtype=torch.float64)
    _close(d3(x), d2(x), torch.float64, "Dice on 2-D input")


def test_difference_use_bn_is_refused():
    """DeepCTR-Torch's ``use_bn`` in the unit normalizes axis T of [B, T, H]: broken, so refused."""
    m = LocalActivationUnit((6,), embedding_dim=3, use_bn=True)
    with pytest.raises(RuntimeError):
        m(torch.randn(2, 1, 3), torch.randn(2, 5, 3))
    with pytest.raises(Unsupported, match="use_bn"):
        dc.convert(m)


def test_unsupported_activation():
    class Swish(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x)

    m = AttentionSequencePoolingLayer((5,), Swish, embedding_dim=3)
    with pytest.raises(Unsupported, match="Swish"):
        dc.convert(copy.deepcopy(m))
    with pytest.warns(UserWarning, match="left unconverted"):
        c = dc.convert(m, strict=False)
    assert type(c) is AttentionSequencePoolingLayer
    with pytest.raises(ValueError, match="dice_statistics"):
        dc.convert(m, dice_statistics="all")


def test_bad_lengths_raise_before_the_kernel():
    m = dc.convert(AttentionSequencePoolingLayer((5,), "sigmoid", embedding_dim=3))
    with pytest.raises((ValueError, RuntimeError), match="keys"):
        m(torch.randn(2, 1, 3), torch.randn(3, 4, 3), torch.ones(3, 1, dtype=torch.long))


def test_din_ops_is_used():
    """The converted layer dispatches to the fused op (a plain-PyTorch fallback would not)."""
    m = dc.convert(AttentionSequencePoolingLayer((5,), "sigmoid", embedding_dim=3))
    with torch.profiler.profile() as prof:
        m(*_batch(2, 4, 3, torch.float32))
    assert any("din_ops::attention_pooling" in e.name for e in prof.events())
    assert din_ops.attention_pooling is not None


def test_dropout_falls_back_in_training():
    """A stand-alone unit with dropout runs DeepCTR-Torch's forward in training, the fused op in eval."""
    torch.manual_seed(19)
    m = LocalActivationUnit((8,), embedding_dim=3, activation="sigmoid", dropout_rate=0.5)
    c = dc.convert(copy.deepcopy(m))
    q, k = torch.randn(4, 1, 3), torch.randn(4, 6, 3)
    torch.manual_seed(0)
    a = m(q, k)
    torch.manual_seed(0)
    assert torch.equal(c(q, k), a)
    m.eval(), c.eval()
    with torch.profiler.profile() as prof:
        y = c(q, k)
    assert any("din_ops::attention_pooling" in e.name for e in prof.events())
    _close(y, m(q, k), torch.float32, "eval")
