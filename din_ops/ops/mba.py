"""SPEC section 3: mini-batch aware (MBA) regularization of embedding tables (paper eq. 2.1-2.4).

For a mini-batch and every embedding row j that occurs in it, the paper's update is

    w_j <- w_j - lr * (g_j + lam / n_j * w_j)

where ``g_j`` sums the gradient rows of all occurrences of j in the batch and ``n_j`` counts the
occurrences of j in the whole training set. Rows that do not occur in the batch are not
regularized (and not touched at all), which is what makes the L2 penalty affordable on tables
with hundreds of millions of rows.

The ops (schemas in csrc/din_ops.cpp; kernels in csrc/cpu/mba.cpp and din_ops/triton/mba.py):

- ``din_ops::mba_sparse_update_``: the fused in-place update (SGD, Adagrad, row-wise Adagrad).
- ``din_ops::mba_penalty``: ``(lam / 2) * sum_{j in batch} ||w_j||^2 / n_j`` with its backward
  ``din_ops::mba_penalty_backward``, for use with any optimizer.

**The n_j == 0 rule.** A row present in the batch with ``n_j < 1`` (e.g. a feature missing from
the counted data, or online counts not yet updated) is treated as ``n_j = 1``: the coefficient is
``lam / max(n_j, 1)``, so no valid input produces inf or NaN.
"""
from __future__ import annotations

import functools
from typing import Callable, Iterable, Optional, Union

import torch

from .. import _library as lib
from .. import reference

OPTIMIZERS = ("sgd", "adagrad", "adagrad_rowwise")
FREQ_DTYPES = (torch.int32, torch.int64, torch.float32, torch.float64)
_ops = torch.ops.din_ops


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_number(value, name: str, *, positive: bool = False):
    if isinstance(value, torch.Tensor) or not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    v = float(value)
    if not (v == v) or v in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return v


def _check_padding_idx(padding_idx, num_embeddings: int):
    if padding_idx is None:
        return None
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
        raise TypeError(f"padding_idx must be an int or None, got {type(padding_idx).__name__}")
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(f"padding_idx must lie in [{-num_embeddings}, {num_embeddings}) "
                         f"(negative counts from the end, like nn.Embedding), got {padding_idx}")
    return padding_idx


def _check_table_and_batch(weight, indices, freq, padding_idx):
    """Checks shared by the three ops. Returns ``(num_embeddings, D)``."""
    lib.check_tensor(weight, "weight", dims=2, floating=True)
    N, D = weight.shape
    device = weight.device
    lib.check_tensor(indices, "indices", dims=1, device=device)
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be int32 or int64, got {indices.dtype}")
    lib.check_index_range(indices, N, "indices")
    lib.check_tensor(freq, "freq", device=device)
    if freq.dtype not in FREQ_DTYPES:
        raise ValueError(f"freq must be int32, int64, float32 or float64, got {freq.dtype}")
    if tuple(freq.shape) != (N,):
        raise ValueError(f"freq must have shape [num_embeddings] = [{N}], got {tuple(freq.shape)}")
    if freq.is_floating_point() and indices.numel() > 0:
        # NaN counts would turn the rows they touch into NaN; only the batch's rows are read
        mode = lib.value_check_mode(indices)
        if mode == "sync":
            if bool(freq.index_select(0, indices).isnan().any()):
                raise ValueError("freq holds NaN at some of the batch's indices")
        elif mode == "async":
            # in stream order after the index range assert, so index_select sees valid indices
            lib.assert_async(~freq.index_select(0, indices).isnan().any(),
                             "freq holds NaN at some of the batch's indices")
    _check_padding_idx(padding_idx, N)
    return N, D


