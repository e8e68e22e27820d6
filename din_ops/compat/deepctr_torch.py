"""DeepCTR-Torch 0.3.0 -> din_ops, in place, weights kept.

    from deepctr_torch.models import DIN
    import din_ops.compat.deepctr_torch as dc

    model = DIN(feature_columns, ["item_id", "cate_id"], att_activation="Dice")
    dc.convert(model)          # same outputs and gradients, the attention unit now fused

What is converted (each module keeps its parameters, buffers and ``state_dict`` keys; its class
becomes a subclass of the original one whose ``forward`` calls din_ops):

- ``AttentionSequencePoolingLayer`` (DIN's and DIEN's attention pooling): the local activation
  unit + masked weighted sum (or masked softmax with ``weight_normalization=True``) in one fused
  op; ``return_score`` and ``supports_masking`` (any ``[B, T]`` mask) are honoured.
- ``LocalActivationUnit`` used on its own: the scores ``[B, T, 1]`` of every position.
- ``Dice`` outside attention units (2-D ``[N, C]`` or 3-D ``[B, T, C]`` input): ``din_ops.dice``
  with the layer's ``BatchNorm1d`` (affine ``gamma``/``beta``, ``eps``, running statistics).
- ``deepctr_torch.models.DIN`` (and any model holding the modules above): every such module.

Semantics (see docs/compat.md):

- ``dice_statistics="library"`` (default, exact): DeepCTR-Torch's Dice inside the attention unit
  is a ``BatchNorm1d`` over all ``B * T`` positions, so padded positions enter the batch
  statistics (and the running statistics). The converted unit reproduces this: its Dice
  statistics are taken over every padded position while the pooling still masks them.
- ``dice_statistics="valid"``: the paper's Dice: statistics over the real behaviours only
  (SPEC section 2). Outputs then differ from DeepCTR-Torch whenever a history is padded.
- Empty histories with ``weight_normalization=True``: DeepCTR-Torch softmaxes the ``-2**32 + 1``
  fillers and returns the mean of the padded keys; din_ops returns 0 for such a row.
- ``DIN(dnn_activation="dice")`` fails in DeepCTR-Torch (its DNN builds ``Dice(dim=3)`` and feeds
  it 2-D input); a converted ``Dice`` accepts both 2-D and 3-D input.
- Dropout inside a stand-alone ``LocalActivationUnit`` (``dropout_rate > 0``) in training mode
  falls back to the original forward (the fused op has no dropout).
- ``LocalActivationUnit(use_bn=True)`` is refused: DeepCTR-Torch applies ``BatchNorm1d(H)`` to the
  ``[B, T, H]`` activations, which fails unless ``T == H`` (and then normalizes over ``T``).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from ..ops.dice import dice as _dice
from ..nn import Dice as _DinDice
from ._common import Unsupported, din_ops_dice_stats, dropout_active, handle, plain_activation, swap_class
from ._unit import Hidden, Rows, Stats, jagged_from_mask, run_unit, scatter_weights

__all__ = ["convert", "DICE_STATISTICS"]

DICE_STATISTICS = ("library", "valid")


def _library():
    from deepctr_torch.layers.activation import Dice
    from deepctr_torch.layers.core import LocalActivationUnit
    from deepctr_torch.layers.sequence import AttentionSequencePoolingLayer

    return AttentionSequencePoolingLayer, LocalActivationUnit, Dice


def _dice_parts(d):
    """DeepCTR-Torch's Dice: ``alpha`` ([C] or [C, 1]) and its ``BatchNorm1d``."""
    if d.bn.momentum is not None and not 0.0 <= d.bn.momentum <= 1.0:
        raise Unsupported(f"Dice BatchNorm momentum {d.bn.momentum}")
    return d.alpha.reshape(-1), Stats.of_batchnorm(d.bn)


def _hidden_layers(lau) -> List[Hidden]:
    """The layers of a ``LocalActivationUnit`` (``lau.dnn``: Linear, [BatchNorm1d], activation)."""
    _, _, Dice = _library()
    dnn = lau.dnn
    layers = []
    for i, lin in enumerate(dnn.linears):
        act = dnn.activation_layers[i]
        bn = Stats.of_batchnorm(dnn.bn[i]) if dnn.use_bn else None
        if isinstance(act, Dice):
            alpha, st = _dice_parts(act)
            layers.append(Hidden(lin.weight, lin.bias, "dice", alpha, bn=bn, dice=st))
        elif isinstance(act, _DinDice):
            layers.append(Hidden(lin.weight, lin.bias, "dice", act.alpha, bn=bn, dice=din_ops_dice_stats(act)))
        else:
            plain = plain_activation(act, lin.weight)
            if plain is None:
                raise Unsupported(f"activation {type(act).__name__}")
            name, alpha = plain
            layers.append(Hidden(lin.weight, lin.bias, name, alpha, bn=bn))
    if len({h.activation for h in layers}) > 1:
        raise Unsupported("hidden layers with different activations")
    return layers


