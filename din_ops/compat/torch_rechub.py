"""torch-rechub 0.9.0 -> din_ops, in place, weights kept.

    from torch_rechub.models.ranking import DIN
    import din_ops.compat.torch_rechub as tr

    model = DIN(features, history_features, target_features, mlp_params={"dims": [200, 80]},
                attention_mlp_params={"dims": [80, 40], "activation": "prelu"})
    tr.convert(model)                      # same outputs and gradients
    tr.convert(model, mask_padding=True)   # the paper's unit: padding no longer attended to

What is converted: every ``ActivationUnit`` (DIN's local activation unit). Its MLP
(``Linear, BatchNorm1d, activation, Dropout`` per hidden layer, then ``Linear(H, 1)``) runs as one
fused op: the ``BatchNorm1d`` layers are folded into the linear layers with the batch statistics
of the positions (training) or the running statistics (eval), which is exact, and their running
statistics are updated as ``BatchNorm1d`` does. The top MLP of ``DIN`` is left as it is.

Semantics (see docs/compat.md):

- **No mask.** torch-rechub's unit scores every position of the padded history, padding
  included, adds the padded keys into the sum (and into the softmax with ``use_softmax``) and into
  the BatchNorm statistics. The converted unit reproduces this by default;
  ``convert(model, mask_padding=True)`` makes ``DIN`` pass each history's padding mask (ids equal
  to the feature's ``padding_idx``, or 0 when it has none) so only real behaviours are scored,
  pooled and counted in the statistics (any padding side: torch-rechub pads in front by default).
  A converted ``ActivationUnit`` also takes ``forward(history, target, lengths=None, mask=None)``.
- **Dice.** torch-rechub's ``Dice`` is not the paper's: it normalizes each position across its own
  hidden units (``var`` summed, not averaged, ``epsilon=1e-3``) with one scalar ``alpha`` drawn
  from ``randn``. The fused op has no such activation: ``convert`` refuses a unit that uses it
  unless ``dice="paper"``, which replaces it by :class:`din_ops.nn.Dice` (per-channel statistics
  over the valid positions, running statistics, ``alpha`` starting at the old scalar).
- Dropout inside the unit (``dropout > 0``) in training mode falls back to the original forward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..nn import Dice as _DinDice
from ._common import Unsupported, dropout_active, handle, swap_class
from ._mlp import parse_sequential
from ._unit import Rows, jagged_from_mask, run_unit

__all__ = ["convert", "DICE_MODES"]

DICE_MODES = ("error", "paper")


def _library():
    from torch_rechub.basic.activation import Dice
    from torch_rechub.models.ranking.din import DIN, ActivationUnit

    return ActivationUnit, DIN, Dice


def _parts(unit):
    return parse_sequential(unit.attention.mlp)


class _FusedActivationUnit:
    """``ActivationUnit.forward(history [B, T, D], target [B, D])`` through the fused op.

    ``lengths [B]`` or ``mask [B, T]`` (true = real behaviour) restrict scoring, pooling and the
    BatchNorm statistics to real behaviours; without them every position counts (torch-rechub).
    """

    def forward(self, history, target, lengths: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None):
        if dropout_active(self.attention.mlp):
            if lengths is not None or mask is not None:
                raise NotImplementedError("dropout inside the attention unit with a padding mask")
            return super().forward(history, target)
        if mask is not None:
            rows = jagged_from_mask(history, mask)
        else:
            rows = Rows(history, lengths=lengths)
        hidden, out = _parts(self)
        return run_unit(target, rows, hidden, out.weight, out.bias,
                        normalization="softmax" if self.use_softmax else "none")


class _MaskedDIN:
    """torch-rechub ``DIN.forward`` with each history's padding mask passed to its unit."""

    _din_ops_padding = None

    def forward(self, x):
        embed_x_features = self.embedding(x, self.features)
        embed_x_history = self.embedding(x, self.history_features)
        embed_x_target = self.embedding(x, self.target_features)
        pooled = []
        for i, fea in enumerate(self.history_features):
            pad = self._din_ops_padding if self._din_ops_padding is not None else (
                fea.padding_idx if fea.padding_idx is not None else 0)
            mask = x[fea.name].long() != pad
            pooled.append(self.attention_layers[i](embed_x_history[:, i, :, :], embed_x_target[:, i, :],
                                                   mask=mask).unsqueeze(1))
        pooled = torch.cat(pooled, dim=1)
        mlp_in = torch.cat([pooled.flatten(start_dim=1), embed_x_target.flatten(start_dim=1),
                            embed_x_features.flatten(start_dim=1)], dim=1)
        return torch.sigmoid(self.mlp(mlp_in).squeeze(1))


def _replace_dice(unit, RechubDice):
    seq = unit.attention.mlp
    width = None
    for i, m in enumerate(seq):
        if isinstance(m, nn.Linear):
            width = m.out_features
        elif isinstance(m, RechubDice):
            ref = m.alpha
            d = _DinDice(width, device=ref.device, dtype=ref.dtype)
            with torch.no_grad():
                d.alpha.fill_(float(ref.detach().reshape(-1)[0]))
            d.train(m.training)
            seq[i] = d


def convert(model: nn.Module, *, mask_padding: bool = False, padding_value: Optional[int] = None,
            dice: str = "error", strict: bool = True) -> nn.Module:
    """Converts every torch-rechub ``ActivationUnit`` in ``model`` (a ``DIN`` or the unit itself), in place.

    ``mask_padding``: a converted ``DIN`` masks each history's padding (``padding_value``, default
    the feature's ``padding_idx`` or 0) instead of attending to it. ``dice``: ``"error"`` refuses
    units using torch-rechub's ``Dice``; ``"paper"`` replaces it by :class:`din_ops.nn.Dice`.
    ``strict``: raise on a unit that cannot be expressed exactly (else warn and leave it).
    """
    if dice not in DICE_MODES:
        raise ValueError(f"dice must be one of {DICE_MODES}, got {dice!r}")
    ActivationUnit, DIN, RechubDice = _library()
    for name, m in model.named_modules():
        if not isinstance(m, ActivationUnit):
            continue
        where = name or type(m).__name__
        if any(isinstance(x, RechubDice) for x in m.attention.mlp):
            if dice == "error":
                handle(strict, Unsupported(
                    "torch-rechub's Dice normalizes across hidden units, which the fused op does not "
                    "compute; pass dice='paper' to use the paper's Dice (din_ops.nn.Dice) instead"), where)
                continue
            _replace_dice(m, RechubDice)
        try:
            _parts(m)
        except Unsupported as e:
            handle(strict, e, where)
            continue
        swap_class(m, _FusedActivationUnit)
    if mask_padding:
        for m in model.modules():
            if isinstance(m, DIN):
                swap_class(m, _MaskedDIN)
                m._din_ops_padding = padding_value
    return model
