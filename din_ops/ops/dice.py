"""SPEC section 2: Dice with per-channel statistics over the valid rows only.

The ops ``din_ops::dice`` and ``din_ops::dice_backward`` (schemas in csrc/din_ops.cpp) compute
``f(s) = p(s) s + (1 - p(s)) alpha s`` with ``p(s) = sigmoid(gamma (s - E) / sqrt(Var + eps) + beta)``
per channel, ``E``/``Var`` being the batch mean and biased variance over the valid rows
(training) or the running statistics (eval). Kernels: csrc/cpu/dice.cpp (CPU) and
din_ops/triton/dice.py (CUDA). This module holds the input checks, the fake kernels, the
autograd formula and the public function. The ground truth is ``din_ops.reference.dice``.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Optional

import torch

from .. import _library as lib
from .. import reference

_ops = torch.ops.din_ops


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_dice_config(num_features, eps, momentum):
    """Constructor arguments of :class:`din_ops.nn.Dice`."""
    if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral):
        raise TypeError(f"num_features must be an int, got {type(num_features).__name__}")
    if num_features < 1:
        raise ValueError(f"num_features must be >= 1, got {num_features}")
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    if not isinstance(momentum, numbers.Real) or isinstance(momentum, bool) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")


def check_dice_args(x, lengths, alpha, gamma, beta, running_mean, running_var, training, eps):
    """Validates the arguments of ``din_ops::dice`` and names the bad one. Returns ``C``."""
    lib.check_tensor(x, "x", dims=(2, 3), floating=True)
    dtype, device = x.dtype, x.device
    C = x.shape[-1]
    for name, t in (("alpha", alpha), ("gamma", gamma), ("beta", beta)):
        if t is None and name != "alpha":
            continue
        lib.check_tensor(t, name, dims=1, dtype=dtype, device=device)
        if t.shape[0] != C:
            raise ValueError(f"{name} must have shape [{C}] (one value per channel of x), got {tuple(t.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both left None)")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is None:
            continue
        lib.check_tensor(t, name, dims=1, device=device, floating=True)
        if t.dtype not in (dtype, _acc_dtype(dtype)):
            raise ValueError(f"{name} must have dtype {dtype} or {_acc_dtype(dtype)} (x is {dtype}), got {t.dtype}")
        if t.shape[0] != C:
            raise ValueError(f"{name} must have shape [{C}] (one value per channel of x), got {tuple(t.shape)}")
    if not training and running_mean is None:
        raise ValueError("dice in eval mode (training=False) needs running_mean and running_var")
    if lengths is not None:
        if x.dim() != 3:
            raise ValueError("lengths is for padded x [B, T, C]; x [N, C] has every row valid (or use offsets)")
        lib.check_lengths(lengths, x.shape[0], x.shape[1], device)
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    return C


# --- fake kernels ----------------------------------------------------------------------------
@torch.library.register_fake("din_ops::dice")
def _dice_fake(x, lengths, alpha, gamma, beta, running_mean, running_var, training, eps):
    acc = _acc_dtype(x.dtype)
    C = x.shape[-1]
    return x.new_empty(x.shape), x.new_empty((C,), dtype=acc), x.new_empty((C,), dtype=acc)


@torch.library.register_fake("din_ops::dice_backward")
def _dice_backward_fake(grad_y, x, lengths, alpha, gamma, beta, mean, var, training, eps):
    C = x.shape[-1]
    return (x.new_empty(x.shape), alpha.new_empty(alpha.shape),
            gamma.new_empty(gamma.shape) if gamma is not None else alpha.new_empty((C,)),
            beta.new_empty(beta.shape) if beta is not None else alpha.new_empty((C,)))


# --- autograd --------------------------------------------------------------------------------
def _setup_dice(ctx, inputs, output):
    x, lengths, alpha, gamma, beta, running_mean, running_var, training, eps = inputs
    _, mean, var = output
    ctx.save_for_backward(x, lengths, alpha, gamma, beta, mean, var)
    ctx.training, ctx.eps = training, eps
    # the statistics feed the running update only; they carry no gradient
    ctx.mark_non_differentiable(mean, var)


def _reference_dice(lengths, training, eps, mean, var, x, alpha, gamma, beta):
    """The op's forward as plain torch ops (reference.py) at the kernels' accumulation precision."""
    acc = _acc_dtype(x.dtype)
    up = lambda t: None if t is None else t.to(acc)  # noqa: E731
    stats = (None, None) if training else (mean, var)  # eval: the running statistics, as the op saw them
    return (reference.dice(x.to(acc), up(alpha), *stats, lengths=lengths, gamma=up(gamma), beta=up(beta),
                           training=training, eps=eps),)


def _backward_dice(ctx, grad_y, grad_mean, grad_var):
    x, lengths, alpha, gamma, beta, mean, var = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: gradients with a graph, exact to any order
        dx, dalpha, dgamma, dbeta = lib.vjp_with_graph(
            functools.partial(_reference_dice, lengths, ctx.training, ctx.eps, mean, var),
            (x, alpha, gamma, beta), (grad_y,))
        return dx, None, dalpha, dgamma, dbeta, None, None, None, None
    if grad_y is None:
        grad_y = torch.zeros_like(x)
    with lib.below_autograd():
        dx, dalpha, dgamma, dbeta = _ops.dice_backward(
            grad_y.contiguous(), x, lengths, alpha, gamma, beta, mean, var, ctx.training, ctx.eps)
    return (dx, None, dalpha, dgamma if gamma is not None else None,
            dbeta if beta is not None else None, None, None, None, None)


torch.library.register_autograd("din_ops::dice", _backward_dice, setup_context=_setup_dice)
lib.register_not_differentiable("dice_backward")


# --- autocast --------------------------------------------------------------------------------
def _to_like(t, x):
    if isinstance(t, torch.Tensor) and isinstance(x, torch.Tensor) and t.is_floating_point() \
            and x.is_floating_point() and t.dtype != x.dtype:
        return t.to(x.dtype)
    return t


def _autocast_dice_args(args, device_type):
    """alpha, gamma and beta in x's dtype; x and the running statistics as they are."""
    x = args[0]
    return (x, args[1], *(_to_like(t, x) for t in args[2:5]), *args[5:])


