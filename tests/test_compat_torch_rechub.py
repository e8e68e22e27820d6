"""din_ops.compat.torch_rechub against torch-rechub 0.9.0 itself (installed by the test set-up).

Outputs, every gradient and the BatchNorm running statistics of converted units equal the
originals: float64 to 1e-10 (relative to the largest value); float32 within 1e-5 relative of the
float64 original, or 4x the float32 original's own error (see test_compat_deepctr_torch.py).
"""
import copy

import pytest
import torch
from torch import nn

from compat_libs import require

require("torch_rechub", "torch_rechub.models.ranking.din")

from torch_rechub.basic.activation import Dice as RechubDice  # noqa: E402
from torch_rechub.basic.features import SequenceFeature, SparseFeature  # noqa: E402
from torch_rechub.models.ranking.din import DIN, ActivationUnit  # noqa: E402

import din_ops  # noqa: E402
import din_ops.compat.torch_rechub as tr  # noqa: E402
from din_ops.compat._common import Unsupported  # noqa: E402
from compat_check import close as _close, compare as _compare, compare32 as _compare32  # noqa: E402
from compat_check import randomize as _randomize  # noqa: E402


def _unit(activation, use_softmax=False, dims=(13, 7), D=5, warm=True):
    m = _randomize(ActivationUnit(D, dims=list(dims), activation=activation, use_softmax=use_softmax)).double()
    if warm:  # non-trivial running statistics
        with torch.no_grad():
            m(torch.randn(4, 6, D, dtype=torch.float64), torch.randn(4, D, dtype=torch.float64))
    return m


def _inputs(B=7, T=9, D=5, dtype=torch.float64):
    return (torch.randn(B, T, D, dtype=dtype, requires_grad=True), torch.randn(B, D, dtype=dtype, requires_grad=True))


