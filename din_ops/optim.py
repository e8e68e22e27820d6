"""Optimizers that apply mini-batch aware (MBA) regularization (SPEC section 3, paper eq. 2.4).

Swap the optimizer of a DIN whose embedding tables are ``nn.Embedding(sparse=True)``::

    opt = din_ops.optim.MBASGD(model.parameters(), lr=0.1, lam=1e-4)

Parameters whose gradient is sparse (embedding tables) get the fused MBA update
:func:`din_ops.mba_sparse_update_` on the rows present in the batch: their sparse COO gradient
is fed as is (``grad._indices()[0]``, ``grad._values()``; duplicates are summed by the kernel).
Parameters with dense gradients (MLPs, attention unit, Dice) get a plain SGD / Adagrad step with
optional ``weight_decay``.

Frequencies ``n_j`` per table come from, in order of precedence: the param group's
``frequencies`` (a tensor, or a dict ``{param: tensor}``), the constructor's
``frequencies={param: tensor}``, or else ONLINE counting: the optimizer keeps an int64 count per
table (``state[p]["frequency"]``, see :meth:`frequencies`) and adds each step's indices before
the update, so ``n_j`` is the number of occurrences seen so far (at least 1 for present rows).
``n_j == 0`` is treated as 1.

``padding_idx`` (the embeddings' padding row, never updated) is set per group or through
``padding_idx={param: idx}``; :func:`embedding_padding` collects it from a model's
``nn.Embedding`` modules.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from .ops import mba as _mba

__all__ = ["MBASGD", "MBAAdagrad", "embedding_padding"]


def embedding_padding(model: nn.Module) -> Dict[torch.Tensor, int]:
    """``{weight: padding_idx}`` of every ``nn.Embedding`` in ``model`` that has one."""
    return {m.weight: m.padding_idx for m in model.modules()
            if isinstance(m, nn.Embedding) and m.padding_idx is not None}


def _lookup(value, p):
    if isinstance(value, dict):
        for k, v in value.items():
            if k is p:
                return v
        return None
    return value


class _MBAOptimizer(torch.optim.Optimizer):
    def __init__(self, params, defaults, frequencies, padding_idx):
        if frequencies is not None and not isinstance(frequencies, dict):
            raise TypeError("frequencies must be a dict {param: counts tensor} (or set it per param group)")
        if padding_idx is not None and not isinstance(padding_idx, (int, dict)):
            raise TypeError("padding_idx must be an int, a dict {param: int} or None")
        self._frequencies = frequencies or {}
        defaults = dict(defaults, padding_idx=padding_idx, frequencies=None)
        super().__init__(params, defaults)

    def _check_group(self, group):
        _mba._check_number(group["lr"], "lr")
        _mba._check_number(group["lam"], "lam")
        _mba._check_number(group["weight_decay"], "weight_decay")

    def _padding(self, group, p) -> Optional[int]:
        return _lookup(group["padding_idx"], p)

    def frequencies(self, p: torch.Tensor) -> Optional[torch.Tensor]:
        """The counts ``n`` used for parameter ``p``: given ones, else the online counts."""
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                given = _lookup(group["frequencies"], p)
                if given is None:
                    given = _lookup(self._frequencies, p)
                if given is not None:
                    return given
        st = self.state.get(p, {})
        return st.get("frequency")

    def _freq_for_step(self, group, p, indices, padding_idx):
        given = _lookup(group["frequencies"], p)
        if given is None:
            given = _lookup(self._frequencies, p)
        if given is not None:
            return given
        st = self.state[p]
        counts = st.get("frequency")
        if counts is None:
            counts = st["frequency"] = torch.zeros(p.shape[0], dtype=torch.int64, device=p.device)
        flat = indices.to(torch.int64)
        if padding_idx is not None:
            flat = flat[flat != padding_idx % p.shape[0]]
        counts.index_add_(0, flat, torch.ones_like(flat))
        return counts

    @staticmethod
    def _sparse_parts(p, grad):
        if grad.layout != torch.sparse_coo:
            raise ValueError(f"sparse gradients must be COO, got {grad.layout}")
        if p.dim() != 2 or grad.sparse_dim() != 1 or grad.dense_dim() != 1:
            raise ValueError("sparse gradients are supported for 2-D embedding tables "
                             f"(sparse_dim 1, dense_dim 1), got shape {tuple(p.shape)} with "
                             f"sparse_dim {grad.sparse_dim()}")
        return grad._indices()[0], grad._values()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._check_group(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    indices, values = self._sparse_parts(p, p.grad)
                    padding_idx = self._padding(group, p)
                    freq = self._freq_for_step(group, p, indices, padding_idx)
                    self._sparse_step(group, p, indices, values, freq, padding_idx)
                else:
                    self._dense_step(group, p, p.grad)
        return loss


class MBASGD(_MBAOptimizer):
    """SGD with mini-batch aware regularization of sparse-gradient (embedding) parameters.

    Sparse gradients: ``w_j -= lr * (g_j + lam / max(n_j, 1) * w_j)`` on the rows present in the
    batch (paper eq. 2.4). Dense gradients: ``p -= lr * (g + weight_decay * p)``.

    Args:
        params: parameters or param groups; groups may set ``lr``, ``lam``, ``weight_decay``,
            ``padding_idx`` and ``frequencies``.
        lr: learning rate. lam: MBA strength (sparse parameters only).
        weight_decay: L2 on dense parameters only (embeddings are regularized by ``lam``).
        frequencies: ``{param: n}`` with ``n [num_embeddings]`` counts (see
            :func:`din_ops.count_frequencies`); tables without one are counted online.
        padding_idx: an int for every table, or ``{param: idx}`` (see :func:`embedding_padding`).
    """

    def __init__(self, params, lr: float, lam: float = 0.0, weight_decay: float = 0.0,
                 frequencies: Optional[dict] = None, padding_idx=None):
        _mba._check_number(lr, "lr")
        _mba._check_number(lam, "lam")
        _mba._check_number(weight_decay, "weight_decay")
        super().__init__(params, dict(lr=lr, lam=lam, weight_decay=weight_decay), frequencies, padding_idx)

    def _sparse_step(self, group, p, indices, values, freq, padding_idx):
        _mba.mba_sparse_update_(p, indices, values, freq, lr=group["lr"], lam=group["lam"],
                                optimizer="sgd", padding_idx=padding_idx)

    def _dense_step(self, group, p, grad):
        if group["weight_decay"]:
            grad = grad.add(p, alpha=group["weight_decay"])
        p.add_(grad, alpha=-group["lr"])


class MBAAdagrad(_MBAOptimizer):
    """Adagrad with mini-batch aware regularization of sparse-gradient (embedding) parameters.

    Sparse gradients: the regularized gradient ``r_j = g_j + lam / max(n_j, 1) * w_j`` of each
    present row feeds Adagrad: ``s_j += r_j**2`` (``rowwise=False``, state like the table, as
    ``torch.optim.Adagrad``) or ``s_j += mean(r_j**2)`` (``rowwise=True``, one value per row),
    then ``w_j -= lr * r_j / (sqrt(s_j) + eps)``. Rows outside the batch are untouched (state
    included). Dense gradients: element-wise Adagrad with optional ``weight_decay``.

    State is float32 for fp16/bf16/fp32 tables (float64 for fp64), starting at
    ``initial_accumulator_value``.
    """

    def __init__(self, params, lr: float = 1e-2, lam: float = 0.0, rowwise: bool = False,
                 eps: float = 1e-10, initial_accumulator_value: float = 0.0, weight_decay: float = 0.0,
                 frequencies: Optional[dict] = None, padding_idx=None):
        _mba._check_number(lr, "lr")
        _mba._check_number(lam, "lam")
        _mba._check_number(eps, "eps", positive=True)
        _mba._check_number(initial_accumulator_value, "initial_accumulator_value")
        _mba._check_number(weight_decay, "weight_decay")
        defaults = dict(lr=lr, lam=lam, rowwise=bool(rowwise), eps=eps,
                        initial_accumulator_value=initial_accumulator_value, weight_decay=weight_decay)
        super().__init__(params, defaults, frequencies, padding_idx)

    def _state_sum(self, group, p, rowwise):
        st = self.state[p]
        if "sum" not in st:
            acc = torch.float64 if p.dtype == torch.float64 else torch.float32
            shape = (p.shape[0],) if rowwise else p.shape
            st["sum"] = torch.full(shape, float(group["initial_accumulator_value"]), dtype=acc,
                                   device=p.device)
        return st["sum"]

    def _sparse_step(self, group, p, indices, values, freq, padding_idx):
        rowwise = group["rowwise"]
        state = self._state_sum(group, p, rowwise)
        _mba.mba_sparse_update_(p, indices, values, freq, lr=group["lr"], lam=group["lam"],
                                optimizer="adagrad_rowwise" if rowwise else "adagrad", state=state,
                                padding_idx=padding_idx, eps=group["eps"])

    def _dense_step(self, group, p, grad):
        state = self._state_sum(group, p, rowwise=False)
        if group["weight_decay"]:
            grad = grad.add(p, alpha=group["weight_decay"])
        g = grad.to(state.dtype)
        state.addcmul_(g, g)
        update = g / (state.sqrt() + group["eps"])
        p.add_(update.to(p.dtype), alpha=-group["lr"])