def _check_lau(lau):
    if lau.dnn.use_bn:
        # DeepCTR-Torch applies BatchNorm1d(H) to the unit's [B, T, H] input, i.e. over axis T:
        # it fails unless T == H, and then normalizes the wrong axis; nothing to reproduce
        raise Unsupported("use_bn=True in the attention unit (BatchNorm1d over axis T of [B, T, H])")
    _hidden_layers(lau)
    if lau.dense.out_features != 1:
        raise Unsupported("the output layer must have one unit")


def _stats_rows(keys, rows, mode):
    return Rows(keys) if mode == "library" else rows


class _FusedAttentionSequencePoolingLayer:
    """``AttentionSequencePoolingLayer.forward`` through ``din_ops::attention_pooling``."""

    _din_ops_dice_statistics = "library"

    def forward(self, query, keys, keys_length, mask=None):
        B, T, D = keys.shape
        if self.supports_masking:
            if mask is None:
                raise ValueError("When supports_masking=True,input must support masking")
            valid = mask.reshape(B, T).to(torch.bool)
        else:
            valid = torch.arange(T, device=keys.device) < keys_length.reshape(-1, 1)
        # holes in the mask: gather the valid positions (while tracing, where the mask's values
        # are unknown, always: torch.export cannot branch on them)
        if self.supports_masking and (torch.compiler.is_compiling()
                                      or not bool((valid.long().cummin(1).values == valid.long()).all())):
            rows = jagged_from_mask(keys, valid)
        else:
            rows = Rows(keys, lengths=valid.sum(1))
        lau = self.local_att
        out, w = run_unit(query.reshape(query.shape[0], query.shape[-1]), rows, _hidden_layers(lau), lau.dense.weight, lau.dense.bias,
                          normalization="softmax" if self.weight_normalization else "none",
                          stats_rows=_stats_rows(keys, rows, self._din_ops_dice_statistics), return_weights=True)
        if self.return_score:
            if rows.offsets is not None:
                w = scatter_weights(w, valid)
            return w.unsqueeze(1)  # [B, 1, T]
        return out.unsqueeze(1)  # [B, 1, D]


class _FusedLocalActivationUnit:
    """``LocalActivationUnit.forward``: the scores ``[B, T, 1]`` of every position."""

    def forward(self, query, user_behavior):
        if dropout_active([self.dnn.dropout]):
            return super().forward(query, user_behavior)
        B, T, D = user_behavior.shape
        query = query.expand(B, 1, D).reshape(B, D)
        _, w = run_unit(query, Rows(user_behavior), _hidden_layers(self), self.dense.weight, self.dense.bias,
                        return_weights=True)
        return w.unsqueeze(-1)


class _FusedDice:
    """DeepCTR-Torch's ``Dice``: ``din_ops.dice`` with the layer's ``BatchNorm1d`` statistics.

    ``forward(x, lengths=None)``: with ``lengths`` (3-D input) the statistics skip padding.
    """

    def forward(self, x, lengths: Optional[torch.Tensor] = None):
        alpha, st = _dice_parts(self)
        if x.dim() not in (2, 3):
            raise ValueError(f"Dice takes [N, C] or [B, T, C] input, got {tuple(x.shape)}")
        batch = st.batch
        momentum = st.momentum
        if batch and st.running_mean is not None:
            self.bn.num_batches_tracked.add_(1)
            if momentum is None:
                momentum = 1.0 / float(self.bn.num_batches_tracked)
        return _dice(x, alpha, st.running_mean, st.running_var, lengths=lengths, gamma=st.gamma, beta=st.beta,
                     training=batch, momentum=0.1 if momentum is None else momentum, eps=st.eps)


def convert(model: nn.Module, *, dice_statistics: str = "library", strict: bool = True) -> nn.Module:
    """Converts DeepCTR-Torch's attention pooling, local activation units and Dice in ``model``, in place.

    ``dice_statistics``: ``"library"`` reproduces DeepCTR-Torch exactly (padding inside the Dice
    statistics of the attention unit); ``"valid"`` takes them over the real behaviours only.
    ``strict``: raise on a module that cannot be expressed exactly (else warn and leave it).
    Returns ``model``.
    """
    if dice_statistics not in DICE_STATISTICS:
        raise ValueError(f"dice_statistics must be one of {DICE_STATISTICS}, got {dice_statistics!r}")
    ASPL, LAU, Dice = _library()
    inside = set()
    for name, m in model.named_modules():
        if isinstance(m, ASPL):
            try:
                _check_lau(m.local_att)
            except Unsupported as e:
                handle(strict, e, name or type(m).__name__)
                continue
            swap_class(m, _FusedAttentionSequencePoolingLayer)
            m._din_ops_dice_statistics = dice_statistics
            inside.update(id(x) for x in m.local_att.modules())
    for name, m in model.named_modules():
        if id(m) in inside:
            continue
        if isinstance(m, LAU):
            try:
                _check_lau(m)
            except Unsupported as e:
                handle(strict, e, name or type(m).__name__)
                continue
            swap_class(m, _FusedLocalActivationUnit)
            inside.update(id(x) for x in m.modules())
    for name, m in model.named_modules():
        if id(m) not in inside and isinstance(m, Dice):
            swap_class(m, _FusedDice)
    return model
