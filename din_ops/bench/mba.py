"""Providers for benchmarking the fused MBA sparse update (SPEC section 3, paper eq. 2.4).

A batch of B users with histories of lengths uniform in 1..T looks up ``M = sum(lengths)`` rows
of an item-embedding table ``[E, D]`` (Zipf-distributed item ids: a few hot items occur many
times per batch); ``grad [M, D]`` is what ``nn.Embedding(sparse=True)`` yields. One step
regularizes and updates the present rows in place.

- ``eager``: what a PyTorch user writes: coalesce the batch (``torch.unique`` with the inverse),
  segment-sum the duplicate rows with ``index_add_`` (in float32 for half-precision gradients),
  gather the present rows, the regularized update (float32), ``index_copy_`` back.
- ``eager_sparse``: the same starting from the sparse COO gradient's ``.coalesce()``, as
  ``nn.Embedding(sparse=True)`` + an optimizer does.
- ``compile``: ``torch.compile(dynamic=True)`` of ``eager``: the number of distinct rows changes
  every batch, so static shapes would recompile at every step of a training loop (``unique``'s
  data-dependent shape splits the graph; the elementwise update is fused).
- ``din_ops``: ``din_ops.mba_sparse_update_``.

Modes are the optimizers: ``sgd`` and ``adagrad_rowwise`` (one accumulator per row). The update
is applied to the same table again and again; ``lr`` and ``lam`` are small, so it stays finite.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, Optional

import torch

import din_ops
from din_ops import reference as R

from .common import OpBench, compile_fn, rel_err, tolerance

LR, LAM, EPS = 1e-3, 1e-4, 1e-10
# The correctness check takes one step with a large rate and penalty, so that a wrong
# regularization or duplicate sum changes the result by far more than rounding does.
CHECK_LR, CHECK_LAM = 5.0, 20.0
ZIPF_S = 1.05


@dataclasses.dataclass
class Case:
    weight: torch.Tensor       # [E, D]
    indices: torch.Tensor      # [M] int64
    grad: torch.Tensor         # [M, D]
    freq: torch.Tensor         # [E] int64
    state: torch.Tensor        # [E] float32 (float64 for float64 tables): row-wise Adagrad
    B: int
    T: int
    distinct: int              # distinct indices in the batch
    dist: str = "zipf"

    @property
    def dtype(self):
        return self.weight.dtype


def zipf_indices(M: int, E: int, generator: torch.Generator, s: float = ZIPF_S) -> torch.Tensor:
    """``M`` ids in ``[0, E)`` with Zipf(s) popularity, hot ids scattered over the table."""
    p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** s
    cdf = torch.cumsum(p / p.sum(), 0)
    ranks = torch.searchsorted(cdf, torch.rand(M, generator=generator, dtype=torch.float64)).clamp_max(E - 1)
    return torch.randperm(E, generator=generator)[ranks]


def make_case(B=2048, T=100, D=36, E=1_000_000, dtype=torch.float32, device="cpu", seed=0,
              M: Optional[int] = None, dist: str = "zipf") -> Case:
    """``M`` defaults to the batch's history positions (lengths uniform in 1..T); ``dist``:
    ``zipf`` (hot items) or ``uniform`` ids."""
    g = torch.Generator().manual_seed(seed)
    n_pos = int(torch.randint(1, T + 1, (B,), generator=g).sum())
    M = n_pos if M is None else M
    if dist == "zipf":
        indices = zipf_indices(M, E, g)
    elif dist == "uniform":
        indices = torch.randint(0, E, (M,), generator=g)
    else:
        raise ValueError(f"dist must be 'zipf' or 'uniform', got {dist!r}")
    return Case(
        weight=(0.01 * torch.randn(E, D, generator=g)).to(device=device, dtype=dtype),
        indices=indices.to(device),
        grad=(1e-3 * torch.randn(M, D, generator=g)).to(device=device, dtype=dtype),
        freq=torch.randint(0, 1000, (E,), generator=g).to(device),
        state=torch.zeros(E, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32),
        B=B, T=T, distinct=int(torch.unique(indices).numel()), dist=dist,
    )


def _rows_update(weight, uniq, g, freq, state, optimizer, lr, lam):
    w = weight.index_select(0, uniq)
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    w32 = w.to(acc)
    n = freq.index_select(0, uniq).to(acc).clamp_min(1)
    r = g.to(acc) + (lam / n)[:, None] * w32
    if optimizer == "sgd":
        w32 = w32 - lr * r
    else:  # adagrad_rowwise
        s = state.index_select(0, uniq).to(acc) + (r * r).mean(1)
        state.index_copy_(0, uniq, s.to(state.dtype))
        w32 = w32 - lr * r / (s.sqrt() + EPS)[:, None]
    weight.index_copy_(0, uniq, w32.to(weight.dtype))


def eager_update(weight, indices, grad, freq, state, optimizer: str, lr: float = LR, lam: float = LAM):
    uniq, inverse = torch.unique(indices, return_inverse=True)
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32  # hot rows sum thousands
    g = torch.zeros(uniq.numel(), weight.shape[1], dtype=acc, device=grad.device)
    g.index_add_(0, inverse, grad.to(acc))
    _rows_update(weight, uniq, g, freq, state, optimizer, lr, lam)


def eager_sparse_update(weight, indices, grad, freq, state, optimizer: str, lr: float = LR,
                        lam: float = LAM):
    sp = torch.sparse_coo_tensor(indices[None], grad, weight.shape, check_invariants=False).coalesce()
    _rows_update(weight, sp._indices()[0], sp._values(), freq, state, optimizer, lr, lam)


def din_update(weight, indices, grad, freq, state, optimizer: str, lr: float = LR, lam: float = LAM):
    din_ops.mba_sparse_update_(weight, indices, grad, freq, lr=lr, lam=lam, optimizer=optimizer,
                               state=state if optimizer != "sgd" else None, eps=EPS)


_compiled: Dict[str, Callable] = {}


def compiled_update(*args):
    if "fn" not in _compiled:
        _compiled["fn"] = compile_fn(eager_update, dynamic=True)
    return _compiled["fn"](*args)


UPDATES: Dict[str, Callable] = {
    "eager": eager_update,
    "eager_sparse": eager_sparse_update,
    "compile": compiled_update,
    "din_ops": din_update,
}


def reference_update(weight, indices, grad, freq, state, optimizer: str, lr: float = LR, lam: float = LAM):
    R.mba_sparse_update_(weight, indices, grad, freq, lr=lr, lam=lam, optimizer=optimizer,
                         state=state if optimizer != "sgd" else None, eps=EPS)


def _provider(update):
    def run(c: Case, optimizer: str, lr: float = LR, lam: float = LAM):
        update(c.weight, c.indices, c.grad, c.freq, c.state, optimizer, lr, lam)
    return run


PROVIDERS: Dict[str, Callable] = {name: _provider(fn) for name, fn in UPDATES.items()}


def flops(c: Case, mode: str) -> float:
    """Summing the duplicate rows (``M*D``), then per present element: the regularization and the
    SGD step (4), row-wise Adagrad adds the squared mean and the scaling (4)."""
    M, D = c.grad.shape
    return M * D + c.distinct * D * (4 if mode == "sgd" else 8)


def bytes_moved(c: Case, mode: str) -> float:
    """Fewest bytes: read the indices and the gradient rows, read and write the present rows,
    read their frequencies (and read and write their Adagrad state)."""
    M, D = c.grad.shape
    e = c.weight.element_size()
    b = M * (c.indices.element_size() + D * e) + c.distinct * (2 * D * e + c.freq.element_size())
    if mode != "sgd":
        b += c.distinct * 2 * c.state.element_size()
    return float(b)


class MBABench(OpBench):
    name = "mba_update"
    modes = ("sgd", "adagrad_rowwise")
    train_modes = ("sgd", "adagrad_rowwise")
    providers = PROVIDERS

    def case_key(self, shape):
        return (shape["B"], shape["T"], shape["D"], shape.get("E", 1_000_000), shape.get("M"),
                shape.get("dist", "zipf"))

    def make_case(self, shape, dtype, device, seed=0):
        return make_case(B=shape["B"], T=shape["T"], D=shape["D"], E=shape.get("E", 1_000_000),
                         dtype=dtype, device=device, seed=seed, M=shape.get("M"),
                         dist=shape.get("dist", "zipf"))

    def shape_dict(self, c):
        E, D = c.weight.shape
        return dict(B=c.B, T=c.T, D=D, E=E, M=c.grad.shape[0], U=c.distinct)

    def shape_str(self, c):
        E, D = c.weight.shape
        return f"B={c.B} T={c.T} D={D} E={E} M={c.grad.shape[0]} U={c.distinct}" + \
            ("" if c.dist == "zipf" else f" {c.dist}")

    def step(self, provider, c, mode):
        fn = self.providers[provider]
        if mode not in self.modes:
            raise ValueError(f"{self.name}: unknown mode {mode!r}")

        def run():
            with torch.no_grad():
                fn(c, mode)
        return run

    def check(self, provider, c, mode):
        """One step of the case's batch from the same table and state as the reference, on a
        copy of the batch's rows plus up to 4096 other rows (a full-table copy per check would
        cost more than the benchmark). The other rows must not change at all (weight and
        state); the changes of the present rows are compared with the reference's."""
        acc = torch.float64 if c.weight.dtype == torch.float64 else torch.float32
        E, dev = c.weight.shape[0], c.weight.device
        with torch.no_grad():
            rows = torch.unique(c.indices)
            present = torch.zeros(E, dtype=torch.bool, device=dev)
            present[rows] = True
            g = torch.Generator().manual_seed(1)
            cand = torch.randperm(E, generator=g)[: rows.numel() + 4096].to(dev)
            others = cand[~present[cand]][:4096]
            sub_rows, _ = torch.sort(torch.cat([rows, others]))
            is_batch = present[sub_rows]
            w0, s0 = c.weight[sub_rows], c.state[sub_rows]
            mine = dataclasses.replace(c, weight=w0.clone(), state=s0.clone(),
                                       indices=torch.searchsorted(sub_rows, c.indices), freq=c.freq[sub_rows])
            self.providers[provider](mine, mode, CHECK_LR, CHECK_LAM)
            moved = (mine.weight != w0).any(1) | (mine.state != s0)
            if bool((moved & ~is_batch).any()):
                return math.inf, tolerance(c.dtype, dev)  # wrote a row that is not in the batch
            ref_w, ref_s = w0.to(acc, copy=True), s0.clone()
            reference_update(ref_w, mine.indices, c.grad.to(acc), mine.freq, ref_s, mode, CHECK_LR, CHECK_LAM)
            w0 = w0.to(acc)
            err = rel_err(mine.weight.to(acc)[is_batch] - w0[is_batch], ref_w[is_batch] - w0[is_batch])
            if mode != "sgd":
                err = max(err, rel_err(mine.state[is_batch] - s0[is_batch], ref_s[is_batch] - s0[is_batch]))
        return err, tolerance(c.dtype, dev)

    def flops(self, c, mode):
        return flops(c, mode)

    def bytes_moved(self, c, mode):
        return bytes_moved(c, mode)

    def available(self, provider, device):
        if provider == "din_ops" and not hasattr(din_ops, "mba_sparse_update_"):
            return "din_ops.mba_sparse_update_ is not in this build"
        return None


BENCH = MBABench()
