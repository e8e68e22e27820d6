"""din_ops.compat.recbole against RecBole 1.2.1's own SequenceAttLayer (installed by the test set-up).

Outputs and every gradient equal the original: float64 to 1e-10 (relative to the largest value);
float32 within 1e-5 relative of the float64 original, or 4x the float32 original's own error.
"""
import copy
import math

import pytest
import torch

from compat_libs import require

require("recbole", "recbole.model.layers")

from recbole.model.layers import SequenceAttLayer  # noqa: E402

import din_ops  # noqa: E402
import din_ops.compat.recbole as rb  # noqa: E402
from din_ops import reference as ref  # noqa: E402
from din_ops.compat._common import Unsupported  # noqa: E402
from compat_check import close, compare, compare32, randomize  # noqa: E402

B, T, H = 7, 9, 6


def _layer(activation="sigmoid", softmax_stag=False, return_seq_weight=True, hidden=(13, 7), T=T, H=H,
           dtype=torch.float64):
    mask_mat = torch.arange(T).view(1, -1)  # as RecBole's DIN builds it
    m = SequenceAttLayer(mask_mat, [4 * H, *hidden], activation=activation, softmax_stag=softmax_stag,
                         return_seq_weight=return_seq_weight)
    return randomize(m).to(dtype)


def _inputs(B=B, T=T, H=H, dtype=torch.float64, min_len=1):
    q = torch.randn(B, H, dtype=dtype, requires_grad=True)
    k = torch.randn(B, T, H, dtype=dtype, requires_grad=True)
    L = torch.randint(min_len, T + 1, (B,))
    L[0] = T
    return q, k, L


@pytest.mark.parametrize("activation", ["sigmoid", "relu", "dice", "leakyrelu", "none"])
@pytest.mark.parametrize("softmax_stag", [False, True])
@pytest.mark.parametrize("return_seq_weight", [False, True])
def test_sequence_att_layer_float64(activation, softmax_stag, return_seq_weight):
    torch.manual_seed(21)
    m = _layer(activation, softmax_stag, return_seq_weight)
    c = rb.convert(copy.deepcopy(m))
    assert isinstance(c, SequenceAttLayer) and type(c) is not SequenceAttLayer
    compare(m, c, _inputs(), torch.float64)


@pytest.mark.parametrize("softmax_stag", [False, True])
def test_sequence_att_layer_float32(softmax_stag):
    torch.manual_seed(22)
    m = _layer("sigmoid", softmax_stag, return_seq_weight=False, hidden=(80, 40), T=23, H=16, dtype=torch.float32)
    c = rb.convert(copy.deepcopy(m))
    compare32(m, c, _inputs(37, 23, 16, torch.float32))


def test_keys_length_above_t_and_zero_without_softmax():
    torch.manual_seed(23)
    m = _layer("relu", return_seq_weight=False)
    c = rb.convert(copy.deepcopy(m))
    q, k, L = _inputs()
    L[1], L[2] = T + 5, 0
    compare(m, c, (q, k, L), torch.float64, steps=1)


def test_weights_and_state_dict_are_kept():
    m = _layer()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    ids = [id(p) for p in m.parameters()]
    assert rb.convert(m) is m
    assert [id(p) for p in m.parameters()] == ids
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())


# --- the documented differences ----------------------------------------------------------------
def test_difference_scaling():
    """RecBole divides the scores by sqrt(H): the op's scale = 1 / sqrt(H)."""
    torch.manual_seed(24)
    m = _layer("sigmoid", return_seq_weight=False)
    q, k, L = _inputs()
    mlp = [x for x in m.att_mlp_layers.mlp_layers if isinstance(x, torch.nn.Linear)]
    args = (q, k, [x.weight for x in mlp] + [m.dense.weight], [x.bias for x in mlp] + [m.dense.bias])
    out = m(q, k, L)[:, 0]
    close(din_ops.attention_pooling(*args, lengths=L, scale=1 / math.sqrt(H)), out, torch.float64, "scaled")
    assert (din_ops.attention_pooling(*args, lengths=L) - out).abs().max() > 1e-3


def test_difference_dice_has_no_statistics():
    """RecBole's Dice is s * sigmoid(s) (no statistics, alpha a constant zero); dice='paper' replaces it."""
    torch.manual_seed(25)
    m = _layer("dice", return_seq_weight=False)
    d = m.att_mlp_layers.mlp_layers[2]
    s = torch.randn(5, 13, dtype=torch.float64)
    close(d(s), s * torch.sigmoid(s), torch.float64, "RecBole Dice")
    assert all(p is not d.alpha for p in m.parameters())  # alpha is not trained
    q, k, L = _inputs()
    mlp = [x for x in m.att_mlp_layers.mlp_layers if isinstance(x, torch.nn.Linear)]
    w, b = [x.weight for x in mlp] + [m.dense.weight], [x.bias for x in mlp] + [m.dense.bias]
    # the paper's Dice (statistics over valid positions) is something else
    paper = ref.attention_pooling(q, k, w, b, lengths=L, activation="dice", scale=1 / math.sqrt(H),
                                  dice_alpha=[torch.zeros(13, dtype=torch.float64), torch.zeros(7, dtype=torch.float64)])
    assert (paper - m(q, k, L)[:, 0]).abs().max() > 1e-4
    c = rb.convert(copy.deepcopy(m), dice="paper")
    dice = [x for x in c.att_mlp_layers.mlp_layers if isinstance(x, din_ops.nn.Dice)]
    assert len(dice) == 2 and all(any(p is x.alpha for p in c.parameters()) for x in dice)
    close(c(q, k, L)[:, 0], paper, torch.float64, "dice='paper' vs reference")


def test_difference_empty_history_softmax():
    """An empty history with softmax_stag: RecBole returns NaN, din_ops zeros."""
    torch.manual_seed(26)
    m = _layer("sigmoid", softmax_stag=True, return_seq_weight=False)
    c = rb.convert(copy.deepcopy(m))
    q, k, L = _inputs()
    L[3] = 0
    o1, o2 = m(q, k, L), c(q, k, L)
    assert torch.isnan(o1[3]).all()
    assert torch.equal(o2[3], torch.zeros_like(o2[3]))
    keep = torch.arange(B) != 3
    close(o2[keep], o1[keep], torch.float64, "non-empty rows")


def test_difference_tanh_is_refused():
    m = _layer("tanh")
    with pytest.raises(Unsupported, match="tanh"):
        rb.convert(copy.deepcopy(m))
    with pytest.warns(UserWarning, match="left unconverted"):
        assert type(rb.convert(m, strict=False)) is SequenceAttLayer


def test_dropout_falls_back_in_training():
    m = _layer("relu")
    m.att_mlp_layers.mlp_layers[0].p = 0.3
    c = rb.convert(copy.deepcopy(m))
    q, k, L = _inputs()
    torch.manual_seed(0)
    a = m(q, k, L)
    torch.manual_seed(0)
    assert torch.equal(c(q, k, L), a)
    m.eval(), c.eval()
    close(c(q, k, L), m(q, k, L), torch.float64, "eval")


def test_bad_dice_option():
    with pytest.raises(ValueError, match="dice"):
        rb.convert(_layer(), dice="recbole")
