"""Triton kernels for mini-batch aware regularization (SPEC section 3): ``din_ops::mba_sparse_update_``,
``din_ops::mba_penalty`` and ``din_ops::mba_penalty_backward``. The ground truth is
``din_ops.reference.mba_sparse_update_`` / ``mba_penalty`` (paper eq. 2.4 / 2.3).

Design
------
* The launcher groups the batch on the host side with torch: a stable ``torch.sort`` of the
  indices gives the permutation of positions, ``torch.unique_consecutive`` the distinct rows and
  their occurrence counts, so segment s (row ``rows[s]``) owns positions
  ``perm[starts[s] : starts[s] + counts[s]]`` in ascending order. The padding row's segment is
  dropped.
* Update kernel: one program per block of ``SEGS`` segments. For each segment it sums the grad
  rows of its occurrences ``BLOCK_K`` at a time into a ``[BLOCK_K, BLOCK_D]`` register tile
  (lane k holds occurrences k, k + BLOCK_K, ...) then reduces the lanes (fixed tree), adds
  ``lam / max(n_j, 1) * w_j``, applies the optimizer step and writes the row (and its state) in
  place. No atomics: each row belongs to exactly one program, so results are deterministic and
  rows outside the batch are never touched. Rows wider than ``BLOCK_D`` are done in chunks;
  row-wise Adagrad then needs two passes (sum of squares first).
* Hot rows (more than ``PIECE`` occurrences, e.g. the head of a Zipf distribution) are summed in
  two levels: one program per piece of ``PIECE`` occurrences writes an fp32 partial row, then
  the row's program sums its pieces in order. Fixed pieces keep the result deterministic.
* GPU cost (H200, 1M x 64 fp32, 200k indices): ~1.3-1.6 ms per step against ~0.5-0.8 ms for the
  eager torch.unique/index_add_/index_copy_ chain: the kernels are not the bottleneck, the
  launcher is (sort, unique_consecutive and the hot-row bookkeeping cost several small kernels
  and host synchronizations). A fully device-side segmentation (run starts and ends by
  cummax/cummin, no syncs) measured slower (~2 ms) and was not kept.
* Penalty: one program per block of distinct rows writes ``||w_j||^2 / max(n_j, 1)`` per row;
  the host sums them (``torch.sum``: fixed order). Its backward writes
  ``grad * lam / max(n_j, 1) * w_j`` on the present rows of a zero tensor.

Numerics: fp16/bf16 are upcast right after loading, everything accumulates in fp32 (fp64 for
fp64 tables); ``lr``, ``lam`` and ``eps`` reach the kernel through a small tensor in the
accumulation dtype so fp64 keeps them exactly.

Heuristics: ``BLOCK_D`` is D rounded up to a power of two (at most 1024; wider rows loop);
``BLOCK_K`` keeps the tile near 2048 elements. On a GPU a program handles one segment (the grid
is the number of present rows); under the interpreter (CPU tensors, ~ms per program) segments
are packed into at most 8 programs.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._library import register_triton

_OPT = {"sgd": 0, "adagrad": 1, "adagrad_rowwise": 2}
_MAX_BLOCK_D = 1024


@triton.jit
def _segment_grad(grad_ptr, perm_ptr, start, cnt, d0, D, offs_k, offs_d, dmask,
                  ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=ACC)
    for k0 in range(0, cnt, BLOCK_K):
        kk = k0 + offs_k
        kmask = kk < cnt
        pos = tl.load(perm_ptr + start + kk, mask=kmask, other=0).to(tl.int64)  # M * D may pass 2^31
        g = tl.load(grad_ptr + pos[:, None] * D + (d0 + offs_d)[None, :],
                    mask=kmask[:, None] & dmask[None, :], other=0.0).to(ACC)
        acc += g
    return tl.sum(acc, axis=0)


@triton.jit
def _mba_pieces_kernel(grad_ptr, perm_ptr, piece_start_ptr, piece_cnt_ptr, partial_ptr, D,
                       ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    # one piece (at most PIECE consecutive occurrences of one hot row) per program
    p = tl.program_id(0)
    start = tl.load(piece_start_ptr + p)
    cnt = tl.load(piece_cnt_ptr + p)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        dmask = (d0 + offs_d) < D
        g = _segment_grad(grad_ptr, perm_ptr, start, cnt, d0, D, offs_k, offs_d, dmask, ACC, BLOCK_K, BLOCK_D)
        tl.store(partial_ptr + p.to(tl.int64) * D + d0 + offs_d, g, mask=dmask)


@triton.jit
def _row_grad(grad_ptr, perm_ptr, partial_ptr, ident_ptr, start, cnt, hot, d0, D, offs_k, offs_d, dmask,
              ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    # a hot row sums its pieces' partial sums (in piece order), a cold row its grad rows
    if hot != 0:
        g = _segment_grad(partial_ptr, ident_ptr, start, cnt, d0, D, offs_k, offs_d, dmask, ACC, BLOCK_K, BLOCK_D)
    else:
        g = _segment_grad(grad_ptr, perm_ptr, start, cnt, d0, D, offs_k, offs_d, dmask, ACC, BLOCK_K, BLOCK_D)
    return g


@triton.jit
def _mba_update_kernel(weight_ptr, grad_ptr, state_ptr, freq_ptr, rows_ptr, starts_ptr, counts_ptr,
                       hot_ptr, perm_ptr, partial_ptr, ident_ptr, scalars_ptr, U, D, SEGS,
                       OPT: tl.constexpr, ACC: tl.constexpr, ONE_CHUNK: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    lr = tl.load(scalars_ptr + 0)
    lam = tl.load(scalars_ptr + 1)
    eps = tl.load(scalars_ptr + 2)
    s_begin = pid * SEGS
    s_end = tl.minimum(s_begin + SEGS, U)
    for s in range(s_begin, s_end):
        row = tl.load(rows_ptr + s).to(tl.int64)  # num_embeddings * D may pass 2^31
        start = tl.load(starts_ptr + s)
        cnt = tl.load(counts_ptr + s)
        hot = tl.load(hot_ptr + s)
        # reference: n = freq[j].to(acc).clamp_min(1); lam / n
        n = tl.load(freq_ptr + row).to(ACC)
        n = tl.where(n < 1.0, 1.0, n)  # keeps NaN as clamp_min does (tl.maximum drops it on GPUs)
        c = lam / n
        w_row = weight_ptr + row * D
        if ONE_CHUNK:
            dmask = offs_d < D
            g = _row_grad(grad_ptr, perm_ptr, partial_ptr, ident_ptr, start, cnt, hot, 0, D, offs_k, offs_d,
                          dmask, ACC, BLOCK_K, BLOCK_D)
            w = tl.load(w_row + offs_d, mask=dmask, other=0.0).to(ACC)
            r = g + c * w
            if OPT == 0:
                new = w - lr * r
            elif OPT == 1:
                st = tl.load(state_ptr + row * D + offs_d, mask=dmask, other=0.0).to(ACC) + r * r
                tl.store(state_ptr + row * D + offs_d, st.to(state_ptr.dtype.element_ty), mask=dmask)
                new = w - lr * r / (tl.sqrt(st) + eps)
            else:
                st = tl.load(state_ptr + row).to(ACC) + tl.sum(r * r, axis=0) / D
                tl.store(state_ptr + row, st.to(state_ptr.dtype.element_ty))
                new = w - lr * r / (tl.sqrt(st) + eps)
            tl.store(w_row + offs_d, new.to(weight_ptr.dtype.element_ty), mask=dmask)
        else:
            denom = 1.0
            if OPT == 2:
                sq = tl.sum(tl.zeros([BLOCK_D], dtype=ACC), axis=0)
                for d0 in range(0, D, BLOCK_D):
                    dmask = (d0 + offs_d) < D
                    g = _row_grad(grad_ptr, perm_ptr, partial_ptr, ident_ptr, start, cnt, hot, d0, D, offs_k,
                                  offs_d, dmask, ACC, BLOCK_K, BLOCK_D)
                    w = tl.load(w_row + d0 + offs_d, mask=dmask, other=0.0).to(ACC)
                    r = g + c * w
                    sq += tl.sum(r * r, axis=0)
                st = tl.load(state_ptr + row).to(ACC) + sq / D
                tl.store(state_ptr + row, st.to(state_ptr.dtype.element_ty))
                denom = tl.sqrt(st) + eps
            for d0 in range(0, D, BLOCK_D):
                dmask = (d0 + offs_d) < D
                g = _row_grad(grad_ptr, perm_ptr, partial_ptr, ident_ptr, start, cnt, hot, d0, D, offs_k,
                              offs_d, dmask, ACC, BLOCK_K, BLOCK_D)
                w = tl.load(w_row + d0 + offs_d, mask=dmask, other=0.0).to(ACC)
                r = g + c * w
                if OPT == 0:
                    new = w - lr * r
                elif OPT == 1:
                    sp = state_ptr + row * D + d0 + offs_d
                    st = tl.load(sp, mask=dmask, other=0.0).to(ACC) + r * r
                    tl.store(sp, st.to(state_ptr.dtype.element_ty), mask=dmask)
                    new = w - lr * r / (tl.sqrt(st) + eps)
                else:
                    new = w - lr * r / denom
                tl.store(w_row + d0 + offs_d, new.to(weight_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _mba_penalty_rows_kernel(weight_ptr, freq_ptr, rows_ptr, out_ptr, U, D,
                             ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    offs_s = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    smask = offs_s < U
    rows = tl.load(rows_ptr + offs_s, mask=smask, other=0).to(tl.int64)
    n = tl.load(freq_ptr + rows, mask=smask, other=1).to(ACC)
    n = tl.where(n < 1.0, 1.0, n)  # keeps NaN as clamp_min does
    offs_d = tl.arange(0, BLOCK_D)
    sq = tl.zeros([BLOCK_S], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        m = smask[:, None] & ((d0 + offs_d) < D)[None, :]
        w = tl.load(weight_ptr + rows[:, None] * D + (d0 + offs_d)[None, :], mask=m, other=0.0).to(ACC)
        sq += tl.sum(w * w, axis=1)
    tl.store(out_ptr + offs_s, sq / n, mask=smask)


@triton.jit
def _mba_penalty_backward_kernel(grad_ptr, weight_ptr, freq_ptr, rows_ptr, out_ptr, scalars_ptr, U, D,
                                 ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    offs_s = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    smask = offs_s < U
    rows = tl.load(rows_ptr + offs_s, mask=smask, other=0).to(tl.int64)
    lam = tl.load(scalars_ptr + 1)
    gs = tl.load(grad_ptr).to(ACC)
    n = tl.load(freq_ptr + rows, mask=smask, other=1).to(ACC)
    n = tl.where(n < 1.0, 1.0, n)  # keeps NaN as clamp_min does
    # d/dw_j of (lam / 2) ||w_j||^2 / n_j = lam / n_j * w_j, times the incoming gradient
    c = (lam / n) * gs
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        m = smask[:, None] & ((d0 + offs_d) < D)[None, :]
        off = rows[:, None] * D + (d0 + offs_d)[None, :]
        w = tl.load(weight_ptr + off, mask=m, other=0.0).to(ACC)
        tl.store(out_ptr + off, (c[:, None] * w).to(out_ptr.dtype.element_ty), mask=m)


# --- launchers -------------------------------------------------------------------------------
def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _interpreted(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


def _block_d(D: int) -> int:
    return min(_MAX_BLOCK_D, triton.next_power_of_2(max(D, 1)))


def _check_range(sorted_idx: torch.Tensor, N: int):
    # re-checked here so a direct torch.ops call cannot read or write out of bounds
    lo, hi = int(sorted_idx[0]), int(sorted_idx[-1])
    if lo < 0 or hi >= N:
        raise RuntimeError(f"indices must lie in [0, {N}), got values in [{lo}, {hi}]")


def _check_freq(freq, N):
    """Returns freq contiguous: the kernels index it as ``freq_ptr + row``."""
    if tuple(freq.shape) != (N,):
        raise RuntimeError(f"freq must have shape [{N}], got {tuple(freq.shape)}")
    return freq.contiguous()


def _distinct_rows(indices: torch.Tensor, N: int, padding_idx: Optional[int]):
    uniq = torch.unique(indices.to(torch.int64))  # sorted
    if uniq.numel():
        _check_range(uniq, N)
    if padding_idx is not None:
        uniq = uniq[uniq != padding_idx % N]
    return uniq.contiguous()


@register_triton("mba_sparse_update_")
def mba_sparse_update_triton(weight, indices, grad, freq, state, lr, lam, optimizer, padding_idx, eps):
    if optimizer not in _OPT:
        raise RuntimeError(f"optimizer must be one of {tuple(_OPT)}, got {optimizer!r}")
    N, D = weight.shape
    M = indices.numel()
    if tuple(grad.shape) != (M, D):
        raise RuntimeError(f"grad must have shape [{M}, {D}], got {tuple(grad.shape)}")
    freq = _check_freq(freq, N)
    if (optimizer == "sgd") != (state is None):
        raise RuntimeError("state must be None for 'sgd' and given for the Adagrad optimizers")
    if not weight.is_contiguous() or (state is not None and not state.is_contiguous()):
        raise RuntimeError("weight and state must be contiguous (they are updated in place)")
    if M == 0 or D == 0:
        return
    sorted_idx, perm = torch.sort(indices.to(torch.int64), stable=True)
    _check_range(sorted_idx, N)
    rows, counts = torch.unique_consecutive(sorted_idx, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    if padding_idx is not None:
        keep = rows != padding_idx % N
        rows, counts, starts = rows[keep], counts[keep], starts[keep]
    U = rows.numel()
    if U == 0:
        return
    grad = grad.contiguous()
    acc = _acc(weight.dtype)
    ACC = _tl_acc(weight.dtype)
    scalars = torch.tensor([lr, lam, eps], dtype=acc, device=weight.device)
    BLOCK_D = _block_d(D)
    BLOCK_K = max(1, min(16, 2048 // BLOCK_D))
    starts, counts, hot, partial, ident = _split_hot_rows(grad, perm, starts, counts, D, acc, ACC, BLOCK_K,
                                                          BLOCK_D)
    SEGS = triton.cdiv(U, 8) if _interpreted(weight) else 1
    grid = (triton.cdiv(U, SEGS),)
    _mba_update_kernel[grid](
        weight, grad, weight if state is None else state, freq, rows, starts, counts, hot, perm, partial, ident,
        scalars, U, D, SEGS, OPT=_OPT[optimizer], ACC=ACC, ONE_CHUNK=D <= BLOCK_D,
        BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D)


# Rows hit more than PIECE times are summed in two levels so that one program never walks a long
# run serially (a Zipf-hot row can occur tens of thousands of times in a batch): first every piece
# of PIECE occurrences in parallel, then the row's pieces in order. Fixed pieces: deterministic.
PIECE = 256


def _split_hot_rows(grad, perm, starts, counts, D, acc, ACC, BLOCK_K, BLOCK_D):
    """Returns per row (start, count, hot) into either (perm, grad) or (ident, partial)."""
    npieces = (counts + PIECE - 1) // PIECE
    hot = npieces > 1
    hot_rows = hot.nonzero().squeeze(1)
    if hot_rows.numel() == 0:
        return starts, counts, hot.to(torch.int32), grad, perm
    hp = npieces[hot_rows]
    first = torch.cumsum(hp, 0) - hp
    P = int(hp.sum())
    row_of_piece = torch.repeat_interleave(torch.arange(hot_rows.numel(), device=grad.device), hp,
                                           output_size=P)
    k = torch.arange(P, device=grad.device) - first[row_of_piece]
    piece_start = (starts[hot_rows][row_of_piece] + k * PIECE).contiguous()
    piece_cnt = torch.clamp(counts[hot_rows][row_of_piece] - k * PIECE, max=PIECE).contiguous()
    partial = torch.empty(P, D, dtype=acc, device=grad.device)
    _mba_pieces_kernel[(P,)](grad, perm, piece_start, piece_cnt, partial, D, ACC=ACC, BLOCK_K=BLOCK_K,
                             BLOCK_D=BLOCK_D)
    starts, counts = starts.clone(), counts.clone()
    starts[hot_rows] = first
    counts[hot_rows] = hp
    return starts, counts, hot.to(torch.int32), partial, torch.arange(P, device=grad.device)


def _penalty_blocks(U: int, D: int, interpreted: bool):
    BLOCK_D = _block_d(D)
    if interpreted:
        BLOCK_S = min(triton.next_power_of_2(max(triton.cdiv(U, 8), 1)), max(1, 8192 // BLOCK_D))
    else:
        BLOCK_S = max(1, min(32, 4096 // BLOCK_D))
    return BLOCK_S, BLOCK_D


@register_triton("mba_penalty")
def mba_penalty_triton(weight, indices, freq, lam, padding_idx):
    N, D = weight.shape
    freq = _check_freq(freq, N)
    acc = _acc(weight.dtype)
    rows = _distinct_rows(indices, N, padding_idx) if indices.numel() else indices.new_empty(0, dtype=torch.int64)
    U = rows.numel()
    if U == 0 or D == 0:
        return weight.new_zeros(())
    weight = weight.contiguous()
    per_row = torch.empty(U, dtype=acc, device=weight.device)
    BLOCK_S, BLOCK_D = _penalty_blocks(U, D, _interpreted(weight))
    _mba_penalty_rows_kernel[(triton.cdiv(U, BLOCK_S),)](
        weight, freq, rows, per_row, U, D, ACC=_tl_acc(weight.dtype), BLOCK_S=BLOCK_S, BLOCK_D=BLOCK_D)
    total = per_row.to(torch.float64).sum()
    return (0.5 * lam * total).to(weight.dtype)


@register_triton("mba_penalty_backward")
def mba_penalty_backward_triton(grad, weight, indices, freq, lam, padding_idx):
    N, D = weight.shape
    freq = _check_freq(freq, N)
    if grad.numel() != 1:
        raise RuntimeError(f"grad must hold one value (the penalty is a scalar), got {tuple(grad.shape)}")
    out = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    rows = _distinct_rows(indices, N, padding_idx) if indices.numel() else indices.new_empty(0, dtype=torch.int64)
    U = rows.numel()
    if U == 0 or D == 0:
        return out
    weight = weight.contiguous()
    acc = _acc(weight.dtype)
    scalars = torch.tensor([0.0, lam, 0.0], dtype=acc, device=weight.device)
    BLOCK_S, BLOCK_D = _penalty_blocks(U, D, _interpreted(weight))
    _mba_penalty_backward_kernel[(triton.cdiv(U, BLOCK_S),)](
        grad.reshape(1).contiguous(), weight, freq, rows, out, scalars, U, D, ACC=_tl_acc(weight.dtype),
        BLOCK_S=BLOCK_S, BLOCK_D=BLOCK_D)
    return out