@pytest.mark.parametrize("activation", ["sigmoid", "relu", "prelu", "leakyrelu"])
@pytest.mark.parametrize("use_softmax", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_activation_unit_float64(activation, use_softmax, train):
    torch.manual_seed(11)
    m = _unit(activation, use_softmax)
    c = tr.convert(copy.deepcopy(m))
    assert isinstance(c, ActivationUnit) and type(c) is not ActivationUnit
    _compare(m, c, _inputs(), torch.float64, train)


@pytest.mark.parametrize("use_softmax", [False, True])
def test_activation_unit_float32(use_softmax):
    torch.manual_seed(12)
    m = _unit("prelu", use_softmax, dims=(80, 40), D=8).float()
    c = tr.convert(copy.deepcopy(m))
    _compare32(m, c, _inputs(31, 17, 8, torch.float32))


def _din(att_activation="prelu", att_dims=(12, 6), padding_idx=None):
    E = 4
    features = [SparseFeature("user", 6, embed_dim=E)]
    target = [SparseFeature("item", 15, embed_dim=E), SparseFeature("cate", 7, embed_dim=E)]
    history = [SequenceFeature("hist_item", 15, embed_dim=E, pooling="concat", shared_with="item",
                               padding_idx=padding_idx),
               SequenceFeature("hist_cate", 7, embed_dim=E, pooling="concat", shared_with="cate",
                               padding_idx=padding_idx)]
    model = DIN(features, history, target, mlp_params={"dims": [16, 8]},
                attention_mlp_params={"dims": list(att_dims), "activation": att_activation})
    return _randomize(model, 0.4).double()


def _din_input(B=8, T=6, pad_front=True, seed=13):
    g = torch.Generator().manual_seed(seed)
    L = torch.randint(1, T + 1, (B,), generator=g)
    L[0] = T
    pos = torch.arange(T)
    valid = pos >= (T - L[:, None]) if pad_front else pos < L[:, None]  # torch-rechub pads in front
    x = {"user": torch.randint(0, 6, (B,), generator=g), "item": torch.randint(1, 15, (B,), generator=g),
         "cate": torch.randint(1, 7, (B,), generator=g),
         "hist_item": torch.randint(1, 15, (B, T), generator=g) * valid,
         "hist_cate": torch.randint(1, 7, (B, T), generator=g) * valid}
    return x, valid


class _Wrap(nn.Module):  # dict input -> tensor, for _compare
    def __init__(self, model, x):
        super().__init__()
        self.model, self.x = model, x

    def forward(self):
        return self.model(self.x)


@pytest.mark.parametrize("train", [True, False])
def test_din_model(train):
    torch.manual_seed(14)
    m = _din()
    c = tr.convert(copy.deepcopy(m))
    assert set(c.state_dict()) == set(m.state_dict())
    assert all(type(u).__name__.startswith("DinOps") for u in c.attention_layers)
    x, _ = _din_input()
    _compare(_Wrap(m, x), _Wrap(c, x), (), torch.float64, train)


def test_weights_and_state_dict_are_kept():
    m = _din()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    ids = [id(p) for p in m.parameters()]
    assert tr.convert(m) is m
    assert [id(p) for p in m.parameters()] == ids
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
    m.load_state_dict(sd)


# --- the documented differences ----------------------------------------------------------------
def test_difference_no_mask():
    """torch-rechub attends to padding; ``mask_padding=True`` scores and pools real behaviours only."""
    torch.manual_seed(15)
    m = _din()
    lib = tr.convert(copy.deepcopy(m))
    masked = tr.convert(copy.deepcopy(m), mask_padding=True)
    x, valid = _din_input()
    m.eval(), lib.eval(), masked.eval()
    _close(lib(x), m(x), torch.float64, "library semantics")
    y = masked(x)
    assert (y - m(x)).abs().max() > 1e-6
    # the masked model equals torch-rechub run on each user's real behaviours alone (eval mode:
    # BatchNorm uses running statistics, so rows are independent)
    for b in range(len(valid)):
        n = int(valid[b].sum())
        xb = {k: (v[b:b + 1, -n:] if k.startswith("hist") else v[b:b + 1]) for k, v in x.items()}
        _close(y[b:b + 1], m(xb), torch.float64, f"row {b} alone")
    # and ignores what the padding holds
    x2 = {k: v.clone() for k, v in x.items()}
    x2["hist_item"][~valid] = 0
    x2["hist_cate"][~valid] = 0
    _close(masked(x2), y, torch.float64, "padding content")


def test_difference_no_mask_training_statistics():
    """In training the masked unit's BatchNorm statistics count real behaviours only."""
    torch.manual_seed(16)
    m = _unit("relu", warm=False)
    c = tr.convert(copy.deepcopy(m))
    h, t = _inputs()
    L = torch.randint(1, 10, (7,))
    mask = torch.arange(9) < L[:, None]
    c(h, t, mask=mask)
    bn_c = c.attention.mlp[1]
    # BatchNorm1d over the real positions only, from the same start
    ref = copy.deepcopy(m)
    first = ref.attention.mlp[0](torch.cat([t[:, None].expand_as(h), h, t[:, None] - h, t[:, None] * h], -1)[mask])
    ref.attention.mlp[1](first)
    _close(bn_c.running_mean, ref.attention.mlp[1].running_mean, torch.float64, "running mean")
    _close(bn_c.running_var, ref.attention.mlp[1].running_var, torch.float64, "running var")
    # lengths and a prefix mask agree
    c2 = tr.convert(copy.deepcopy(m))
    _close(c2(h, t, lengths=L), c(h, t, mask=mask), torch.float64, "lengths vs mask")


def test_difference_dice_is_refused_or_replaced():
    """torch-rechub's Dice normalizes across hidden units: refused, or replaced by the paper's Dice."""
    torch.manual_seed(17)
    m = _unit("dice", warm=False)
    with pytest.raises(Unsupported, match="dice='paper'"):
        tr.convert(copy.deepcopy(m))
    with pytest.warns(UserWarning, match="left unconverted"):
        assert type(tr.convert(copy.deepcopy(m), strict=False)) is ActivationUnit
    c = tr.convert(copy.deepcopy(m), dice="paper")
    dice = [x for x in c.attention.mlp if isinstance(x, din_ops.nn.Dice)]
    assert len(dice) == 2 and not any(isinstance(x, RechubDice) for x in c.attention.mlp)
    assert float(dice[0].alpha[0].detach()) == float(m.attention.mlp[2].alpha.detach())
    h, t = _inputs()
    assert (c(h, t) - m(h, t)).abs().max() > 1e-6  # a different activation
    # the fused unit equals the same MLP (BatchNorm + din_ops Dice) run eagerly by torch-rechub's forward
    eager = copy.deepcopy(c)
    eager.__class__ = ActivationUnit
    _compare(eager, c, (h, t), torch.float64, True)
    _compare(eager, c, (h, t), torch.float64, False)


def test_dropout_falls_back_in_training():
    torch.manual_seed(18)
    m = ActivationUnit(5, dims=[8], activation="sigmoid")
    m.attention.mlp[3].p = 0.5
    c = tr.convert(copy.deepcopy(m))
    h, t = _inputs(dtype=torch.float32)
    torch.manual_seed(0)
    a = m(h, t)
    torch.manual_seed(0)
    b = c(h, t)
    assert torch.equal(a, b)
    m.eval(), c.eval()
    _close(c(h, t), m(h, t), torch.float32, "eval")


def test_bad_dice_option():
    with pytest.raises(ValueError, match="dice"):
        tr.convert(_unit("relu"), dice="rechub")
