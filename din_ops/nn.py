"""Modules that hold DIN's parameters and call the functional ops."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .ops.attention_pooling import attention_pooling, check_attention_pooling_config
from .ops.dice import check_dice_config, dice

__all__ = ["AttentionPooling", "Dice"]


class AttentionPooling(nn.Module):
    """DIN's local activation unit + weighted sum pooling (paper eq. 1.2) as one fused op.

    Holds the attention MLP as ``nn.Linear`` layers over ``[q, k, q - k, q * k]`` (width
    ``4 * embed_dim``), ``hidden_units`` hidden layers each followed by ``activation``, and a
    ``[1, H_last]`` output layer. ``activation="prelu"`` adds one ``nn.PReLU(H_i)`` per layer;
    ``activation="dice"`` one :class:`Dice` per layer whose statistics are taken over the valid
    positions only (and running statistics in eval mode).

    ``forward(query, keys, lengths=None, offsets=None, return_weights=False)``: ``query [B, D]``
    (or ``[B, C, D]`` for C candidates per user), keys ``[B, T, D]`` with ``lengths`` or jagged
    ``[N, D]`` with ``offsets``. Returns ``[B, D]`` (``[B, C, D]``).
    """

    def __init__(
        self,
        embed_dim: int,
        hidden_units: Sequence[int] = (80, 40),
        activation: str = "sigmoid",
        normalization: str = "none",
        scale: float = 1.0,
        dice_affine: bool = False,
        dice_eps: float = 1e-8,
        dice_momentum: float = 0.1,
        device=None,
        dtype=None,
    ):
        super().__init__()
        check_attention_pooling_config(embed_dim, hidden_units, activation, normalization, scale, dice_eps,
                                       dice_momentum)
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.activation = activation
        self.normalization = normalization
        self.scale = scale
        dims = [4 * embed_dim] + list(hidden_units)
        self.layers = nn.ModuleList(nn.Linear(dims[i], dims[i + 1], **factory) for i in range(len(hidden_units)))
        self.output = nn.Linear(dims[-1], 1, **factory)
        self.prelu = None
        self.dice = None
        if activation == "prelu":
            self.prelu = nn.ModuleList(nn.PReLU(h, **factory) for h in hidden_units)
        elif activation == "dice":
            from .nn import Dice

            self.dice = nn.ModuleList(
                Dice(h, affine=dice_affine, eps=dice_eps, momentum=dice_momentum, **factory) for h in hidden_units)

    def _mlp(self):
        weights = [l.weight for l in self.layers] + [self.output.weight]
        biases = [l.bias for l in self.layers] + [self.output.bias]
        return weights, biases

    def forward(self, query, keys, lengths: Optional[torch.Tensor] = None, offsets: Optional[torch.Tensor] = None,
                return_weights: bool = False):
        weights, biases = self._mlp()
        kwargs = {}
        if self.prelu is not None:
            kwargs["prelu_weights"] = [p.weight for p in self.prelu]
        if self.dice is not None:
            d0 = self.dice[0] if len(self.dice) else None
            kwargs.update(
                dice_alpha=[d.alpha for d in self.dice],
                dice_running_mean=[d.running_mean for d in self.dice],
                dice_running_var=[d.running_var for d in self.dice],
                dice_gamma=[d.gamma for d in self.dice] if d0 is not None and d0.affine else None,
                dice_beta=[d.beta for d in self.dice] if d0 is not None and d0.affine else None,
                training=self.training,
                momentum=d0.momentum if d0 is not None else 0.1,
                eps=d0.eps if d0 is not None else 1e-8,
            )
        return attention_pooling(
            query, keys, weights, biases, lengths=lengths, offsets=offsets, activation=self.activation,
            normalization=self.normalization, scale=self.scale, return_weights=return_weights, **kwargs)

    def extra_repr(self) -> str:
        hidden = [l.out_features for l in self.layers]
        return (f"embed_dim={self.embed_dim}, hidden_units={tuple(hidden)}, activation={self.activation!r}, "
                f"normalization={self.normalization!r}, scale={self.scale}")


class Dice(nn.Module):
    """Dice (paper section 2.2) with statistics over the valid rows only (:func:`din_ops.dice`).

    ``alpha`` starts at 0; with ``affine=True`` a ``gamma`` (ones) and ``beta`` (zeros) are applied
    to the normalized value before the sigmoid (DeepCTR-Torch's ``BatchNorm1d(affine=True)``).
    ``running_mean`` (zeros) and ``running_var`` (ones) are updated in training like
    ``BatchNorm1d`` and used in eval mode.

    ``forward(x, lengths=None, offsets=None)``: ``x [N, C]``, ``[B, T, C]`` with ``lengths``, or
    jagged ``[N, C]`` with ``offsets``; returns ``y`` shaped like ``x``.
    """

    def __init__(self, num_features: int, affine: bool = False, eps: float = 1e-8, momentum: float = 0.1,
                 device=None, dtype=None):
        super().__init__()
        check_dice_config(num_features, eps, momentum)
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.affine = affine
        self.eps = eps
        self.momentum = momentum
        self.alpha = nn.Parameter(torch.zeros(num_features, **factory))
        if affine:
            self.gamma = nn.Parameter(torch.ones(num_features, **factory))
            self.beta = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("gamma", None)
            self.register_parameter("beta", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None,
                offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
        return dice(x, self.alpha, self.running_mean, self.running_var, lengths=lengths, offsets=offsets,
                    gamma=self.gamma, beta=self.beta, training=self.training, momentum=self.momentum, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, affine={self.affine}, eps={self.eps}, momentum={self.momentum}"
