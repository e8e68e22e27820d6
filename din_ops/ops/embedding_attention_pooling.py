"""SPEC section 4: embedding lookups fused into attention pooling (ids in, interest out).

``din_ops::embedding_attention_pooling`` (schema in csrc/din_ops.cpp) computes exactly
``attention_pooling(query, keys, ...)`` with ``keys[p] = concat_f tables[f][ids[f][p]]``, and
never stores those keys. Kernels: csrc/cpu/embedding_attention_pooling.cpp (CPU) and
din_ops/triton/embedding_attention_pooling.py (CUDA). This module holds the input checks, the
fake kernels and the public function; the autograd node is C++ (csrc/autograd.cpp).

The backward gives each table a sparse COO gradient, coalesced: one row per distinct id of the
valid positions (``padding_idx`` rows excluded), the sum of that id's key gradients, as
``nn.Embedding(sparse=True)`` followed by ``attention_pooling`` and ``coalesce()`` would give.
Neither the keys ``[N, D]`` nor their dense gradient exist at any time: the CPU kernels gather
and differentiate a chunk of rows at a time (about 8 MB of keys), which is exact because rows are
independent given Dice's batch statistics, and those are merged over the chunks.
"""
from __future__ import annotations

import numbers
from typing import List, Optional, Sequence

import torch

from .. import _library as lib
from .attention_pooling import (_acc_dtype, _check_tensor_list, _like, check_attention_pooling_options,
                                optional_lists, unit_lists)

_ops = torch.ops.din_ops


# --- checks ----------------------------------------------------------------------------------
def padding_list(padding_idx, tables) -> List[int]:
    """``padding_idx`` (None, one int for every table, or one int/None per table) as the op's
    ``int[]``: one row index per table in ``[0, E_f)``, -1 for none. Negative indices count from
    the end, as in ``nn.Embedding``."""
    F = len(tables)
    if padding_idx is None:
        return [-1] * F
    if isinstance(padding_idx, numbers.Integral) and not isinstance(padding_idx, bool):
        values = [int(padding_idx)] * F
    elif isinstance(padding_idx, (list, tuple)):
        if len(padding_idx) != F:
            raise ValueError(f"padding_idx must hold one entry per table ({F}), got {len(padding_idx)}")
        values = padding_idx
    else:
        raise TypeError(f"padding_idx must be None, an int or a list of int/None, got {type(padding_idx).__name__}")
    out = []
    for f, (p, t) in enumerate(zip(values, tables)):
        if p is None:
            out.append(-1)
            continue
        if isinstance(p, bool) or not isinstance(p, numbers.Integral):
            raise TypeError(f"padding_idx[{f}] must be an int or None, got {type(p).__name__}")
        E = t.shape[0]
        if not -E <= p < E:
            raise ValueError(f"padding_idx[{f}] must lie in [-{E}, {E}) for tables[{f}] of {E} rows, got {p}")
        out.append(int(p) % E)
    return out


def check_embedding_inputs(query, tables, ids, lengths, offsets):
    """Checks ``tables`` and ``ids`` against ``query`` and returns them as lists, with a stand-in
    for the keys (an expanded scalar: no memory) for :func:`check_attention_pooling_args`."""
    lib.check_tensor(query, "query", dims=(2, 3), floating=True)
    _check_tensor_list(tables, "tables", optional=False)
    _check_tensor_list(ids, "ids", optional=False)
    tables, ids = list(tables), list(ids)
    if not tables:
        raise ValueError("tables must hold at least one [E_f, D_f] table")
    if len(ids) != len(tables):
        raise ValueError(f"ids must hold one index tensor per table ({len(tables)}), got {len(ids)}")
    dtype, device = query.dtype, query.device
    for f, t in enumerate(tables):
        lib.check_tensor(t, f"tables[{f}]", dims=2, dtype=dtype, device=device)
    D = query.shape[-1]
    widths = [t.shape[1] for t in tables]
    if sum(widths) != D:
        raise ValueError(f"the tables' widths {widths} must sum to query's width D={D}, got {sum(widths)}")
    for f, i in enumerate(ids):
        lib.check_tensor(i, f"ids[{f}]", dims=(1, 2), device=device)
        if i.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"ids[{f}] must be int32 or int64, got {i.dtype}")
        if i.shape != ids[0].shape:
            raise ValueError(f"ids[{f}] must have the shape of ids[0] {tuple(ids[0].shape)}, got {tuple(i.shape)}")
    B = query.shape[0]
    if ids[0].dim() == 2:
        if offsets is not None:
            raise ValueError("offsets is for jagged ids [N]; padded ids [B, T] take lengths")
        if ids[0].shape[0] != B:
            raise ValueError(f"ids must be [B, T] with B={B} (query's rows), got {tuple(ids[0].shape)}")
        shape = (B, ids[0].shape[1], D)
    else:
        if offsets is None:
            raise ValueError("jagged ids [N] need offsets [B + 1] (or pass padded ids [B, T] with lengths)")
        if lengths is not None:
            raise ValueError("lengths is for padded ids [B, T]; jagged ids [N] take offsets")
        shape = (ids[0].shape[0], D)
    keys = torch.empty((), dtype=dtype, device=device).expand(shape)
    return tables, ids, keys


