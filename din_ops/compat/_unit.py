"""Run another library's local activation unit through the fused ``attention_pooling`` op.

The adapters describe a unit as a list of :class:`Hidden` layers (``nn.Linear`` weights, an
optional ``BatchNorm1d`` between the linear layer and the activation, the activation) plus the
``[1, H]`` output layer, and call :func:`run_unit`. Two things the public
:func:`din_ops.attention_pooling` does not do are needed to reproduce other libraries exactly:

- **BatchNorm inside the unit** (torch-rechub, DeepCTR-Torch's ``use_bn``): a batch-normalized
  linear layer is a linear layer with per-channel scale and shift, so it is folded into the
  weights: ``W' = diag(s) W``, ``b' = s * (b - mean) + beta`` with ``s = gamma / sqrt(var + eps)``.
  In training, ``mean``/``var`` are the batch statistics of that layer's pre-activation, which
  ``din_ops::attention_pooling_stats`` computes without materializing anything ``[N, H]`` (and
  differentiates), so gradients reach ``W``, ``b``, ``gamma``, ``beta`` exactly as through
  ``BatchNorm1d``; in eval mode the running statistics are used.
- **Statistics over other positions than the pooling** (DeepCTR-Torch's Dice normalizes over
  every padded position, padding included, while the pooling masks it): the Dice statistics are
  taken over ``stats_rows`` and the pooling over the real rows.

Running statistics are updated like ``BatchNorm1d`` (momentum, or the cumulative average when
``momentum is None``; unbiased variance; ``num_batches_tracked``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from ..ops.attention_pooling import check_attention_pooling_args, optional_lists

_ops = torch.ops.din_ops


@dataclass
class Stats:
    """Where a layer's normalization statistics come from (a ``BatchNorm1d`` or a Dice)."""

    running_mean: Optional[torch.Tensor]
    running_var: Optional[torch.Tensor]
    gamma: Optional[torch.Tensor] = None
    beta: Optional[torch.Tensor] = None
    eps: float = 1e-5
    momentum: Optional[float] = 0.1
    batch: bool = True                      # use (and track) the batch statistics
    owner: Optional[torch.nn.Module] = None  # a BatchNorm whose num_batches_tracked counts steps

    @classmethod
    def of_batchnorm(cls, bn: torch.nn.modules.batchnorm._BatchNorm) -> "Stats":
        return cls(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, bn.momentum,
                   batch=bn.training or not bn.track_running_stats, owner=bn)


@dataclass
class Hidden:
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    activation: str                          # sigmoid relu prelu dice identity
    alpha: Optional[torch.Tensor] = None     # PReLU / Dice alpha, 1-D
    bn: Optional[Stats] = None               # BatchNorm1d between the linear layer and the activation
    dice: Optional[Stats] = None             # the Dice statistics (activation == "dice")


@dataclass
class Rows:
    keys: torch.Tensor
    lengths: Optional[torch.Tensor] = None
    offsets: Optional[torch.Tensor] = None
    count: int = field(default=-1)

    def n(self) -> int:
        if self.count < 0:
            k = self.keys
            if k.dim() == 2:
                self.count = k.shape[0]
            elif self.lengths is None:
                self.count = k.shape[0] * k.shape[1]
            else:
                self.count = int(self.lengths.sum())
        return self.count


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@torch.no_grad()
def _update_running(st: Stats, mean, var, n: int):
    if st.running_mean is None or st.running_var is None or n <= 0:
        return
    factor = st.momentum
    if st.owner is not None and getattr(st.owner, "num_batches_tracked", None) is not None:
        st.owner.num_batches_tracked.add_(1)
        if factor is None:
            factor = 1.0 / float(st.owner.num_batches_tracked)
    if factor is None:
        factor = 0.1
    unbiased = var * (n / (n - 1)) if n > 1 else var
    st.running_mean.mul_(1 - factor).add_(mean.detach().to(st.running_mean.dtype), alpha=factor)
    st.running_var.mul_(1 - factor).add_(unbiased.detach().to(st.running_var.dtype), alpha=factor)