def check_mba_update_args(weight, indices, grad, freq, state, lr, lam, optimizer, padding_idx, eps):
    """Validates every argument of ``mba_sparse_update_`` and names the bad one."""
    if not isinstance(optimizer, str) or optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    _check_number(lr, "lr")
    _check_number(lam, "lam")
    _check_number(eps, "eps", positive=optimizer != "sgd")
    N, D = _check_table_and_batch(weight, indices, freq, padding_idx)
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous (it is updated in place)")
    M = indices.shape[0]
    lib.check_tensor(grad, "grad", dims=2, dtype=weight.dtype, device=weight.device)
    if tuple(grad.shape) != (M, D):
        raise ValueError(f"grad must have shape [len(indices), D] = [{M}, {D}], got {tuple(grad.shape)}")
    if optimizer == "sgd":
        if state is not None:
            raise ValueError("state must be None for optimizer='sgd'")
        return
    if state is None:
        raise ValueError(f"optimizer={optimizer!r} needs a state tensor "
                         f"({'like weight' if optimizer == 'adagrad' else f'[{N}]'})")
    lib.check_tensor(state, "state", device=weight.device)
    expected = (N, D) if optimizer == "adagrad" else (N,)
    if tuple(state.shape) != expected:
        raise ValueError(f"state must have shape {list(expected)} for optimizer={optimizer!r}, "
                         f"got {tuple(state.shape)}")
    acc = _acc_dtype(weight.dtype)
    if state.dtype not in (weight.dtype, acc):
        raise ValueError(f"state must have dtype {weight.dtype} or {acc}, got {state.dtype}")
    if not state.is_contiguous():
        raise ValueError("state must be contiguous (it is updated in place)")
    if state.data_ptr() == weight.data_ptr() and state.numel() > 0:
        raise ValueError("state must not share memory with weight")


def check_mba_penalty_args(weight, indices, freq, lam, padding_idx):
    _check_number(lam, "lam")
    _check_table_and_batch(weight, indices, freq, padding_idx)


# --- fake kernels ----------------------------------------------------------------------------
@torch.library.register_fake("din_ops::mba_sparse_update_")
def _mba_sparse_update_fake(weight, indices, grad, freq, state, lr, lam, optimizer, padding_idx, eps):
    return None


@torch.library.register_fake("din_ops::mba_penalty")
def _mba_penalty_fake(weight, indices, freq, lam, padding_idx):
    return weight.new_empty(())


@torch.library.register_fake("din_ops::mba_penalty_backward")
def _mba_penalty_backward_fake(grad, weight, indices, freq, lam, padding_idx):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


# --- autograd --------------------------------------------------------------------------------
def _setup_penalty(ctx, inputs, output):
    weight, indices, freq, lam, padding_idx = inputs
    ctx.save_for_backward(weight, indices, freq)
    ctx.opts = (lam, padding_idx)


def _reference_penalty(indices, freq, lam, padding_idx, weight):
    # float64, like the kernel's accumulation
    return (reference.mba_penalty(weight.to(torch.float64), indices, freq, lam, padding_idx),)


def _backward_penalty(ctx, grad):
    weight, indices, freq = ctx.saved_tensors
    lam, padding_idx = ctx.opts
    if torch.is_grad_enabled():  # create_graph=True: gradients with a graph, exact to any order
        grad_weight, = lib.vjp_with_graph(
            functools.partial(_reference_penalty, indices, freq, lam, padding_idx), (weight,), (grad,))
        return grad_weight, None, None, None, None
    grad_weight = None
    if ctx.needs_input_grad[0]:
        with lib.below_autograd():
            grad_weight = _ops.mba_penalty_backward(grad, weight, indices, freq, lam, padding_idx)
    return grad_weight, None, None, None, None


torch.library.register_autograd("din_ops::mba_penalty", _backward_penalty, setup_context=_setup_penalty)
lib.register_not_differentiable("mba_penalty_backward")