def check_id_values(tables, ids, lengths, offsets):
    """Ids of valid positions in ``[0, E_f)``. The CPU kernels check them before any arithmetic
    (a RuntimeError naming ``ids[f]``); CUDA tensors get the device-side checks of
    :func:`din_ops.set_cuda_value_checks`, which never synchronize."""
    if ids[0].device.type == "cpu" or torch.compiler.is_compiling():
        return
    mask = None
    if ids[0].dim() == 2 and lengths is not None:
        t = torch.arange(ids[0].shape[1], device=ids[0].device)
        mask = t < lengths.unsqueeze(1)
    for f, (t, i) in enumerate(zip(tables, ids)):
        lib.check_index_range(i if mask is None else torch.where(mask, i, 0), t.shape[0], f"ids[{f}]")


# --- fake kernels ----------------------------------------------------------------------------
def _attn_shape(query, ids):
    jagged = ids[0].dim() == 1
    B = query.shape[0]
    if query.dim() == 2:
        return (ids[0].shape[0],) if jagged else (B, ids[0].shape[1])
    C = query.shape[1]
    return (ids[0].shape[0], C) if jagged else (B, C, ids[0].shape[1])


@torch.library.register_fake("din_ops::embedding_attention_pooling")
def _forward_fake(query, tables, ids, lengths, offsets, padding_idx, weights, biases, act_weights, norm_mean,
                  norm_var, norm_weight, norm_bias, activation, normalization, scale, eps):
    return query.new_empty(query.shape), query.new_empty(_attn_shape(query, ids))


def _sparse_fake(tables):
    """Per table, distinct ids ``[U_f]`` and their gradient rows ``[U_f, D_f]``: U_f depends on
    the ids' values."""
    ctx = torch.library.get_ctx()
    sizes = [ctx.new_dynamic_size() for _ in tables]
    return ([t.new_empty((u,), dtype=torch.int64) for t, u in zip(tables, sizes)],
            [t.new_empty((u, t.shape[1])) for t, u in zip(tables, sizes)])


@torch.library.register_fake("din_ops::embedding_attention_pooling_backward")
def _backward_fake(grad_out, grad_attn, attn, query, tables, ids, lengths, offsets, padding_idx, weights, biases,
                   act_weights, norm_mean, norm_var, norm_weight, norm_bias, activation, normalization, scale, eps):
    idx, val = _sparse_fake(tables)
    return (torch.empty_like(query), idx, val, _like(weights), _like(biases), _like(act_weights), _like(norm_mean),
            _like(norm_var), _like(norm_weight), _like(norm_bias))


@torch.library.register_fake("din_ops::embedding_attention_pooling_stats")
def _stats_fake(query, tables, ids, lengths, offsets, padding_idx, weights, biases, act_weights, norm_mean,
                norm_var, norm_weight, norm_bias, activation, eps):
    H = weights[-1].shape[0]
    acc = _acc_dtype(query.dtype)
    return query.new_empty((H,), dtype=acc), query.new_empty((H,), dtype=acc)


@torch.library.register_fake("din_ops::embedding_attention_pooling_stats_backward")
def _stats_backward_fake(grad_mean, grad_var, mean, query, tables, ids, lengths, offsets, padding_idx, weights,
                         biases, act_weights, norm_mean, norm_var, norm_weight, norm_bias, activation, eps):
    idx, val = _sparse_fake(tables)
    return (torch.empty_like(query), idx, val, _like(weights), _like(biases), _like(act_weights), _like(norm_mean),
            _like(norm_var), _like(norm_weight), _like(norm_bias))


# --- autograd --------------------------------------------------------------------------------
# The autograd kernels are C++ (csrc/autograd.cpp): the node calls the fused backward op and
# builds each table's sparse gradient from its distinct ids and rows; a backward with
# create_graph=True raises a RuntimeError naming the op.
lib.register_not_differentiable("embedding_attention_pooling_backward")
lib.register_not_differentiable("embedding_attention_pooling_stats_backward")


# --- autocast --------------------------------------------------------------------------------
def _autocast_args(args, device_type):
    """The unit runs in the tables' dtype: casting the tables would copy them whole, so under
    autocast the query and the MLP follow the tables instead (as ``nn.Embedding`` ignores
    autocast); the Dice statistics stay float32."""
    dtype = args[1][0].dtype
    return tuple(lib.autocast_to(a, dtype) if i in (0, 6, 7, 8, 11, 12) else a for i, a in enumerate(args))


