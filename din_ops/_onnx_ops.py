"""The ONNX translations of din_ops' ops (din_ops/onnx.py registers them): onnxscript functions
traced into standard ONNX operators, opset 18, following din_ops/reference.py."""
from __future__ import annotations

from typing import Optional, Sequence

from onnxscript import BOOL, INT64  # noqa: F401
from onnxscript import opset18 as op
from onnxscript.function_libs.torch_lib.tensor_typing import TFloat, TInt

def _const(op, value, like):
    return op.CastLike(op.Constant(value_float=float(value)), like)


def _activate(op, h, activation, i, act_weights, norm_mean, norm_var, norm_weight, norm_bias, eps):
    if activation == "sigmoid":
        return op.Sigmoid(h)
    if activation == "relu":
        return op.Relu(h)
    if activation == "identity":
        return h
    if activation == "prelu":  # per channel of the last dim; alpha [H] or [1]
        a = op.CastLike(act_weights[i], h)
        return op.Where(op.GreaterOrEqual(h, _const(op, 0, h)), h, op.Mul(a, h))
    if activation == "dice":
        return _dice_pointwise(op, h, act_weights[i], norm_mean[i], norm_var[i],
                               norm_weight[i] if norm_weight else None, norm_bias[i] if norm_bias else None, eps)
    raise ValueError(f"din_ops.onnx: unknown activation {activation!r}")


def _dice_pointwise(op, x, alpha, mean, var, gamma, beta, eps):
    """reference.dice_pointwise: p = sigmoid(gamma (x - E) / sqrt(Var + eps) + beta), p x + (1 - p) alpha x."""
    mean, var = op.CastLike(mean, x), op.CastLike(var, x)
    xn = op.Div(op.Sub(x, mean), op.Sqrt(op.Add(var, _const(op, eps, x))))
    if gamma is not None:
        xn = op.Mul(xn, op.CastLike(gamma, x))
    if beta is not None:
        xn = op.Add(xn, op.CastLike(beta, x))
    p = op.Sigmoid(xn)
    one = _const(op, 1, x)
    return op.Add(op.Mul(p, x), op.Mul(op.Mul(op.Sub(one, p), op.CastLike(alpha, x)), x))


def _mlp(op, h, weights, biases, activation, scale, act_weights, norm_mean, norm_var, norm_weight, norm_bias, eps):
    """Scores ``[..., 1] -> [...]`` of the unit's input ``h [..., 4D]``."""
    for i in range(len(weights) - 1):
        h = op.Add(op.MatMul(h, op.Transpose(weights[i], perm=[1, 0])), biases[i])
        h = _activate(op, h, activation, i, act_weights, norm_mean, norm_var, norm_weight, norm_bias, eps)
    s = op.Add(op.MatMul(h, op.Transpose(weights[-1], perm=[1, 0])), biases[-1])
    s = op.Squeeze(s, op.Constant(value_ints=[-1]))
    return op.Mul(s, _const(op, scale, s))


def _unit_input(op, q, k):
    """``[q, k, q - k, q * k]`` of broadcastable q and k."""
    diff = op.Sub(q, k)
    shape = op.Shape(diff)
    return op.Concat(op.Expand(q, shape), op.Expand(k, shape), diff, op.Mul(q, k), axis=-1)


def _axes(op, *a):
    return op.Constant(value_ints=list(a))