def _mba_sparse_update_autograd(weight, indices, grad, freq, state, lr, lam, optimizer, padding_idx, eps):
    """Autograd kernel of the in-place update: an optimizer step, which autograd cannot record."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (weight, grad, state)):
        raise RuntimeError(
            "din_ops::mba_sparse_update_ is an in-place optimizer step and is not differentiable: "
            "call it under torch.no_grad() (din_ops.mba_sparse_update_ does)")
    with lib.below_autograd():
        _ops.mba_sparse_update_(weight, indices, grad, freq, state, lr, lam, optimizer, padding_idx, eps)
    # the write must invalidate tensors autograd saved before it (as torch's in-place ops do)
    for t in (weight, state):
        if t is not None and not t.is_inference():
            torch.autograd.graph.increment_version(t)


_autograd_lib = torch.library.Library("din_ops", "IMPL")
_autograd_lib.impl("mba_sparse_update_", _mba_sparse_update_autograd, "Autograd")


# --- public functions --------------------------------------------------------------------------
def mba_sparse_update_(
    weight: torch.Tensor,
    indices: torch.Tensor,
    grad: torch.Tensor,
    freq: torch.Tensor,
    *,
    lr: float,
    lam: float,
    optimizer: str = "sgd",
    state: Optional[torch.Tensor] = None,
    padding_idx: Optional[int] = None,
    eps: float = 1e-10,
) -> torch.Tensor:
    """Fused MBA step on the rows of an embedding table present in a mini-batch (paper eq. 2.4).

    For every distinct index j of ``indices`` (other than ``padding_idx``):
    ``g_j`` = sum of the rows of ``grad`` at the occurrences of j, then the regularized gradient
    ``r_j = g_j + lam / max(n_j, 1) * w_j`` feeds the optimizer:

    - ``"sgd"``: ``w_j -= lr * r_j``;
    - ``"adagrad"``: ``s_j += r_j * r_j`` (element-wise state like ``weight``),
      ``w_j -= lr * r_j / (sqrt(s_j) + eps)``;
    - ``"adagrad_rowwise"``: ``s_j += mean(r_j * r_j)`` (one value per row, state
      ``[num_embeddings]``), ``w_j -= lr * r_j / (sqrt(s_j) + eps)``.

    Rows not in the batch are neither read nor written (weight and state). Duplicates are summed
    in ascending position order, so the result is deterministic.

    Args:
        weight: ``[num_embeddings, D]`` fp32/fp64/fp16/bf16, contiguous; updated in place.
        indices: ``[M]`` int32/int64 in ``[0, num_embeddings)``, duplicates allowed (e.g.
            ``grad._indices()[0]`` of an ``nn.Embedding(sparse=True)`` gradient, uncoalesced).
        grad: ``[M, D]``, the per-occurrence gradient rows (``grad._values()``), weight's dtype.
        freq: ``[num_embeddings]`` int32/int64/float32/float64: ``n_j``, the occurrences of each
            feature in the training data (see :func:`count_frequencies`). ``n_j == 0`` (any
            ``n_j < 1``) is treated as 1, so present rows never divide by zero.
        lr, lam: learning rate and MBA regularization strength, both ``>= 0``.
        state: the Adagrad accumulator (``None`` for SGD), weight's dtype or float32
            (float64 for fp64 weights; prefer float32 for fp16/bf16 tables); updated in place.
        padding_idx: a row that is never updated (negative counts from the end).
        eps: Adagrad's denominator term, ``> 0``.

    Computation is in float32 (float64 for fp64 tables). Returns ``weight``.

    The value checks of ``indices`` (range) and of float ``freq`` (NaN at the batch's rows) read
    CPU tensors on the host (a ValueError); on CUDA tensors they are device-side asserts or
    skipped (:func:`din_ops.set_cuda_value_checks`), and the update itself reads nothing back
    (the batch is sorted and segmented on the device), so a step never synchronizes.

    The update is an optimizer step that autograd does not record (it runs under
    ``torch.no_grad()``); it bumps the version of ``weight`` and ``state``, so a graph that saved
    them before the step raises on backward instead of using the new values. Calling
    ``torch.ops.din_ops.mba_sparse_update_`` with grad mode on and an input that requires grad
    raises a RuntimeError.
    """
    check_mba_update_args(weight, indices, grad, freq, state, lr, lam, optimizer, padding_idx, eps)
    with torch.no_grad():
        _ops.mba_sparse_update_(weight, indices, grad, freq, state, float(lr), float(lam), optimizer,
                                padding_idx, float(eps))
    return weight


def mba_penalty(weight: torch.Tensor, indices: torch.Tensor, freq: torch.Tensor, lam: float,
                padding_idx: Optional[int] = None) -> torch.Tensor:
    """The MBA penalty ``(lam / 2) * sum_{j in batch} ||w_j||^2 / max(n_j, 1)`` (paper eq. 2.3).

    The sum runs over the DISTINCT indices of ``indices`` (duplicates count once), minus
    ``padding_idx``; ``n_j == 0`` is treated as 1. Its gradient w.r.t. ``weight`` is exactly
    ``lam / max(n_j, 1) * w_j`` on the present rows and exactly zero elsewhere, so adding it to
    the loss gives eq. 2.4 with any optimizer. The gradient is a dense ``[num_embeddings, D]``
    tensor: for large tables prefer :func:`mba_sparse_update_` (or :class:`din_ops.optim.MBASGD`).

    Returns a 0-dim tensor of ``weight``'s dtype (accumulated in float64). Second-order
    gradients (a backward with ``create_graph=True``) are exact. On CUDA tensors neither the
    penalty nor its backward synchronizes with the host (value checks as in
    :func:`mba_sparse_update_`).
    """
    check_mba_penalty_args(weight, indices, freq, lam, padding_idx)
    return _ops.mba_penalty(weight, indices, freq, float(lam), padding_idx)


# --- frequencies ----------------------------------------------------------------------------
def _index_tensors(batch, name: str):
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, (list, tuple)):
        for i, t in enumerate(batch):
            yield from _index_tensors(t, f"{name}[{i}]")
    else:
        raise TypeError(f"{name} must be an index tensor or a list/tuple of index tensors, got "
                        f"{type(batch).__name__} (pass key= to pick the indices out of a batch)")


_INDEX_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def check_frequency_indices(t, num_embeddings: int, name: str = "indices") -> torch.Tensor:
    """An index tensor to count: integer, holding data, values in range. Returns it flattened."""
    lib.check_tensor(t, name)
    if t.dtype not in _INDEX_DTYPES:
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (it holds no values to count)")
    flat = t.reshape(-1)
    lib.check_index_range(flat, num_embeddings, name)
    return flat


def check_counter_state(state, num_embeddings: int):
    """A :meth:`FrequencyCounter.state_dict`: ``counts`` int ``[num_embeddings]`` >= 0, ``total`` int."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict with 'counts' and 'total', got {type(state).__name__}")
    for key in ("counts", "total"):
        if key not in state:
            raise ValueError(f"state has no {key!r} entry")
    counts, total = state["counts"], state["total"]
    lib.check_tensor(counts, "counts", dims=1)
    if counts.dtype not in _INDEX_DTYPES:
        raise ValueError(f"counts must be an integer tensor, got {counts.dtype}")
    if tuple(counts.shape) != (num_embeddings,):
        raise ValueError(f"counts must have shape [{num_embeddings}], got {tuple(counts.shape)}")
    if counts.device.type == "meta":
        raise ValueError("counts is on the meta device (it holds no values)")
    if counts.numel():
        mode = lib.value_check_mode(counts)
        if mode == "sync" and int(counts.min()) < 0:
            raise ValueError("counts must be non-negative")
        if mode == "async":
            lib.assert_async(counts.min() >= 0, "counts must be non-negative")
    if isinstance(total, torch.Tensor) and total.numel() == 1 and not total.is_floating_point():
        total = int(total)
    if isinstance(total, bool) or not isinstance(total, int):
        raise TypeError(f"total must be an int, got {type(total).__name__}")
    if total < 0:
        raise ValueError(f"total must be non-negative, got {total}")
    return counts, total


