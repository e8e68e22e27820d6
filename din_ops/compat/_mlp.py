"""Reads an ``nn.Sequential`` attention MLP (torch-rechub, RecBole) into fused-unit layers."""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

from torch import nn

from ._common import Unsupported, din_ops_dice_stats, plain_activation
from ._unit import Hidden, Stats
from ..nn import Dice as _DinDice


def parse_sequential(seq: nn.Sequential, extra: Optional[Callable] = None,
                     output_in_seq: bool = True) -> Tuple[List[Hidden], Optional[nn.Linear]]:
    """``[Dropout] Linear [BatchNorm1d] [activation] [Dropout]`` blocks, then (optionally) ``Linear(H, 1)``.

    ``extra(module, linear)`` recognizes library-specific activations: returns a :class:`Hidden`
    or ``None``. Returns the hidden layers and the output layer (``None`` when
    ``output_in_seq=False``: the caller holds it).
    """
    blocks = []  # [linear, bn, act, has_act]
    for m in seq:
        if isinstance(m, nn.Linear):
            blocks.append([m, None, None, False])
        elif isinstance(m, nn.Dropout):
            continue
        elif not blocks:
            raise Unsupported(f"{type(m).__name__} before the first linear layer")
        elif isinstance(m, nn.BatchNorm1d):
            if blocks[-1][1] is not None or blocks[-1][3]:
                raise Unsupported("BatchNorm1d after the activation")
            blocks[-1][1] = m
        else:
            if blocks[-1][3]:
                raise Unsupported("two activations after one linear layer")
            blocks[-1][2], blocks[-1][3] = m, True
    out = None
    if output_in_seq:
        if not blocks or blocks[-1][1] is not None or blocks[-1][3]:
            raise Unsupported("the MLP must end with its output layer Linear(H, 1)")
        out = blocks.pop()[0]
        if out.out_features != 1:
            raise Unsupported("the output layer must have one unit")
    hidden = []
    for lin, bn, act, _ in blocks:
        bn_stats = Stats.of_batchnorm(bn) if bn is not None else None
        h = extra(act, lin) if extra is not None else None
        if h is None:
            if isinstance(act, _DinDice):
                h = Hidden(lin.weight, lin.bias, "dice", act.alpha, dice=din_ops_dice_stats(act))
            else:
                plain = plain_activation(act, lin.weight)
                if plain is None:
                    raise Unsupported(f"activation {type(act).__name__}")
                name, alpha = plain
                h = Hidden(lin.weight, lin.bias, name, alpha)
        h.bn = bn_stats
        hidden.append(h)
    if len({h.activation for h in hidden}) > 1:
        raise Unsupported("hidden layers with different activations")
    return hidden, out
