"""RecBole 1.2.1 -> din_ops, in place, weights kept.

    import din_ops.compat.recbole as rb
    rb.convert(model)      # a RecBole DIN (or any model holding SequenceAttLayer)

What is converted: every ``recbole.model.layers.SequenceAttLayer`` (the attention of RecBole's DIN
and DIEN). Its MLP (``MLPLayers``: ``Dropout, Linear, [BatchNorm1d], activation`` per layer) and
``dense`` output layer run as one fused op; ``softmax_stag`` and ``return_seq_weight`` are
honoured, and ``mask_mat`` may be any ``[1, T]`` position table.

Semantics (see docs/compat.md), all reproduced exactly:

- **Scaling.** RecBole divides the masked scores by ``sqrt(H)`` (``H`` = the query width) before
  the optional softmax: the op's ``scale = 1 / sqrt(H)``.
- **Dice.** RecBole's ``Dice`` has no statistics at all and an ``alpha`` that is a plain zero
  tensor (not a parameter, never trained): it computes ``s * sigmoid(s)``. It is reproduced with
  the op's Dice in inference form (mean 0, variance 1, eps 0, the zero ``alpha``).
  ``convert(model, dice="paper")`` instead replaces it by :class:`din_ops.nn.Dice` (trainable
  ``alpha``, statistics over the valid positions).
- ``LeakyReLU`` is a PReLU with a constant slope. ``tanh`` has no fused form: ``convert`` refuses
  it (``strict=False`` leaves such a layer unconverted).
- Empty histories with ``softmax_stag=True``: RecBole softmaxes a row of ``-inf`` and returns NaN;
  din_ops returns zero weights and a zero output.
- Dropout in the MLP (``dropout > 0``) in training mode falls back to the original forward.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..nn import Dice as _DinDice
from ._common import Unsupported, dropout_active, handle, swap_class
from ._mlp import parse_sequential
from ._unit import Hidden, Rows, Stats, jagged_from_mask, run_unit, scatter_weights

__all__ = ["convert", "DICE_MODES"]

DICE_MODES = ("library", "paper")


def _library():
    from recbole.model.layers import Dice, SequenceAttLayer

    return SequenceAttLayer, Dice


def _recbole_activation(act, lin):
    _, RecboleDice = _library()
    if isinstance(act, RecboleDice):
        H = lin.out_features
        acc = torch.float64 if lin.weight.dtype == torch.float64 else torch.float32
        zeros = torch.zeros(H, dtype=acc, device=lin.weight.device)
        ones = torch.ones(H, dtype=acc, device=lin.weight.device)
        alpha = act.alpha.to(device=lin.weight.device, dtype=lin.weight.dtype).reshape(-1).expand(H)
        return Hidden(lin.weight, lin.bias, "dice", alpha.contiguous(), dice=Stats(zeros, ones, eps=0.0, batch=False))
    if isinstance(act, nn.Tanh):
        raise Unsupported("tanh")
    return None


def _parts(layer):
    hidden, _ = parse_sequential(layer.att_mlp_layers.mlp_layers, extra=_recbole_activation, output_in_seq=False)
    return hidden


class _FusedSequenceAttLayer:
    """``SequenceAttLayer.forward(queries [B, H], keys [B, T, H], keys_length [B])`` fused."""

    def forward(self, queries, keys, keys_length):
        if dropout_active(self.att_mlp_layers.mlp_layers):
            return super().forward(queries, keys, keys_length)
        B, T, H = keys.shape
        valid = ~(self.mask_mat.repeat(B, 1) >= keys_length.unsqueeze(1))  # RecBole's mask, inverted
        if bool((valid.long().cummin(1).values == valid.long()).all()):
            rows = Rows(keys, lengths=valid.sum(1))
        else:
            rows = jagged_from_mask(keys, valid)
        out, w = run_unit(queries, rows, _parts(self), self.dense.weight, self.dense.bias,
                          normalization="softmax" if self.softmax_stag else "none",
                          scale=1.0 / math.sqrt(queries.shape[-1]), return_weights=True)
        if self.return_seq_weight:
            if rows.offsets is not None:
                w = scatter_weights(w, valid)
            return w.unsqueeze(1)  # [B, 1, T]
        return out.unsqueeze(1)  # [B, 1, H]


def _replace_dice(layer, RecboleDice):
    seq = layer.att_mlp_layers.mlp_layers
    width = None
    for i, m in enumerate(seq):
        if isinstance(m, nn.Linear):
            width = m.out_features
            ref = m.weight
        elif isinstance(m, RecboleDice):
            d = _DinDice(width, device=ref.device, dtype=ref.dtype)
            d.train(m.training)
            seq[i] = d


def convert(model: nn.Module, *, dice: str = "library", strict: bool = True) -> nn.Module:
    """Converts every RecBole ``SequenceAttLayer`` in ``model`` (or ``model`` itself), in place.

    ``dice``: ``"library"`` reproduces RecBole's statistics-free Dice exactly; ``"paper"``
    replaces it by :class:`din_ops.nn.Dice`. ``strict``: raise on a layer that cannot be
    expressed exactly (else warn and leave it).
    """
    if dice not in DICE_MODES:
        raise ValueError(f"dice must be one of {DICE_MODES}, got {dice!r}")
    SequenceAttLayer, RecboleDice = _library()
    for name, m in model.named_modules():
        if not isinstance(m, SequenceAttLayer):
            continue
        if dice == "paper":
            _replace_dice(m, RecboleDice)
        try:
            _parts(m)
        except Unsupported as e:
            handle(strict, e, name or type(m).__name__)
            continue
        swap_class(m, _FusedSequenceAttLayer)
    return model