class FrequencyCounter:
    """Online feature counts ``n_j`` for one embedding table: call :meth:`update` with each
    batch's indices as it arrives; :attr:`counts` is the int64 ``[num_embeddings]`` tally.

    ``padding_idx`` (if given) is never counted. Indices may have any shape (they are
    flattened); values must lie in ``[0, num_embeddings)``.

    :meth:`update` does not synchronize with a CUDA device: the padding occurrences are counted
    with weight 0 and the running :attr:`total` stays on the counts' device until it is read
    (reading :attr:`total` or :meth:`state_dict` reads it on the host).
    """

    def __init__(self, num_embeddings: int, padding_idx: Optional[int] = None, device=None):
        if isinstance(num_embeddings, bool) or not isinstance(num_embeddings, int) or num_embeddings < 0:
            raise ValueError(f"num_embeddings must be a non-negative int, got {num_embeddings!r}")
        self.num_embeddings = num_embeddings
        padding_idx = _check_padding_idx(padding_idx, num_embeddings)
        self.padding_idx = None if padding_idx is None else padding_idx % num_embeddings
        self.counts = torch.zeros(num_embeddings, dtype=torch.int64, device=device)
        self._total = 0  # occurrences counted (padding excluded), read on the host
        self._pending = None  # occurrences counted since, a device scalar (no host sync)

    @property
    def total(self) -> int:
        """Occurrences counted (padding excluded)."""
        if self._pending is not None:
            self._total += int(self._pending)
            self._pending = None
        return self._total

    @total.setter
    def total(self, value: int) -> None:
        self._total = value
        self._pending = None

    def update(self, indices) -> "FrequencyCounter":
        """Adds the occurrences in ``indices`` (a tensor or a list/tuple of tensors). Every tensor
        is checked before any is counted, so a bad batch counts nothing."""
        flats = [check_frequency_indices(t, self.num_embeddings) for t in _index_tensors(indices, "indices")]
        for flat in flats:
            flat = flat.to(device=self.counts.device, dtype=torch.int64)
            if flat.numel() == 0:
                continue
            if self.padding_idx is None:
                self.counts.index_add_(0, flat, torch.ones_like(flat))
                self._total += flat.numel()
                continue
            # the padding row is added 0 (no boolean mask: its size would need a host read);
            # index_add_ on integers: exact, whatever the order
            weight = (flat != self.padding_idx).to(torch.int64)
            self.counts.index_add_(0, flat, weight)
            n = weight.sum()
            self._pending = n if self._pending is None else self._pending + n
        return self

    def reset(self) -> None:
        self.counts.zero_()
        self.total = 0

    def state_dict(self):
        return {"counts": self.counts, "total": self.total}

    def load_state_dict(self, state) -> None:
        counts, total = check_counter_state(state, self.num_embeddings)
        self.counts.copy_(counts)
        self.total = total

    def __repr__(self) -> str:
        return (f"FrequencyCounter(num_embeddings={self.num_embeddings}, padding_idx={self.padding_idx}, "
                f"total={self.total})")


