"""Modules that hold DIN's parameters and call the functional ops."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .ops.attention_pooling import attention_pooling, check_attention_pooling_config
from .ops.dice import check_dice_config, dice
from .ops.embedding_attention_pooling import embedding_attention_pooling

__all__ = ["AttentionPooling", "Dice", "EmbeddingAttentionPooling"]


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
        weights, biases, kwargs = self._unit()
        return attention_pooling(
            query, keys, weights, biases, lengths=lengths, offsets=offsets, activation=self.activation,
            normalization=self.normalization, scale=self.scale, return_weights=return_weights, **kwargs)

    def _unit(self):
        """The unit's parameters as the functional ops take them: weights, biases, options."""
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
        return weights, biases, kwargs

    def extra_repr(self) -> str:
        hidden = [l.out_features for l in self.layers]
        return (f"embed_dim={self.embed_dim}, hidden_units={tuple(hidden)}, activation={self.activation!r}, "
                f"normalization={self.normalization!r}, scale={self.scale}")


class _DenseGrad(torch.autograd.Function):
    """Identity whose backward densifies the gradient: for ``nn.Embedding(sparse=False)``."""

    @staticmethod
    def forward(ctx, weight):
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        return grad.to_dense() if grad.is_sparse else grad


class EmbeddingAttentionPooling(nn.Module):
    """The history's embedding lookups fused into attention pooling
    (:func:`din_ops.embedding_attention_pooling`, SPEC section 4): ids in, interest out.

    Args:
        embeddings: the ``nn.Embedding`` modules whose rows, concatenated, form a behaviour's key
            (item, category, shop, ...). They are held by reference, not as submodules: they
            belong to the module that owns them (usually shared with the candidate's own lookup),
            so this module's ``state_dict``, ``.to()`` and ``parameters()`` cover the attention
            only. Each one's ``padding_idx`` gets no gradient; ``sparse=True`` tables get a sparse
            COO gradient (coalesced), ``sparse=False`` ones a dense gradient. ``max_norm`` and
            ``scale_grad_by_freq`` are not supported.
        attention: the :class:`AttentionPooling` of width ``sum(e.embedding_dim)`` (a submodule;
            pass an existing one to share it). None builds one from ``attention_kwargs``.

    ``forward(query, ids, lengths=None, offsets=None, return_weights=False)``: ``query [B, D]`` or
    ``[B, C, D]``, ``ids`` one index tensor per embedding, padded ``[B, T]`` with ``lengths`` or
    jagged ``[N]`` with ``offsets``. Returns what ``attention(query, keys, ...)`` returns for the
    looked-up keys, which are never stored.
    """

    def __init__(self, embeddings: Sequence[nn.Embedding], attention: Optional[AttentionPooling] = None,
                 **attention_kwargs):
        super().__init__()
        embeddings = tuple(embeddings)
        if not embeddings:
            raise ValueError("embeddings must hold at least one nn.Embedding")
        for i, e in enumerate(embeddings):
            if not isinstance(e, nn.Embedding):
                raise TypeError(f"embeddings[{i}] must be an nn.Embedding, got {type(e).__name__}")
            if e.max_norm is not None or e.scale_grad_by_freq:
                raise ValueError(f"embeddings[{i}]: max_norm and scale_grad_by_freq are not supported")
        width = sum(e.embedding_dim for e in embeddings)
        if attention is None:
            attention = AttentionPooling(width, **attention_kwargs)
        elif attention_kwargs:
            raise ValueError("pass either an AttentionPooling or its arguments, not both")
        if not isinstance(attention, AttentionPooling):
            raise TypeError(f"attention must be a din_ops.nn.AttentionPooling, got {type(attention).__name__}")
        if attention.embed_dim != width:
            raise ValueError(f"attention.embed_dim ({attention.embed_dim}) must equal the embeddings' total "
                             f"width ({width})")
        object.__setattr__(self, "_embeddings", embeddings)  # references, not submodules
        self.attention = attention

    @property
    def embeddings(self):
        return self._embeddings

    def forward(self, query, ids, lengths: Optional[torch.Tensor] = None, offsets: Optional[torch.Tensor] = None,
                return_weights: bool = False):
        att = self.attention
        weights, biases, kwargs = att._unit()
        tables = [e.weight if e.sparse else _DenseGrad.apply(e.weight) for e in self._embeddings]
        return embedding_attention_pooling(
            query, tables, ids, weights, biases, lengths=lengths, offsets=offsets,
            padding_idx=[e.padding_idx for e in self._embeddings], activation=att.activation,
            normalization=att.normalization, scale=att.scale, return_weights=return_weights, **kwargs)

    def extra_repr(self) -> str:
        return "tables=" + ", ".join(f"{e.num_embeddings}x{e.embedding_dim}" for e in self._embeddings)


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
