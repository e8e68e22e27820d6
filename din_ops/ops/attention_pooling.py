"""SPEC section 1: the fused local activation unit + weighted sum pooling.

The op ``din_ops::attention_pooling`` (schema in csrc/din_ops.cpp) computes, per row b and
candidate c, scores ``s_t = scale * MLP([q, k_t, q - k_t, q * k_t])`` over the valid positions
and ``out = sum_t w_t k_t`` with ``w = s`` or ``softmax(s)``. Kernels: csrc/cpu/attention_pooling.cpp
(CPU) and din_ops/triton/attention_pooling.py (CUDA); the autograd node is C++ (csrc/autograd.cpp).
This module holds the input checks, the fake kernels, the backward with ``create_graph=True``
(through the reference) and the public function.

Dice inside the unit (``activation="dice"``) in training needs batch statistics of each hidden
layer's pre-activation over the valid positions. ``din_ops::attention_pooling_stats`` computes
them layer by layer (each pass recomputes the MLP below the layer, nothing ``[N, H]`` is stored),
and its own backward carries the gradient through the statistics, so the composition is exact.
With a single valid (position, candidate) pair the stats op returns the variance as -0.0 and the
kernels take that as ``rstd = 0``: the normalized value and every gradient through the statistics
are then exactly 0, as in the reference (h == mean), instead of a rounding residue of the
recomputed pre-activation times 1/sqrt(eps). Running statistics see it as an ordinary 0.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import List, Optional, Sequence

import torch

from .. import _C
from .. import _library as lib
from .. import reference

ACTIVATIONS = ("sigmoid", "relu", "prelu", "dice", "identity")
NORMALIZATIONS = ("none", "softmax")
_ops = torch.ops.din_ops


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


_ALPHA_ARG = {"prelu": "prelu_weights", "dice": "dice_alpha"}


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_tensor_list(value, name: str, optional: bool = True):
    """``value`` is a list/tuple (or another sequence) of tensors; other iterables are left to
    the caller's ``list()``."""
    if value is None and optional:
        return
    if isinstance(value, (torch.Tensor, str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be a list of tensors, got {type(value).__name__}")
    if isinstance(value, (list, tuple)) or (hasattr(value, "__len__") and hasattr(value, "__getitem__")):
        for i, t in enumerate(value):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")


def _check_unit_options(activation, normalization, scale):
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(normalization, str) or normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if not _is_number(scale):
        raise TypeError(f"scale must be a Python float, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")


def check_attention_pooling_options(query, weights, biases, activation, normalization, scale, prelu_weights,
                                    dice_alpha, dice_running_mean, dice_running_var, dice_gamma, dice_beta,
                                    momentum, eps):
    """Checks of the public function's own arguments (types, options, the Dice running statistics)
    before anything is computed from them; shapes of the op's inputs are
    :func:`check_attention_pooling_args`'s."""
    lib.check_tensor(query, "query", dims=(2, 3), floating=True)
    _check_tensor_list(weights, "weights", optional=False)
    _check_tensor_list(biases, "biases", optional=False)
    _check_unit_options(activation, normalization, scale)
    if not _is_number(eps):
        raise TypeError(f"eps must be a Python float, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive finite number, got {eps}")
    if not _is_number(momentum):
        raise TypeError(f"momentum must be a Python float, got {type(momentum).__name__}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
    lists = dict(prelu_weights=prelu_weights, dice_alpha=dice_alpha, dice_running_mean=dice_running_mean,
                 dice_running_var=dice_running_var, dice_gamma=dice_gamma, dice_beta=dice_beta)
    for name, value in lists.items():
        if value is None:
            continue
        wanted = "prelu" if name == "prelu_weights" else "dice"
        if activation != wanted:
            raise ValueError(f"{name} is for activation={wanted!r}, got activation={activation!r}")
        _check_tensor_list(value, name)
    if (dice_running_mean is None) != (dice_running_var is None):
        raise ValueError("dice_running_mean and dice_running_var must be given together (or both left None)")
    if dice_running_mean is None or not isinstance(weights, (list, tuple)):
        return
    hidden = [w.shape[0] if w.dim() == 2 else None for w in weights[:-1]]
    for name, group in (("dice_running_mean", dice_running_mean), ("dice_running_var", dice_running_var)):
        group = list(group)
        if len(group) != len(hidden):
            raise ValueError(f"{name} must hold one tensor per hidden layer ({len(hidden)}), got {len(group)}")
        for i, (t, h) in enumerate(zip(group, hidden)):
            lib.check_tensor(t, f"{name}[{i}]", dims=1, device=query.device, floating=True)
            if h is not None and t.shape[0] != h:
                raise ValueError(f"{name}[{i}] must have shape [{h}], got {tuple(t.shape)}")


def _check_count(v, name: str, minimum: int = 1):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")


def check_attention_pooling_config(embed_dim, hidden_units, activation, normalization, scale, dice_eps,
                                   dice_momentum):
    """Constructor arguments of :class:`din_ops.nn.AttentionPooling`."""
    _check_count(embed_dim, "embed_dim")
    if isinstance(hidden_units, (str, bytes, torch.Tensor)) or not hasattr(hidden_units, "__iter__"):
        raise TypeError(f"hidden_units must be a sequence of ints, got {type(hidden_units).__name__}")
    for i, h in enumerate(hidden_units):
        _check_count(h, f"hidden_units[{i}]")
    _check_unit_options(activation, normalization, scale)
    if not _is_number(dice_eps) or not (math.isfinite(dice_eps) and dice_eps > 0):
        raise ValueError(f"dice_eps must be a positive finite number, got {dice_eps!r}")
    if not _is_number(dice_momentum) or not 0.0 <= dice_momentum <= 1.0:
        raise ValueError(f"dice_momentum must be a number in [0, 1], got {dice_momentum!r}")


def check_attention_pooling_args(query, keys, lengths, offsets, weights, biases, act_weights,
                                 norm_mean, norm_var, norm_weight, norm_bias, activation,
                                 normalization, stats_layer: Optional[int] = None):
    """Validates every argument of the op (shapes, dtypes, devices, values) and names the bad one.

    ``stats_layer`` is set for ``attention_pooling_stats``: then ``weights`` holds hidden layers
    0..stats_layer and no output layer. Returns ``(B, C, D, T_or_N, jagged)``.
    """
    lib.check_tensor(query, "query", dims=(2, 3), floating=True)
    dtype, device = query.dtype, query.device
    B, D = query.shape[0], query.shape[-1]
    C = query.shape[1] if query.dim() == 3 else 1
    lib.check_tensor(keys, "keys", dims=(2, 3), dtype=dtype, device=device)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if keys.dim() == 3:
        if offsets is not None:
            raise ValueError("offsets is for jagged keys [N, D]; padded keys [B, T, D] take lengths")
        if keys.shape[0] != B or keys.shape[2] != D:
            raise ValueError(
                f"keys must have shape [B, T, D] = [{B}, T, {D}] to match query {tuple(query.shape)}, "
                f"got {tuple(keys.shape)}")
        T = keys.shape[1]
        if lengths is not None:
            lib.check_lengths(lengths, B, T, device)
        jagged = False
    else:
        if offsets is None:
            raise ValueError("jagged keys [N, D] need offsets [B + 1] (or pass padded keys [B, T, D])")
        if lengths is not None:
            raise ValueError("lengths is for padded keys [B, T, D]; jagged keys [N, D] take offsets")
        if keys.shape[1] != D:
            raise ValueError(f"keys must have shape [N, {D}] to match query {tuple(query.shape)}, "
                             f"got {tuple(keys.shape)}")
        T = keys.shape[0]
        lib.check_offsets(offsets, B, T, device)
        jagged = True

    if not isinstance(weights, (list, tuple)) or not isinstance(biases, (list, tuple)):
        raise TypeError("weights and biases must be lists of tensors (nn.Linear layout)")
    if len(weights) != len(biases):
        raise ValueError(f"weights and biases must have the same length, got {len(weights)} and {len(biases)}")
    n_layers = len(weights)
    if n_layers == 0:
        raise ValueError("weights must hold at least the output layer [1, H]")
    n_hidden = n_layers if stats_layer is not None else n_layers - 1
    if n_hidden > 8:
        raise ValueError(f"at most 8 hidden layers are supported, got {n_hidden}")
    fan_in = 4 * D
    for i, (w, b) in enumerate(zip(weights, biases)):
        lib.check_tensor(w, f"weights[{i}]", dims=2, dtype=dtype, device=device)
        lib.check_tensor(b, f"biases[{i}]", dims=1, dtype=dtype, device=device)
        out_f = w.shape[0]
        if w.shape[1] != fan_in:
            raise ValueError(f"weights[{i}] must have shape [H, {fan_in}] (its input width), got {tuple(w.shape)}")
        if i == n_layers - 1 and stats_layer is None and out_f != 1:
            raise ValueError(f"weights[{i}] is the output layer and must have shape [1, {fan_in}], got {tuple(w.shape)}")
        if out_f == 0:
            raise ValueError(f"weights[{i}] must have at least one output unit")
        if b.shape[0] != out_f:
            raise ValueError(f"biases[{i}] must have shape [{out_f}], got {tuple(b.shape)}")
        fan_in = out_f

    hidden = [w.shape[0] for w in weights[:n_hidden]]
    if activation in ("prelu", "dice"):
        arg = _ALPHA_ARG[activation]  # the public function's argument
        if len(act_weights) != n_hidden:
            raise ValueError(f"{activation} needs one alpha per hidden layer ({n_hidden}) in {arg}, "
                             f"got {len(act_weights)}")
        for i, a in enumerate(act_weights):
            name = f"{activation} alpha[{i}] ({arg}[{i}])"
            lib.check_tensor(a, name, dims=1, dtype=dtype, device=device)
            if a.shape[0] not in ((1, hidden[i]) if activation == "prelu" else (hidden[i],)):
                raise ValueError(f"{name} must have shape [{hidden[i]}], got {tuple(a.shape)}")
    elif len(act_weights):
        raise ValueError(f"activation {activation!r} takes no alpha parameters")
    n_norm = len(norm_mean)
    if activation == "dice":
        expected = stats_layer if stats_layer is not None else n_hidden
        if n_norm != expected or len(norm_var) != expected:
            raise ValueError(f"dice needs a mean and a variance per hidden layer ({expected}), "
                             f"got {n_norm} and {len(norm_var)}")
        acc = _acc_dtype(dtype)
        for name, group in (("dice_running_mean", norm_mean), ("dice_running_var", norm_var)):
            for i, t in enumerate(group):
                lib.check_tensor(t, f"{name}[{i}]", dims=1, dtype=acc, device=device)
                if t.shape[0] != hidden[i]:
                    raise ValueError(f"{name}[{i}] must have shape [{hidden[i]}], got {tuple(t.shape)}")
        for name, group in (("dice_gamma", norm_weight), ("dice_beta", norm_bias)):
            if len(group) not in (0, expected):
                raise ValueError(f"{name} must be empty or hold one tensor per hidden layer ({expected})")
            for i, t in enumerate(group):
                lib.check_tensor(t, f"{name}[{i}]", dims=1, dtype=dtype, device=device)
                if t.shape[0] != hidden[i]:
                    raise ValueError(f"{name}[{i}] must have shape [{hidden[i]}], got {tuple(t.shape)}")
    elif n_norm or len(norm_var) or len(norm_weight) or len(norm_bias):
        raise ValueError(f"activation {activation!r} takes no dice statistics "
                         "(dice_running_mean, dice_running_var, dice_gamma, dice_beta)")
    return B, C, D, T, jagged


# --- fake kernels ----------------------------------------------------------------------------
def _attn_shape(query, keys, jagged):
    B = query.shape[0]
    if query.dim() == 2:
        return (keys.shape[0],) if jagged else (B, keys.shape[1])
    C = query.shape[1]
    return (keys.shape[0], C) if jagged else (B, C, keys.shape[1])


@torch.library.register_fake("din_ops::attention_pooling")
def _attention_pooling_fake(query, keys, lengths, offsets, weights, biases, act_weights, norm_mean,
                            norm_var, norm_weight, norm_bias, activation, normalization, scale, eps):
    jagged = keys.dim() == 2
    return query.new_empty(query.shape), query.new_empty(_attn_shape(query, keys, jagged))


def _like(ts):
    return [torch.empty_like(t) for t in ts]


@torch.library.register_fake("din_ops::attention_pooling_backward")
def _attention_pooling_backward_fake(grad_out, grad_attn, attn, query, keys, lengths, offsets, weights,
                                     biases, act_weights, norm_mean, norm_var, norm_weight, norm_bias,
                                     activation, normalization, scale, eps):
    return (torch.empty_like(query), torch.empty_like(keys), _like(weights), _like(biases),
            _like(act_weights), _like(norm_mean), _like(norm_var), _like(norm_weight), _like(norm_bias))


@torch.library.register_fake("din_ops::attention_pooling_stats")
def _attention_pooling_stats_fake(query, keys, lengths, offsets, weights, biases, act_weights, norm_mean,
                                  norm_var, norm_weight, norm_bias, activation, eps):
    H = weights[-1].shape[0]
    acc = _acc_dtype(query.dtype)
    return query.new_empty((H,), dtype=acc), query.new_empty((H,), dtype=acc)


@torch.library.register_fake("din_ops::attention_pooling_stats_backward")
def _attention_pooling_stats_backward_fake(grad_mean, grad_var, mean, query, keys, lengths, offsets,
                                           weights, biases, act_weights, norm_mean, norm_var,
                                           norm_weight, norm_bias, activation, eps):
    return (torch.empty_like(query), torch.empty_like(keys), _like(weights), _like(biases),
            _like(act_weights), _like(norm_mean), _like(norm_var), _like(norm_weight), _like(norm_bias))


# --- autograd --------------------------------------------------------------------------------
# The autograd kernels are C++ (csrc/autograd.cpp): the backward node calls the fused backward
# op. A backward with create_graph=True calls the functions below, which differentiate the
# reference computation so the gradients carry a graph (exact to any order).
def _upcast(ts, dtype):
    return [t.to(dtype) for t in ts]


def _split(flat, sizes):
    out, at = [], 0
    for n in sizes:
        out.append(list(flat[at:at + n]))
        at += n
    return out


def _reference_pooling(lengths, offsets, activation, normalization, scale, eps, query, keys, weights,
                       biases, act_weights, norm_mean, norm_var, norm_weight, norm_bias):
    """The op's forward as plain torch ops (reference.py) at the kernels' accumulation precision.
    Dice statistics are inputs of the op: the reference's eval mode with them as running stats."""
    acc = _acc_dtype(query.dtype)
    act = _upcast(act_weights, acc)
    return reference.attention_pooling(
        query.to(acc), keys.to(acc), _upcast(weights, acc), _upcast(biases, acc), lengths=lengths,
        offsets=offsets, activation=activation, normalization=normalization, scale=scale,
        prelu_weights=act, dice_alpha=act, dice_running_mean=_upcast(norm_mean, acc),
        dice_running_var=_upcast(norm_var, acc), dice_gamma=_upcast(norm_weight, acc) or None,
        dice_beta=_upcast(norm_bias, acc) or None, training=False, eps=eps, return_weights=True)


def _graph_backward_pooling(tensors, sizes, strs, nums):
    grad_out, grad_attn, query, keys, lengths, offsets, *flat = tensors
    (activation, normalization), (scale, eps) = strs, nums
    grads = lib.vjp_with_graph(
        functools.partial(_reference_pooling, lengths, offsets, activation, normalization, scale, eps),
        (query, keys, *_split(flat, sizes)), (grad_out, grad_attn))
    return [grads[0], grads[1], *(g for group in grads[2:] for g in group)]


def _reference_stats(lengths, offsets, activation, eps, query, keys, weights, biases, act_weights,
                     norm_mean, norm_var, norm_weight, norm_bias):
    acc = _acc_dtype(query.dtype)
    act = _upcast(act_weights, acc)
    return reference.attention_pooling_stats(
        query.to(acc), keys.to(acc), _upcast(weights, acc), _upcast(biases, acc), lengths=lengths,
        offsets=offsets, activation=activation, prelu_weights=act, dice_alpha=act,
        dice_mean=_upcast(norm_mean, acc), dice_var=_upcast(norm_var, acc),
        dice_gamma=_upcast(norm_weight, acc) or None, dice_beta=_upcast(norm_bias, acc) or None, eps=eps)


def _graph_backward_stats(tensors, sizes, strs, nums):
    grad_mean, grad_var, query, keys, lengths, offsets, *flat = tensors
    (activation,), (eps,) = strs, nums
    grads = lib.vjp_with_graph(functools.partial(_reference_stats, lengths, offsets, activation, eps),
                               (query, keys, *_split(flat, sizes)), (grad_mean, grad_var))
    return [grads[0], grads[1], *(g for group in grads[2:] for g in group)]


lib.register_graph_backward("attention_pooling", _graph_backward_pooling)
lib.register_graph_backward("attention_pooling_stats", _graph_backward_stats)
lib.register_not_differentiable("attention_pooling_backward")
lib.register_not_differentiable("attention_pooling_stats_backward")


def optional_lists(*lists):
    """The lists of the forward ops that may be empty (``Tensor[]?`` in the schema), None when
    empty: AOTInductor's proxy executor passes an empty ``Tensor[]`` to the kernel as None,
    while None for a ``Tensor[]?`` is what it means."""
    return [list(x) if len(x) else None for x in lists]


# --- public function ---------------------------------------------------------------------------
def _valid_count(keys, lengths, C):
    """Number of valid (position, candidate) pairs as a device scalar (a fill, not a host copy:
    no synchronization)."""
    if keys.dim() == 2:
        n = keys.shape[0]
        return torch.full((), float(n * C), device=keys.device)
    if lengths is None:
        return torch.full((), float(keys.shape[0] * keys.shape[1] * C), device=keys.device)
    return lengths.sum().to(torch.float64) * C


def unit_lists(query, keys, lengths, offsets, weights, biases, activation, normalization, prelu_weights,
               dice_alpha, dice_running_mean, dice_running_var, dice_gamma, dice_beta, training, momentum, eps,
               stats, before_kernels=None):
    """The forward ops' lists ``(act_weights, norm_mean, norm_var, norm_weight, norm_bias)`` from the
    public functions' arguments, every argument checked first (``keys`` may be a stand-in of the
    right shape). Dice in training takes each hidden layer's batch statistics from
    ``stats(weights[:l+1], biases[:l+1], *lists of the layers below)`` and updates the running
    statistics in place. ``before_kernels()`` runs once the arguments are checked, before any
    kernel (more value checks)."""
    n_hidden = len(weights) - 1
    act_weights: List[torch.Tensor] = []
    norm_mean: List[torch.Tensor] = []
    norm_var: List[torch.Tensor] = []
    norm_weight: List[torch.Tensor] = list(dice_gamma) if dice_gamma is not None else []
    norm_bias: List[torch.Tensor] = list(dice_beta) if dice_beta is not None else []
    if activation == "prelu":
        if prelu_weights is None:
            raise ValueError("activation='prelu' needs prelu_weights (one alpha tensor per hidden layer)")
        act_weights = list(prelu_weights)
    elif activation == "dice":
        if dice_alpha is None:
            raise ValueError("activation='dice' needs dice_alpha (one [H_i] tensor per hidden layer)")
        act_weights = list(dice_alpha)
        if not training and (dice_running_mean is None or dice_running_var is None):
            raise ValueError("activation='dice' in eval mode needs dice_running_mean and dice_running_var")
    acc = _acc_dtype(query.dtype)

    if activation == "dice" and training:
        # validate once with placeholder statistics, then build them layer by layer
        placeholder = [torch.zeros(w.shape[0], dtype=acc, device=query.device) for w in weights[:n_hidden]]
        _, C, _, _, _ = check_attention_pooling_args(
            query, keys, lengths, offsets, weights, biases, act_weights, placeholder, placeholder,
            norm_weight, norm_bias, activation, normalization)
        if before_kernels is not None:
            before_kernels()
        for layer in range(n_hidden):
            mean, var = stats(weights[: layer + 1], biases[: layer + 1],
                              *optional_lists(act_weights[:layer], norm_mean, norm_var, norm_weight[:layer],
                                              norm_bias[:layer]))
            norm_mean.append(mean)
            norm_var.append(var)
        if dice_running_mean is not None and dice_running_var is not None and n_hidden:
            n = _valid_count(keys, lengths, C)
            for rm, rv, mean, var in zip(dice_running_mean, dice_running_var, norm_mean, norm_var):
                lib.update_running_stats(rm, rv, mean.detach(), var.detach(), n, momentum)
    else:
        if activation == "dice":
            norm_mean = [t.to(acc) for t in dice_running_mean]
            norm_var = [t.to(acc) for t in dice_running_var]
        check_attention_pooling_args(
            query, keys, lengths, offsets, weights, biases, act_weights, norm_mean, norm_var,
            norm_weight, norm_bias, activation, normalization)
        if before_kernels is not None:
            before_kernels()
    return act_weights, norm_mean, norm_var, norm_weight, norm_bias


def _plain_number(v) -> bool:
    return (type(v) is float or type(v) is int) and math.isfinite(v)


def _fast_path(query, keys, lengths, offsets, weights, biases, activation, normalization, scale, prelu_weights,
               dice_alpha, dice_running_mean, dice_running_var, dice_gamma, dice_beta, momentum, eps) -> bool:
    """Whether every check of the public function passes, asked of ``din_ops._C`` in one call
    (the Python checks cost more than a small call's kernel): eager CPU calls without autocast,
    for the activations without parameters. False means "run the Python checks", which then
    raise the error (or pass: the C++ side says no whenever in doubt)."""
    if (prelu_weights is not None or dice_alpha is not None or dice_running_mean is not None
            or dice_running_var is not None or dice_gamma is not None or dice_beta is not None
            or torch.compiler.is_compiling() or type(query) is not torch.Tensor or type(keys) is not torch.Tensor
            or type(weights) not in (list, tuple) or type(biases) not in (list, tuple)
            or not (_plain_number(scale) and _plain_number(eps) and eps > 0 and _plain_number(momentum)
                    and 0 <= momentum <= 1)
            or not (lengths is None or type(lengths) is torch.Tensor)
            or not (offsets is None or type(offsets) is torch.Tensor)
            or query.device.type != "cpu" or torch.is_autocast_enabled("cpu")):
        return False
    try:
        return _C._attention_args_ok(query, keys, lengths, offsets, weights, biases, activation, normalization)
    except (TypeError, RuntimeError):  # an argument pybind11 cannot convert: the Python checks name it
        return False


def attention_pooling(
    query: torch.Tensor,
    keys: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    *,
    lengths: Optional[torch.Tensor] = None,
    offsets: Optional[torch.Tensor] = None,
    activation: str = "sigmoid",
    normalization: str = "none",
    scale: float = 1.0,
    prelu_weights: Optional[Sequence[torch.Tensor]] = None,
    dice_alpha: Optional[Sequence[torch.Tensor]] = None,
    dice_running_mean: Optional[Sequence[torch.Tensor]] = None,
    dice_running_var: Optional[Sequence[torch.Tensor]] = None,
    dice_gamma: Optional[Sequence[torch.Tensor]] = None,
    dice_beta: Optional[Sequence[torch.Tensor]] = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-8,
    return_weights: bool = False,
):
    """DIN's local activation unit and weighted sum pooling (paper eq. 1.2), fused.

    Args:
        query: the candidate ``v_A``, ``[B, D]``, or ``[B, C, D]`` for C candidates per user
            (serving: the history is read once for all C).
        keys: the behaviour embeddings, padded ``[B, T, D]`` (with ``lengths [B]``, int32/int64;
            ``None`` means all T valid) or jagged ``[N, D]`` with ``offsets [B + 1]``.
        weights, biases: the attention MLP in ``nn.Linear`` layout: hidden layers
            ``[H_i, H_{i-1}]`` with ``H_0 = 4D`` over ``[q, k, q - k, q * k]``, then the output
            layer ``[1, H_last]``. Zero hidden layers is allowed.
        activation: after each hidden layer: ``sigmoid``, ``relu``, ``prelu`` (``prelu_weights``,
            one ``[H_i]`` or ``[1]`` alpha per layer), ``dice`` (``dice_alpha`` and running
            statistics per layer, optional affine ``dice_gamma``/``dice_beta``; in training the
            statistics are taken over the valid positions (and candidates) of the batch and the
            running statistics are updated in place like ``BatchNorm1d``), or ``identity``.
        normalization: ``none`` (the paper: weights are the raw scores) or ``softmax`` over the
            valid positions of each row.
        scale: multiplies the MLP output before normalization.
        return_weights: also return the attention weights, 0 on padding: ``[B, T]`` (padded) or
            ``[N]`` (jagged); ``[B, C, T]`` / ``[N, C]`` with several candidates.

    Returns ``out`` shaped like ``query`` (and the weights). A row with no valid position gets
    zero weights and a zero output. Dtypes: fp32/fp64/fp16/bf16, all tensors alike; fp16/bf16
    accumulate in fp32.

    NaN and inf propagate as in ``din_ops.reference``. An inf or NaN element of a valid key (or
    of a query) makes that position's (that candidate's) score NaN, as the reference's
    ``[q, k, q - k, q * k]`` layer does through inf - inf for weights of mixed sign; the other
    rows are not touched, and padding is never read.

    Under ``torch.autocast`` (CPU or CUDA) the unit is treated like ``nn.Linear``: query, keys
    and every parameter are cast to the autocast dtype (float64 stays float64), the op runs and
    returns that dtype and accumulates in float32; Dice running statistics stay float32.
    Gradients reach the parameters in their own dtype.

    Value checks of ``lengths``/``offsets`` read CPU tensors on the host (a ValueError naming
    the argument); on CUDA tensors they are device-side asserts with no host synchronization, or
    skipped (:func:`din_ops.set_cuda_value_checks`), and the forward and backward read nothing
    back, so they can be captured in a CUDA graph.

    Second-order gradients (a backward with ``create_graph=True``) are exact for every input,
    Dice batch statistics included: that backward differentiates the reference computation
    (``din_ops.reference``, which materializes the ``[B, C, T, 4D]`` concatenation) instead of
    running the fused kernel, so it costs more time and memory than the ordinary backward.
    """
    if _fast_path(query, keys, lengths, offsets, weights, biases, activation, normalization, scale, prelu_weights,
                  dice_alpha, dice_running_mean, dice_running_var, dice_gamma, dice_beta, momentum, eps):
        out, attn = _ops.attention_pooling(query, keys, lengths, offsets, list(weights), list(biases), None, None,
                                           None, None, None, activation, normalization, float(scale), float(eps))
        return (out, attn) if return_weights else out
    check_attention_pooling_options(query, weights, biases, activation, normalization, scale, prelu_weights,
                                    dice_alpha, dice_running_mean, dice_running_var, dice_gamma, dice_beta,
                                    momentum, eps)
    cast = lib.autocast_dtype(query.device.type) if isinstance(query, torch.Tensor) else None
    if cast is not None:  # autocast: the unit runs in the autocast dtype (SPEC, policies)
        query, keys, weights, biases = (lib.autocast_to(t, cast) for t in (query, keys, list(weights), list(biases)))
        prelu_weights, dice_alpha, dice_gamma, dice_beta = (
            None if t is None else lib.autocast_to(list(t), cast)
            for t in (prelu_weights, dice_alpha, dice_gamma, dice_beta))
    weights, biases = list(weights), list(biases)
    lists = unit_lists(
        query, keys, lengths, offsets, weights, biases, activation, normalization, prelu_weights, dice_alpha,
        dice_running_mean, dice_running_var, dice_gamma, dice_beta, training, momentum, eps,
        lambda w, b, *layer_lists: _ops.attention_pooling_stats(query, keys, lengths, offsets, w, b,
                                                                *layer_lists, activation, eps))

    out, attn = _ops.attention_pooling(query, keys, lengths, offsets, weights, biases, *optional_lists(*lists),
                                       activation, normalization, float(scale), float(eps))
    return (out, attn) if return_weights else out


# --- autocast --------------------------------------------------------------------------------
def _autocast_unit_args(args, device_type):
    """Every floating input in the autocast dtype except the Dice statistics (float32)."""
    dtype = lib.autocast_dtype(device_type)
    return tuple(a if i in (7, 8) else lib.autocast_to(a, dtype) for i, a in enumerate(args))


lib.register_autocast("attention_pooling", _autocast_unit_args)
lib.register_autocast("attention_pooling_stats", _autocast_unit_args)