def check_count_frequencies_args(indices_or_iterable, key):
    if key is not None and not callable(key):
        raise TypeError(f"key must be callable (it maps a batch to its index tensors), got {type(key).__name__}")
    if not isinstance(indices_or_iterable, torch.Tensor) and (
            isinstance(indices_or_iterable, (str, bytes)) or not hasattr(indices_or_iterable, "__iter__")):
        raise TypeError("indices_or_iterable must be an index tensor or an iterable of batches, got "
                        f"{type(indices_or_iterable).__name__}")


def count_frequencies(
    indices_or_iterable: Union[torch.Tensor, Iterable],
    num_embeddings: int,
    padding_idx: Optional[int] = None,
    *,
    key: Optional[Callable] = None,
) -> torch.Tensor:
    """``n_j``: occurrences of each feature j in a dataset's index stream, int64 ``[num_embeddings]``.

    ``indices_or_iterable`` is an index tensor (any shape), or an iterable (e.g. a DataLoader) of
    index tensors or lists/tuples of index tensors; ``key`` maps each item to those (for batches
    that also hold labels or dense features). ``padding_idx`` is not counted. Rows with
    ``n_j == 0`` are treated as ``n_j = 1`` by the MBA ops.
    """
    check_count_frequencies_args(indices_or_iterable, key)
    if isinstance(indices_or_iterable, torch.Tensor):
        t = indices_or_iterable if key is None else key(indices_or_iterable)
        counter = FrequencyCounter(num_embeddings, padding_idx, device=t.device)
        return counter.update(t).counts
    counter = None
    for batch in indices_or_iterable:
        if key is not None:
            batch = key(batch)
        if counter is None:
            first = next(_index_tensors(batch, "batch"), None)
            counter = FrequencyCounter(num_embeddings, padding_idx,
                                       device=None if first is None else first.device)
        counter.update(batch)
    if counter is None:
        counter = FrequencyCounter(num_embeddings, padding_idx)
    return counter.counts