def run_unit(query: torch.Tensor, rows: Rows, hidden: Sequence[Hidden], out_weight: torch.Tensor,
             out_bias: Optional[torch.Tensor], *, normalization: str = "none", scale: float = 1.0,
             stats_rows: Optional[Rows] = None, return_weights: bool = False):
    """``attention_pooling`` of ``query [B, D]`` over ``rows`` with the unit ``hidden`` + output layer.

    ``stats_rows`` (default ``rows``) are the positions every batch statistic (BatchNorm, Dice) is
    taken over. Returns ``out [B, D]`` (and the weights, ``[B, T]`` padded or ``[N]`` jagged).
    """
    stats_rows = stats_rows or rows
    acts = {h.activation for h in hidden}
    if len(acts) > 1:
        raise ValueError(f"every hidden layer must use the same activation, got {sorted(acts)}")
    act = acts.pop() if acts else "identity"
    dtype, device = query.dtype, query.device
    acc = _acc(query)

    def bias_of(h_bias, w):
        return h_bias if h_bias is not None else torch.zeros(w.shape[0], dtype=dtype, device=device)

    dice_eps = {h.dice.eps for h in hidden if h.dice is not None}
    if len(dice_eps) > 1:
        raise ValueError(f"every Dice of the unit must use the same eps, got {sorted(dice_eps)}")
    eps = dice_eps.pop() if dice_eps else 1e-8
    affine = any(h.dice is not None and h.dice.gamma is not None for h in hidden)

    # validate shapes once (placeholder statistics) before any kernel runs
    ws = [h.weight for h in hidden] + [out_weight]
    bs = [bias_of(h.bias, h.weight) for h in hidden] + [bias_of(out_bias, out_weight)]
    alphas = [h.alpha for h in hidden] if act in ("prelu", "dice") else []
    ph = [torch.zeros(h.weight.shape[0], dtype=acc, device=device) for h in hidden] if act == "dice" else []
    phw = [torch.ones(h.weight.shape[0], dtype=dtype, device=device) for h in hidden] if affine else []
    check_attention_pooling_args(query, rows.keys, rows.lengths, rows.offsets, ws, bs, alphas, ph, ph, phw, phw,
                                 act, normalization)
    if stats_rows is not rows:
        check_attention_pooling_args(query, stats_rows.keys, stats_rows.lengths, stats_rows.offsets, ws, bs,
                                     alphas, ph, ph, phw, phw, act, normalization)

    W: List[torch.Tensor] = []
    b: List[torch.Tensor] = []
    means: List[torch.Tensor] = []
    variances: List[torch.Tensor] = []
    gammas: List[torch.Tensor] = []
    betas: List[torch.Tensor] = []

    def stats(weights, biases):
        s = stats_rows
        return _ops.attention_pooling_stats(query, s.keys, s.lengths, s.offsets, weights, biases,
                                            *optional_lists(alphas[:len(weights) - 1], means, variances, gammas,
                                                            betas), act, eps)

    for h in hidden:
        w, bias = h.weight, bias_of(h.bias, h.weight)
        if h.bn is not None:
            st = h.bn
            if st.batch:
                mean, var = stats(W + [w], b + [bias])
                _update_running(st, mean, var, stats_rows.n())
            else:
                mean, var = st.running_mean.to(acc), st.running_var.to(acc)
            s = torch.rsqrt(var + st.eps)
            if st.gamma is not None:
                s = s * st.gamma.to(acc)
            shift = -mean * s
            if st.beta is not None:
                shift = shift + st.beta.to(acc)
            w = (s[:, None] * w.to(acc)).to(dtype)
            bias = (s * bias.to(acc) + shift).to(dtype)
        W.append(w)
        b.append(bias)
        if act == "dice":
            st = h.dice
            if st.batch:
                mean, var = stats(W, b)
                _update_running(st, mean, var, stats_rows.n())
            else:
                mean, var = st.running_mean.to(acc), st.running_var.to(acc)
            means.append(mean)
            variances.append(var)
            if affine:
                gammas.append(st.gamma if st.gamma is not None else torch.ones_like(bias))
                betas.append(st.beta if st.beta is not None else torch.zeros_like(bias))

    out, weights = _ops.attention_pooling(
        query, rows.keys, rows.lengths, rows.offsets, W + [out_weight], b + [bias_of(out_bias, out_weight)],
        *optional_lists(alphas, means, variances, gammas, betas), act, normalization, float(scale), float(eps))
    return (out, weights) if return_weights else out


def jagged_from_mask(keys: torch.Tensor, mask: torch.Tensor) -> Rows:
    """Jagged rows holding the positions of ``keys [B, T, D]`` where ``mask [B, T]`` is true.

    Pooling is a sum over positions, so their order inside a row does not matter; any mask
    (pre-padding, holes) works.
    """
    mask = mask.to(torch.bool)
    counts = mask.sum(1)
    offsets = torch.zeros(keys.shape[0] + 1, dtype=torch.int64, device=keys.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return Rows(keys[mask], offsets=offsets)


def scatter_weights(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Jagged weights ``[N]`` back to ``[B, T]`` (zeros where ``mask`` is false)."""
    full = w.new_zeros(mask.shape)
    full[mask.to(torch.bool)] = w
    return full