lib.register_autocast("dice", _autocast_dice_args)


# --- public function ---------------------------------------------------------------------------
def _valid_count(x, lengths, dtype):
    """Number of valid rows as a 0-d tensor on x's device (no host synchronization)."""
    if lengths is not None:
        return lengths.sum().to(dtype)
    rows = x.shape[0] if x.dim() == 2 else x.shape[0] * x.shape[1]
    return torch.full((), rows, dtype=dtype, device=x.device)


def dice(
    x: torch.Tensor,
    alpha: torch.Tensor,
    running_mean: Optional[torch.Tensor] = None,
    running_var: Optional[torch.Tensor] = None,
    *,
    lengths: Optional[torch.Tensor] = None,
    offsets: Optional[torch.Tensor] = None,
    gamma: Optional[torch.Tensor] = None,
    beta: Optional[torch.Tensor] = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Dice (paper section 2.2) with statistics over the valid rows only (SPEC section 2).

    ``f(s) = p(s) s + (1 - p(s)) alpha s``, ``p(s) = sigmoid(gamma (s - E[s]) / sqrt(Var[s] + eps) + beta)``
    per channel (the last dimension of ``x``).

    Args:
        x: ``[N, C]`` (every row valid), ``[B, T, C]`` with ``lengths [B]`` (int32/int64; row
            ``b`` owns positions ``t < lengths[b]``, ``None`` means all valid), or jagged
            ``[N, C]`` with ``offsets [B + 1]``. Jagged rows are all valid: ``offsets`` is
            validated (starts at 0, non-decreasing, ends at N) and otherwise only names the rows,
            so the result is the same as without it. fp32/fp64/fp16/bf16.
        alpha: ``[C]``, x's dtype (``Dice`` initializes it to 0).
        running_mean, running_var: ``[C]`` buffers (x's dtype or float32, float64 for float64
            x), updated in place in training like ``torch.nn.BatchNorm1d``:
            ``r <- (1 - momentum) r + momentum * batch`` with the unbiased batch variance.
            Required in eval mode, optional in training.
        gamma, beta: optional ``[C]`` affine weight and bias, applied to the normalized value
            before the sigmoid (DeepCTR-Torch's ``BatchNorm1d(affine=True)``).
        training: batch statistics (True) or the running statistics (False, pointwise).
        momentum: running-statistics momentum, in [0, 1].
        eps: added to the variance, > 0 (the paper's 1e-8 by default).

    Returns ``y`` shaped like ``x`` in x's dtype. Second-order gradients (a backward with
    ``create_graph=True``) are exact, through the batch statistics too: that backward
    differentiates ``din_ops.reference.dice`` instead of running the fused kernel.

    Choices where SPEC is silent:
        * Statistics are taken over the valid rows only; padded positions of ``[B, T, C]`` are
          transformed with the same statistics but never enter them, and their gradient holds
          only the pointwise term (the gradient through the statistics reaches valid rows
          only, including the contributions of the padded outputs).
        * Zero valid rows: the statistics are mean 0 and variance 0 (so ``p = sigmoid(gamma x /
          sqrt(eps) + beta)``), the gradient through them is 0, and the running statistics are
          not updated. One valid row: variance 0, so its normalized value is exactly 0 and
          ``p = sigmoid(beta)``; the running variance moves toward 0 (the unbiased variance of
          one sample is taken as 0, not NaN).
        * Statistics and the transform accumulate in float32 (float64 for float64 x); ``y`` is
          rounded to x's dtype once.
        * Under ``torch.autocast`` Dice follows ``BatchNorm1d``: it runs in x's dtype (bf16 when
          the layer before it ran in bf16), with ``alpha``/``gamma``/``beta`` cast to it and the
          statistics in float32; x itself is not cast.
        * The valid-row count for the running update is computed on the device (no host
          synchronization). The value checks of ``lengths``/``offsets`` read CPU tensors on the
          host; on CUDA tensors they are device-side asserts (no synchronization) or skipped, as
          :func:`din_ops.set_cuda_value_checks` says; under ``torch.compile`` they are skipped.
        * NaN and inf propagate as in the reference (``p x + (1 - p) alpha x`` is NaN at
          ``x = +-inf``). A NaN or inf in padding never enters the statistics, so only that
          position's output is non-finite; its gradient flows like any padded output's (into
          alpha, gamma, beta and, in training, through the statistics into the valid rows).
    """
    cast = lib.autocast_dtype(x.device.type) if isinstance(x, torch.Tensor) else None
    if cast is not None:  # autocast: like BatchNorm, Dice runs in x's dtype (SPEC, policies)
        alpha, gamma, beta = (_to_like(t, x) for t in (alpha, gamma, beta))
    if not isinstance(momentum, (int, float)) or not (0.0 <= momentum <= 1.0):
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
    if offsets is not None:
        lib.check_tensor(x, "x", dims=(2, 3), floating=True)
        if x.dim() != 2:
            raise ValueError(f"offsets is for jagged x [N, C]; padded x [B, T, C] takes lengths, got shape {tuple(x.shape)}")
        if lengths is not None:
            raise ValueError("pass either lengths (padded x [B, T, C]) or offsets (jagged x [N, C]), not both")
        lib.check_offsets(offsets, None, x.shape[0], x.device)
    check_dice_args(x, lengths, alpha, gamma, beta, running_mean, running_var, training, eps)
    eps = float(eps)
    if training:
        y, mean, var = _ops.dice(x, lengths, alpha, gamma, beta, None, None, True, eps)
        if running_mean is not None:
            n = _valid_count(x, lengths, mean.dtype)
            lib.update_running_stats(running_mean, running_var, mean.detach(), var.detach(), n, momentum)
    else:
        y, _, _ = _ops.dice(x, lengths, alpha, gamma, beta, running_mean, running_var, False, eps)
    return y
