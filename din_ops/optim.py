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
``n_j == 0`` is treated as 1. The online counts see the gradient's entries, and a coalesced
gradient has one entry per distinct id: :func:`din_ops.embedding_attention_pooling` (which
``din_ops.models.DIN`` uses for the history) gives one per distinct id of the batch, and autograd
may merge entries when it adds two sparse gradients of one table. For the paper's ``n_j``
(occurrences in the training set) give the counts: :func:`din_ops.count_frequencies`,
``DIN.frequencies`` or :class:`din_ops.FrequencyCounter`.

``padding_idx`` (the embeddings' padding row, never updated) is set per group or through
``padding_idx={param: idx}``; :func:`embedding_padding` collects it from a model's
``nn.Embedding`` modules.

``step`` does not synchronize with a CUDA device: the value checks of the sparse gradients'
indices (and of float frequencies) are device-side asserts, or skipped, as
:func:`din_ops.set_cuda_value_checks` says; the online counts and the MBA update run on the
device.

Checkpoints: ``state_dict()`` holds the state (online counts, Adagrad sums) and the param groups
with their ``frequencies`` and ``padding_idx`` (per-parameter dicts are keyed by parameter index,
so ``torch.load(..., weights_only=True)`` reads it). ``load_state_dict`` keeps every state tensor
in its saved dtype (int64 counts, float32 sums of fp16/bf16 tables) and only moves it to the
parameter's device, so training resumes bit-identically. ``frequencies`` given to the
constructor are not part of the checkpoint: pass them again.
"""
from __future__ import annotations

import copy
from typing import Dict, Optional

import torch
from torch import nn

from . import _library as lib
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


def _check_frequencies(value, name: str):
    """``frequencies``: a counts tensor, or a dict ``{param: counts [param.shape[0]]}``."""
    if isinstance(value, torch.Tensor):
        lib.check_tensor(value, name, dims=1)
        if value.dtype not in _mba.FREQ_DTYPES:
            raise ValueError(f"{name} must be int32, int64, float32 or float64, got {value.dtype}")
        return
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a counts tensor or a dict {{param: counts tensor}}, "
                        f"got {type(value).__name__}")
    for i, (p, n) in enumerate(value.items()):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{name} must be keyed by parameters (tensors), got a key of type {type(p).__name__}")
        what = f"{name}[{i}] (for the parameter of shape {tuple(p.shape)})"
        lib.check_tensor(n, what, dims=1, device=p.device)
        if n.dtype not in _mba.FREQ_DTYPES:
            raise ValueError(f"{what} must be int32, int64, float32 or float64, got {n.dtype}")
        if p.dim() and n.shape[0] != p.shape[0]:
            raise ValueError(f"{what} must have shape [{p.shape[0]}] (one count per row), got {tuple(n.shape)}")


def _check_counts(p, counts):
    if not (isinstance(counts, torch.Tensor) and counts.dtype == torch.int64
            and tuple(counts.shape) == (p.shape[0],) and counts.device == p.device):
        got = (f"{counts.dtype} of shape {tuple(counts.shape)} on {counts.device}"
               if isinstance(counts, torch.Tensor) else type(counts).__name__)
        raise ValueError(f"state['frequency'] (the online counts) must be int64 of shape [{p.shape[0]}] "
                         f"on {p.device}, got {got}")


class _MBAOptimizer(torch.optim.Optimizer):
    def __init__(self, params, defaults, frequencies, padding_idx):
        if frequencies is not None and not isinstance(frequencies, dict):
            raise TypeError("frequencies must be a dict {param: counts tensor} (or set it per param group)")
        if padding_idx is not None and not isinstance(padding_idx, (int, dict)):
            raise TypeError("padding_idx must be an int, a dict {param: int} or None")
        if frequencies is not None:
            _check_frequencies(frequencies, "frequencies")
        self._frequencies = frequencies or {}
        defaults = dict(defaults, padding_idx=padding_idx, frequencies=None)
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        try:
            self._check_group_config(self.param_groups[-1])
        except Exception:
            self.param_groups.pop()
            raise

    def _check_group_config(self, group):
        """A group's settings, checked when it is added."""
        self._check_group(group)
        pad = group["padding_idx"]
        if isinstance(pad, bool) or (pad is not None and not isinstance(pad, (int, dict))):
            raise TypeError(f"padding_idx must be an int, a dict {{param: int}} or None, got {type(pad).__name__}")
        if isinstance(pad, dict):
            for p in group["params"]:
                v = _lookup(pad, p)
                if v is not None:
                    _mba._check_padding_idx(v, p.shape[0] if p.dim() else 1)
        if group["frequencies"] is not None:
            _check_frequencies(group["frequencies"], "frequencies")

    def _check_group(self, group):
        _mba._check_number(group["lr"], "lr")
        _mba._check_number(group["lam"], "lam")
        _mba._check_number(group["weight_decay"], "weight_decay")

    def _check_step(self):
        """Everything ``step`` checks, for every parameter, before any parameter or count changes."""
        for group in self.param_groups:
            self._check_group(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    indices, values = self._sparse_parts(p, p.grad)
                    freq = self._given_frequencies(group, p)
                    if freq is None:
                        counts = self.state[p].get("frequency") if p in self.state else None
                        if counts is not None:
                            _check_counts(p, counts)
                        # a stand-in with the counts' shape and dtype (no allocation)
                        freq = counts if counts is not None else torch.zeros(
                            (), dtype=torch.int64, device=p.device).expand(p.shape[0])
                    _mba.check_mba_update_args(p, indices, values, freq, self._sparse_state(group, p),
                                               group["lr"], group["lam"], self._sparse_optimizer(group),
                                               self._padding(group, p), group.get("eps", 1e-10))
                else:
                    self._check_dense(group, p)

    def _sparse_optimizer(self, group) -> str:
        return "sgd"

    def _sparse_state(self, group, p):
        return None

    def _check_dense(self, group, p):
        pass

    def _given_frequencies(self, group, p):
        given = _lookup(group["frequencies"], p)
        return _lookup(self._frequencies, p) if given is None else given

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
        flat = indices.to(torch.int64)  # counts and range were checked by _check_step
        if padding_idx is None:
            counts.index_add_(0, flat, torch.ones_like(flat))
        else:  # the padding row is added 0: a boolean mask would need its size on the host
            counts.index_add_(0, flat, (flat != padding_idx % p.shape[0]).to(torch.int64))
        return counts

    def state_dict(self):
        sd = super().state_dict()
        for group, packed in zip(self.param_groups, sd["param_groups"]):
            for key in ("frequencies", "padding_idx"):
                value = packed.get(key)
                if isinstance(value, dict):
                    # tensor keys do not survive a save: key by the parameter index instead
                    by_id = {}
                    for p, i in zip(group["params"], packed["params"]):
                        v = _lookup(value, p)
                        if v is not None:
                            by_id[i] = v
                    packed[key] = by_id
        return sd

    def load_state_dict(self, state_dict):
        saved_groups = state_dict["param_groups"]
        restored = {}
        if len(saved_groups) == len(self.param_groups) and all(
                len(sg["params"]) == len(g["params"]) for sg, g in zip(saved_groups, self.param_groups)):
            id_map = {i: q for sg, group in zip(saved_groups, self.param_groups)
                      for i, q in zip(sg["params"], group["params"])}
            # torch casts floating-point state to the parameter's dtype (int64 counts would become
            # float, float32 sums of bf16 tables bf16): keep the saved dtypes, copy to the device;
            # checked before anything is replaced
            for k, st in state_dict["state"].items():
                p = id_map.get(k)
                if p is not None:
                    restored[p] = {name: self._restore_state(p, name, v) for name, v in st.items()}
        super().load_state_dict(state_dict)  # also raises on mismatched groups
        for p, st in restored.items():
            self.state[p] = st
        for sg, group in zip(saved_groups, self.param_groups):
            pmap = dict(zip(sg["params"], group["params"]))
            for key in ("frequencies", "padding_idx"):
                value = group.get(key)
                if isinstance(value, dict):
                    group[key] = {pmap[i]: self._to_device(v, pmap[i]) for i, v in value.items() if i in pmap}
                elif isinstance(value, torch.Tensor) and group["params"]:
                    group[key] = self._to_device(value, group["params"][0])

    @staticmethod
    def _to_device(v, p):
        return v.to(device=p.device) if isinstance(v, torch.Tensor) else v

    @staticmethod
    def _restore_state(p, name, v):
        if not isinstance(v, torch.Tensor):
            return copy.deepcopy(v)
        v = v.detach().to(device=p.device, copy=True)
        if name == "frequency":
            if v.dtype != torch.int64 or tuple(v.shape) != (p.shape[0],):
                raise ValueError(f"state['frequency'] must be int64 of shape [{p.shape[0]}], "
                                 f"got {v.dtype} of shape {tuple(v.shape)}")
        elif name == "sum":
            if not v.is_floating_point() or tuple(v.shape) not in (tuple(p.shape), tuple(p.shape[:1])):
                raise ValueError(f"state['sum'] must be floating point of shape {tuple(p.shape)} "
                                 f"(or [{p.shape[0] if p.dim() else 1}] row-wise), got {v.dtype} "
                                 f"of shape {tuple(v.shape)}")
        return v

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
        self._check_step()
        for group in self.param_groups:
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
        if not isinstance(rowwise, (bool, int)):
            raise TypeError(f"rowwise must be a bool, got {type(rowwise).__name__}")
        defaults = dict(lr=lr, lam=lam, rowwise=bool(rowwise), eps=eps,
                        initial_accumulator_value=initial_accumulator_value, weight_decay=weight_decay)
        super().__init__(params, defaults, frequencies, padding_idx)

    def _check_group(self, group):
        super()._check_group(group)
        _mba._check_number(group["eps"], "eps", positive=True)
        _mba._check_number(group["initial_accumulator_value"], "initial_accumulator_value")
        if not isinstance(group["rowwise"], bool):
            raise TypeError(f"rowwise must be a bool, got {type(group['rowwise']).__name__}")

    def _sparse_optimizer(self, group) -> str:
        return "adagrad_rowwise" if group["rowwise"] else "adagrad"

    def _sparse_state(self, group, p):
        return self._state_sum(group, p, group["rowwise"])

    def _check_dense(self, group, p):
        st = self.state[p].get("sum") if p in self.state else None
        if st is not None:
            lib.check_tensor(st, "state['sum']", device=p.device, floating=True)
            if st.shape != p.shape:
                raise ValueError(f"state['sum'] must have the parameter's shape {tuple(p.shape)}, "
                                 f"got {tuple(st.shape)}")

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