def attention_pooling(query: TFloat, keys: TFloat, lengths: Optional[TInt], offsets: Optional[TInt],
                      weights: Sequence[TFloat], biases: Sequence[TFloat],
                      act_weights: Optional[Sequence[TFloat]] = None,
                      norm_mean: Optional[Sequence[TFloat]] = None,
                      norm_var: Optional[Sequence[TFloat]] = None,
                      norm_weight: Optional[Sequence[TFloat]] = None,
                      norm_bias: Optional[Sequence[TFloat]] = None, activation: str = "sigmoid",
                      normalization: str = "none", scale: float = 1.0, eps: float = 1e-8):
    """``din_ops::attention_pooling`` in ONNX operators: ``(out, attn)``."""
    act_weights, norm_mean, norm_var = act_weights or [], norm_mean or [], norm_var or []
    norm_weight, norm_bias = norm_weight or [], norm_bias or []
    single = len(query.shape) == 2
    q = op.Unsqueeze(query, _axes(op, 1)) if single else query  # [B, C, D]
    zero = _const(op, 0, keys)
    mlp = dict(weights=weights, biases=biases, activation=activation, scale=scale, act_weights=act_weights,
               norm_mean=norm_mean, norm_var=norm_var, norm_weight=norm_weight, norm_bias=norm_bias, eps=eps)
    if offsets is None:
        k = keys  # [B, T, D]
        mask = None
        if lengths is not None:
            T = op.Shape(keys, start=1, end=2)
            t = op.Range(op.Constant(value_int=0), op.Squeeze(T), op.Constant(value_int=1))  # [T]
            mask = op.Less(op.Unsqueeze(t, _axes(op, 0)), op.Unsqueeze(op.Cast(lengths, to=7), _axes(op, 1)))
            k = op.Where(op.Unsqueeze(mask, _axes(op, 2)), keys, zero)  # padding is never read
        h = _unit_input(op, op.Unsqueeze(q, _axes(op, 2)), op.Unsqueeze(k, _axes(op, 1)))  # [B, C, T, 4D]
        s = _mlp(op, h, **mlp)  # [B, C, T]
        valid = None if mask is None else op.Unsqueeze(mask, _axes(op, 1))  # [B, 1, T]
        if normalization == "softmax":
            if valid is not None:
                s = op.Where(valid, s, _const(op, float("-inf"), s))
            w = op.Softmax(s, axis=-1)
        else:
            w = s
        if valid is not None:  # padding, and rows with no valid position, weigh 0
            w = op.Where(valid, w, _const(op, 0, w))
        out = op.MatMul(w, k)  # [B, C, D]
        if single:
            out, w = op.Squeeze(out, _axes(op, 1)), op.Squeeze(w, _axes(op, 1))
        return out, w
    # jagged: keys [N, D], row b owns [offsets[b], offsets[b + 1])
    N = op.Squeeze(op.Shape(keys, start=0, end=1))
    n = op.Range(op.Constant(value_int=0), N, op.Constant(value_int=1))  # [N]
    ends = op.Slice(op.Cast(offsets, to=7), _axes(op, 1), _axes(op, 2 ** 62))  # [B]
    row = op.ReduceSum(op.Cast(op.GreaterOrEqual(op.Unsqueeze(n, _axes(op, 1)), op.Unsqueeze(ends, _axes(op, 0))),
                               to=7), _axes(op, 1), keepdims=0)  # [N]
    h = _unit_input(op, op.Gather(q, row, axis=0), op.Unsqueeze(keys, _axes(op, 1)))  # [N, C, 4D]
    s = _mlp(op, h, **mlp)  # [N, C]
    idx = op.Unsqueeze(row, _axes(op, 1))  # [N, 1]
    BC = op.Shape(q, start=0, end=2)  # [B, C]
    if normalization == "softmax":
        m = op.ScatterND(op.Expand(_const(op, float("-inf"), s), BC), idx, s, reduction="max")
        e = op.Exp(op.Sub(s, op.Gather(m, row, axis=0)))
        den = op.ScatterND(op.Expand(_const(op, 0, s), BC), idx, e, reduction="add")
        w = op.Div(e, op.Gather(den, row, axis=0))
    else:
        w = s
    contrib = op.Mul(op.Unsqueeze(w, _axes(op, 2)), op.Unsqueeze(keys, _axes(op, 1)))  # [N, C, D]
    out = op.ScatterND(op.Expand(zero, op.Shape(q)), idx, contrib, reduction="add")  # [B, C, D]
    if single:
        out, w = op.Squeeze(out, _axes(op, 1)), op.Squeeze(w, _axes(op, 1))
    return out, w


def embedding_attention_pooling(query: TFloat, tables: Sequence[TFloat], ids: Sequence[TInt],
                                lengths: Optional[TInt], offsets: Optional[TInt], padding_idx: Sequence[int],
                                weights: Sequence[TFloat], biases: Sequence[TFloat],
                                act_weights: Optional[Sequence[TFloat]] = None,
                                norm_mean: Optional[Sequence[TFloat]] = None,
                                norm_var: Optional[Sequence[TFloat]] = None,
                                norm_weight: Optional[Sequence[TFloat]] = None,
                                norm_bias: Optional[Sequence[TFloat]] = None, activation: str = "sigmoid",
                                normalization: str = "none", scale: float = 1.0, eps: float = 1e-8):
    """``din_ops::embedding_attention_pooling``: the tables' rows gathered and concatenated into
    keys, then :func:`attention_pooling`. Padding positions of ``[B, T]`` ids look up row 0 (they
    may hold any id, and ``Gather`` must not go out of range) and are masked there."""
    mask = None
    if offsets is None and lengths is not None:
        T = op.Shape(ids[0], start=1, end=2)
        t = op.Range(op.Constant(value_int=0), op.Squeeze(T), op.Constant(value_int=1))  # [T]
        mask = op.Less(op.Unsqueeze(t, _axes(op, 0)), op.Unsqueeze(op.Cast(lengths, to=7), _axes(op, 1)))
    parts = []
    for table, idx in zip(tables, ids):
        idx = op.Cast(idx, to=7)
        if mask is not None:
            idx = op.Where(mask, idx, op.Constant(value_int=0))
        parts.append(op.Gather(table, idx, axis=0))
    keys = op.Concat(*parts, axis=-1) if len(parts) > 1 else parts[0]
    return attention_pooling(query, keys, lengths, offsets, weights, biases, act_weights, norm_mean, norm_var,
                             norm_weight, norm_bias, activation, normalization, scale, eps)


def dice(x: TFloat, lengths: Optional[TInt], alpha: TFloat, gamma: Optional[TFloat] = None,
         beta: Optional[TFloat] = None, running_mean: Optional[TFloat] = None,
         running_var: Optional[TFloat] = None, training: bool = False, eps: float = 1e-8):
    """``din_ops::dice`` in eval mode: ``(y, mean, var)`` with the running statistics."""
    if training or running_mean is None or running_var is None:
        raise ValueError("din_ops.onnx: Dice exports in eval mode only (model.eval()), with running statistics")
    y = _dice_pointwise(op, x, alpha, running_mean, running_var, gamma, beta, eps)
    return y, op.Identity(running_mean), op.Identity(running_var)


TRANSLATIONS = {"attention_pooling": attention_pooling, "embedding_attention_pooling": embedding_attention_pooling,
                "dice": dice}