lib.register_autocast("embedding_attention_pooling", _autocast_args)
lib.register_autocast("embedding_attention_pooling_stats", _autocast_args)


# --- public function ---------------------------------------------------------------------------
def embedding_attention_pooling(
    query: torch.Tensor,
    tables: Sequence[torch.Tensor],
    ids: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    *,
    lengths: Optional[torch.Tensor] = None,
    offsets: Optional[torch.Tensor] = None,
    padding_idx=None,
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
    """:func:`din_ops.attention_pooling` over keys looked up from embedding tables, ids in.

    The key of a position is ``concat_f tables[f][ids[f][position]]`` (width ``D = sum D_f``,
    which must equal the query's); it is never stored, and neither is its gradient.

    Args:
        query: ``[B, D]`` or ``[B, C, D]`` (C candidates per user).
        tables: ``[E_f, D_f]`` weights (e.g. ``nn.Embedding.weight``), query's dtype and device.
        ids: one int32/int64 index tensor per table, all the same shape: padded ``[B, T]`` with
            ``lengths [B]`` (ids at padding positions are never read and may hold anything), or
            jagged ``[N]`` with ``offsets [B + 1]``.
        padding_idx: None, one row index for every table, or one int/None per table: those rows
            are looked up like any other (as ``nn.Embedding`` does) but get no gradient.
        weights, biases, activation, normalization, scale, prelu_weights, dice_*, training,
            momentum, eps, return_weights: as in :func:`din_ops.attention_pooling`.

    Returns what :func:`din_ops.attention_pooling` returns for the gathered keys.

    Gradients: query, MLP, PReLU and Dice parameters as in :func:`din_ops.attention_pooling`;
    each table gets a sparse COO gradient, coalesced, with one row per distinct id present at
    valid positions (``padding_idx`` excluded), equal to ``nn.Embedding(sparse=True)`` +
    ``attention_pooling`` after ``coalesce()``. Autograd's accumulation into a leaf's ``.grad``
    rebuilds sparse tensors without the coalesced flag (the rows stay distinct and sorted), and
    with several sparse contributions (a table also used for the candidate's own lookup) it
    concatenates them; :mod:`din_ops.optim` sums duplicates either way. Its online frequency
    counts see one entry per distinct id and batch: pass counts for the paper's ``n_j``.
    For a table whose optimizer needs a dense gradient, ``.to_dense()`` it, or use
    :class:`din_ops.nn.EmbeddingAttentionPooling` with ``nn.Embedding(sparse=False)``.

    Ids out of range at valid positions raise before any arithmetic on CPU (a RuntimeError
    naming ``ids[f]``); on CUDA they are device-side checks (:func:`din_ops.set_cuda_value_checks`).
    The backward on CUDA reads the number of distinct ids of each table, since the sparse
    gradient's size depends on the ids' values (as ``coalesce`` does).

    Under autocast the unit runs in the tables' dtype (casting the tables would copy them): the
    query and the MLP are cast to it. Second-order gradients raise a RuntimeError.
    """
    check_attention_pooling_options(query, weights, biases, activation, normalization, scale, prelu_weights,
                                    dice_alpha, dice_running_mean, dice_running_var, dice_gamma, dice_beta,
                                    momentum, eps)
    _check_tensor_list(tables, "tables", optional=False)
    tables = list(tables)
    if tables and lib.autocast_dtype(query.device.type) is not None:
        cast = tables[0].dtype
        query, weights, biases = (lib.autocast_to(t, cast) for t in (query, list(weights), list(biases)))
        prelu_weights, dice_alpha, dice_gamma, dice_beta = (
            None if t is None else lib.autocast_to(list(t), cast)
            for t in (prelu_weights, dice_alpha, dice_gamma, dice_beta))
    tables, ids, keys = check_embedding_inputs(query, tables, ids, lengths, offsets)
    pads = padding_list(padding_idx, tables)
    weights, biases = list(weights), list(biases)
    lists = unit_lists(
        query, keys, lengths, offsets, weights, biases, activation, normalization, prelu_weights, dice_alpha,
        dice_running_mean, dice_running_var, dice_gamma, dice_beta, training, momentum, eps,
        lambda w, b, *layer_lists: _ops.embedding_attention_pooling_stats(query, tables, ids, lengths, offsets,
                                                                          pads, w, b, *layer_lists, activation, eps),
        before_kernels=lambda: check_id_values(tables, ids, lengths, offsets))

    out, attn = _ops.embedding_attention_pooling(query, tables, ids, lengths, offsets, pads, weights, biases,
                                                 *optional_lists(*lists), activation, normalization, float(scale),
                                                 float(eps))
    return (out, attn) if return_weights else out
