"""Triton kernels for ``din_ops::dice`` and ``din_ops::dice_backward`` (SPEC section 2). The
ground truth is ``din_ops.reference.dice`` (``masked_moments`` + ``dice_pointwise``).

x is viewed as rows ``[R, C]``: ``[N, C]`` (every row valid) or ``[B, T, C]`` where row
``b * T + t`` is valid iff ``t < lengths[b]``. Tiles are ``BLOCK_R`` rows by ``BLOCK_C`` channels.

Forward (training), one read of x for the statistics, one for the transform:
  1. ``_stats_kernel``: program (part, channel block) walks its ``tiles_per_part`` row tiles; per
     tile the moments of the valid rows (count, mean, M2 by two passes over the tile in
     registers) are merged into the part's running moments with Chan's formula.
  2. ``_stats_combine_kernel``: one program per channel block merges all parts at once in
     fixed-size chunks: ``mean = sum n_p mean_p / n``, then
     ``M2 = sum M2_p + sum n_p (mean_p - mean)^2`` (no ``E[x^2] - E[x]^2`` cancellation).
  3. ``_transform_kernel``: ``y = x (alpha + (1 - alpha) p)`` on every row, padding included.
Backward, two reads of (x, grad_y):
  1. ``_bwd_reduce_kernel``: per part, sums over every row of ``g x (1 - p)`` (alpha),
     ``h = g x (1 - alpha) p (1 - p)`` (beta) and ``h xhat`` (gamma); ``_sum_parts_kernel``
     adds the parts in chunk order.
  2. ``_bwd_dx_kernel``: ``dx = g (alpha + (1 - alpha) p) + gamma rstd (h - (S_h + xhat S_hx) / n)``,
     the ``S`` terms (through the batch statistics) on valid rows in training only; ``gamma rstd``
     scales after the cancellation, so one valid row gets exactly 0 there.
Every reduction has a fixed shape and order (parts depend on R only), so runs are bitwise
reproducible; no atomics.

fp16/bf16 are upcast right after loading; accumulation is fp32 (fp64 for fp64 inputs).
Block sizes: ``BLOCK_C`` is C rounded up to a power of two (at most 128); ``BLOCK_R`` fills a
tile of ~4K elements (the interpreter uses ~16K: fewer, larger programs). At most 512 parts.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._library import register_triton, triton_interpret

MAX_PARTS = 512
COMBINE_CHUNK = 64


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _blocks(R, C):
    block_c = max(16, min(128, triton.next_power_of_2(max(C, 1))))
    tile = 16384 if triton_interpret() else 4096
    block_r = max(16, min(256, tile // block_c, triton.next_power_of_2(max(R, 1))))
    return block_r, block_c


def _parts(R, block_r):
    tiles = triton.cdiv(R, block_r)
    tiles_per_part = triton.cdiv(tiles, min(tiles, MAX_PARTS))
    return triton.cdiv(tiles, tiles_per_part), tiles_per_part


@triton.jit
def _row_valid(rows, R, T, len_ptr, HAS_LENGTHS: tl.constexpr):
    in_range = rows < R
    if HAS_LENGTHS:
        b = rows // T
        # clamped into [0, T]: a direct op call skips the host checks (memory-safe either way)
        n = tl.minimum(tl.maximum(tl.load(len_ptr + b, mask=in_range, other=0).to(tl.int64), 0), T)
        return in_range & ((rows - b * T) < n)
    else:
        return in_range


@triton.jit
def _sigmoid_of(x, mu, rstd, ga, be):
    xh = (x - mu) * rstd  # subtract first: exact 0 for a single valid row
    # no clamp: exp(-z) = inf gives p = 0 exactly, and tl.minimum/maximum would turn NaN into a
    # finite p on GPUs
    p = 1.0 / (1.0 + tl.exp(-(ga * xh + be)))
    return xh, p


@triton.jit
def _stats_kernel(x_ptr, len_ptr, cnt_ptr, mean_ptr, m2_ptr, R, C, T, tiles_per_part,
                  HAS_LENGTHS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                  ACC: tl.constexpr):
    part = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    n = tl.zeros([BLOCK_C], dtype=ACC)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    for i in range(0, tiles_per_part):
        # int64 rows: R may pass 2^31 - BLOCK_R, R * C often does
        rows = (part * tiles_per_part + i).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        valid = _row_valid(rows, R, T, len_ptr, HAS_LENGTHS)
        m = valid[:, None] & cmask[None, :]
        x = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=m, other=0.0).to(ACC)
        nt = tl.sum(valid.to(ACC), axis=0)
        mt = tl.sum(x, axis=0) / tl.maximum(nt, 1.0)
        d = tl.where(m, x - mt[None, :], 0.0)
        m2t = tl.sum(d * d, axis=0)
        # Chan's merge; an empty tile leaves the moments unchanged (f = 0). The mean is weighted,
        # not mean + delta f: an inf mean stays inf (the reference's sum / n), not inf - inf
        total = n + nt
        f = nt / tl.maximum(total, 1.0)
        delta = mt - mean
        mean = mean * (n / tl.maximum(total, 1.0)) + mt * f
        m2 = m2 + m2t + delta * delta * n * f
        n = total
    out = part * C + cols
    tl.store(cnt_ptr + out, n, mask=cmask)
    tl.store(mean_ptr + out, mean, mask=cmask)
    tl.store(m2_ptr + out, m2, mask=cmask)


@triton.jit
def _stats_combine_kernel(cnt_ptr, mean_ptr, m2_ptr, out_mean_ptr, out_var_ptr, parts, C,
                          CHUNK: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    n = tl.zeros([BLOCK_C], dtype=ACC)
    s = tl.zeros([BLOCK_C], dtype=ACC)
    for p0 in range(0, parts, CHUNK):
        p = p0 + tl.arange(0, CHUNK)
        m = (p < parts)[:, None] & cmask[None, :]
        off = p[:, None] * C + cols[None, :]
        np_ = tl.load(cnt_ptr + off, mask=m, other=0.0)
        n += tl.sum(np_, axis=0)
        s += tl.sum(np_ * tl.load(mean_ptr + off, mask=m, other=0.0), axis=0)
    mean = s / tl.maximum(n, 1.0)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    for p0 in range(0, parts, CHUNK):
        p = p0 + tl.arange(0, CHUNK)
        m = (p < parts)[:, None] & cmask[None, :]
        off = p[:, None] * C + cols[None, :]
        np_ = tl.load(cnt_ptr + off, mask=m, other=0.0)
        d = tl.load(mean_ptr + off, mask=m, other=0.0) - mean[None, :]
        m2 += tl.sum(tl.load(m2_ptr + off, mask=m, other=0.0) + np_ * d * d, axis=0)
    tl.store(out_mean_ptr + cols, mean, mask=cmask)
    tl.store(out_var_ptr + cols, m2 / tl.maximum(n, 1.0), mask=cmask)


@triton.jit
def _load_params(cols, cmask, mean_ptr, rstd_ptr, alpha_ptr, gamma_ptr, beta_ptr,
                 HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, BLOCK_C: tl.constexpr,
                 ACC: tl.constexpr):
    mu = tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(ACC)
    rstd = tl.load(rstd_ptr + cols, mask=cmask, other=0.0).to(ACC)
    al = tl.load(alpha_ptr + cols, mask=cmask, other=0.0).to(ACC)
    if HAS_GAMMA:
        ga = tl.load(gamma_ptr + cols, mask=cmask, other=0.0).to(ACC)
    else:
        ga = tl.full([BLOCK_C], 1.0, ACC)
    if HAS_BETA:
        be = tl.load(beta_ptr + cols, mask=cmask, other=0.0).to(ACC)
    else:
        be = tl.zeros([BLOCK_C], ACC)
    return mu, rstd, al, ga, be


@triton.jit
def _transform_kernel(x_ptr, y_ptr, mean_ptr, rstd_ptr, alpha_ptr, gamma_ptr, beta_ptr, R, C,
                      HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    m = (rows < R)[:, None] & cmask[None, :]
    mu, rstd, al, ga, be = _load_params(cols, cmask, mean_ptr, rstd_ptr, alpha_ptr, gamma_ptr,
                                        beta_ptr, HAS_GAMMA, HAS_BETA, BLOCK_C, ACC)
    off = rows[:, None] * C + cols[None, :]
    x = tl.load(x_ptr + off, mask=m, other=0.0).to(ACC)
    xh, p = _sigmoid_of(x, mu[None, :], rstd[None, :], ga[None, :], be[None, :])
    # p x + (1 - p) alpha x as p (x - alpha x) + alpha x: NaN at x = +-inf like the reference's
    y = p * (x - al[None, :] * x) + al[None, :] * x
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bwd_reduce_kernel(g_ptr, x_ptr, mean_ptr, rstd_ptr, alpha_ptr, gamma_ptr, beta_ptr, part_ptr,
                       R, C, tiles_per_part, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    part = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mu, rstd, al, ga, be = _load_params(cols, cmask, mean_ptr, rstd_ptr, alpha_ptr, gamma_ptr,
                                        beta_ptr, HAS_GAMMA, HAS_BETA, BLOCK_C, ACC)
    s_a = tl.zeros([BLOCK_C], dtype=ACC)
    s_h = tl.zeros([BLOCK_C], dtype=ACC)
    s_hx = tl.zeros([BLOCK_C], dtype=ACC)
    for i in range(0, tiles_per_part):
        rows = (part * tiles_per_part + i).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        m = (rows < R)[:, None] & cmask[None, :]
        off = rows[:, None] * C + cols[None, :]
        # every row counts (padding too); masked elements load x = g = 0 and add nothing
        x = tl.load(x_ptr + off, mask=m, other=0.0).to(ACC)
        g = tl.load(g_ptr + off, mask=m, other=0.0).to(ACC)
        xh, p = _sigmoid_of(x, mu[None, :], rstd[None, :], ga[None, :], be[None, :])
        gx = g * x
        h = gx * (1.0 - al[None, :]) * p * (1.0 - p)
        s_a += tl.sum(gx * (1.0 - p), axis=0)
        s_h += tl.sum(h, axis=0)
        s_hx += tl.sum(h * xh, axis=0)
    out = part * 3 * C + cols
    tl.store(part_ptr + out, s_a, mask=cmask)
    tl.store(part_ptr + out + C, s_h, mask=cmask)
    tl.store(part_ptr + out + 2 * C, s_hx, mask=cmask)


@triton.jit
def _sum_parts_kernel(part_ptr, out_ptr, parts, W, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr,
                      ACC: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < W
    acc = tl.zeros([BLOCK_C], dtype=ACC)
    for p0 in range(0, parts, CHUNK):
        p = p0 + tl.arange(0, CHUNK)
        m = (p < parts)[:, None] & cmask[None, :]
        acc += tl.sum(tl.load(part_ptr + p[:, None] * W + cols[None, :], mask=m, other=0.0), axis=0)
    tl.store(out_ptr + cols, acc, mask=cmask)


@triton.jit
def _bwd_dx_kernel(g_ptr, x_ptr, dx_ptr, len_ptr, mean_ptr, rstd_ptr, alpha_ptr, gamma_ptr,
                   beta_ptr, k1_ptr, k2_ptr, R, C, T, HAS_LENGTHS: tl.constexpr,
                   STAT_TERMS: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    m = (rows < R)[:, None] & cmask[None, :]
    mu, rstd, al, ga, be = _load_params(cols, cmask, mean_ptr, rstd_ptr, alpha_ptr, gamma_ptr,
                                        beta_ptr, HAS_GAMMA, HAS_BETA, BLOCK_C, ACC)
    off = rows[:, None] * C + cols[None, :]
    x = tl.load(x_ptr + off, mask=m, other=0.0).to(ACC)
    g = tl.load(g_ptr + off, mask=m, other=0.0).to(ACC)
    xh, p = _sigmoid_of(x, mu[None, :], rstd[None, :], ga[None, :], be[None, :])
    oma = 1.0 - al[None, :]
    h = g * x * oma * p * (1.0 - p)
    if STAT_TERMS:
        # d(mean)/dx = 1/n and d(var)/dx = 2 (x - mean) / n reach the valid rows only
        valid = _row_valid(rows, R, T, len_ptr, HAS_LENGTHS)
        k1 = tl.load(k1_ptr + cols, mask=cmask, other=0.0).to(ACC)
        k2 = tl.load(k2_ptr + cols, mask=cmask, other=0.0).to(ACC)
        h += tl.where(valid[:, None], k1[None, :] + k2[None, :] * xh, 0.0)
    dx = g * (al[None, :] + oma * p) + h * (ga * rstd)[None, :]
    tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=m)


# --- launchers (the ops' signatures) ------------------------------------------------------------
# Out-of-range lengths in a direct torch.ops call: an error on CPU tensors (like the C++ kernels),
# clamped in the kernels on CUDA (_row_valid).
_CHECK_CPU_VALUES = True

def _rows(x):
    return x.shape[0] if x.dim() == 2 else x.shape[0] * x.shape[1]


def _check(x, lengths, alpha, gamma, beta, C):
    # cheap invariants re-checked so a direct torch.ops call cannot index out of bounds
    if x.dim() not in (2, 3):
        raise RuntimeError(f"dice: x must be [N, C] or [B, T, C], got {tuple(x.shape)}")
    for name, t in (("alpha", alpha), ("gamma", gamma), ("beta", beta)):
        if t is not None and t.numel() != C:
            raise RuntimeError(f"dice: {name} must have shape [{C}], got {tuple(t.shape)}")
    if lengths is not None and (x.dim() != 3 or lengths.numel() != x.shape[0]):
        raise RuntimeError("dice: lengths must have shape [B] for x [B, T, C]")
    # values only on CPU (the interpreter), where reading them costs no device sync
    if lengths is not None and _CHECK_CPU_VALUES and lengths.device.type == "cpu" and lengths.numel():
        lo, hi, T = int(lengths.min()), int(lengths.max()), x.shape[1]
        if lo < 0 or hi > T:
            raise RuntimeError(f"dice: lengths must lie in [0, T={T}], got values in [{lo}, {hi}]")


def _params(x, alpha, gamma, beta):
    return (alpha.contiguous(), gamma.contiguous() if gamma is not None else alpha,
            beta.contiguous() if beta is not None else alpha)


@register_triton("dice")
def dice(x, lengths, alpha, gamma, beta, running_mean, running_var, training, eps):
    """Dice forward: ``(y, mean, var)``, the statistics of this batch (training) or the running ones.

    Out-of-range ``lengths`` in a direct ``torch.ops.din_ops`` call are clamped into [0, T] in the
    kernels (memory-safe; results for such rows are unspecified), and on CPU tensors rejected
    with a RuntimeError like the C++ kernels; ``din_ops.dice`` rejects them with an error naming
    the argument."""
    C = x.shape[-1]
    _check(x, lengths, alpha, gamma, beta, C)
    R = _rows(x)
    acc = _acc_dtype(x.dtype)
    xc = x.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if training:
        mean = torch.zeros(C, dtype=acc, device=x.device)
        var = torch.zeros(C, dtype=acc, device=x.device)
    else:
        if running_mean is None or running_var is None:
            raise RuntimeError("dice: eval mode needs running_mean and running_var")
        if running_mean.numel() != C or running_var.numel() != C:
            raise RuntimeError(f"dice: running statistics must have shape [{C}]")
        mean = running_mean.to(acc, copy=True).reshape(C)
        var = running_var.to(acc, copy=True).reshape(C)
    if R == 0 or C == 0:
        return y, mean, var
    ACC = _tl_acc(x.dtype)
    block_r, block_c = _blocks(R, C)
    c_blocks = triton.cdiv(C, block_c)
    if training:
        T = x.shape[1] if x.dim() == 3 else R
        lens = lengths.contiguous() if lengths is not None else xc
        parts, tiles_per_part = _parts(R, block_r)
        cnt = torch.empty(parts, C, dtype=acc, device=x.device)
        pmean = torch.empty(parts, C, dtype=acc, device=x.device)
        pm2 = torch.empty(parts, C, dtype=acc, device=x.device)
        _stats_kernel[(parts, c_blocks)](
            xc, lens, cnt, pmean, pm2, R, C, T, tiles_per_part, HAS_LENGTHS=lengths is not None,
            BLOCK_R=block_r, BLOCK_C=block_c, ACC=ACC)
        _stats_combine_kernel[(triton.cdiv(C, 32),)](
            cnt, pmean, pm2, mean, var, parts, C, CHUNK=COMBINE_CHUNK, BLOCK_C=32, ACC=ACC)
    rstd = (var + eps).rsqrt()
    a, g, b = _params(x, alpha, gamma, beta)
    _transform_kernel[(triton.cdiv(R, block_r), c_blocks)](
        xc, y, mean, rstd, a, g, b, R, C, HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None,
        BLOCK_R=block_r, BLOCK_C=block_c, ACC=ACC)
    return y, mean, var


@register_triton("dice_backward")
def dice_backward(grad_y, x, lengths, alpha, gamma, beta, mean, var, training, eps):
    """Dice backward: ``(dx, dalpha, dgamma, dbeta)``.

    Out-of-range ``lengths`` in a direct ``torch.ops.din_ops`` call are clamped into [0, T] in the
    kernels (memory-safe; results for such rows are unspecified), and on CPU tensors rejected
    with a RuntimeError like the C++ kernels; ``din_ops.dice`` rejects them with an error naming
    the argument."""
    C = x.shape[-1]
    _check(x, lengths, alpha, gamma, beta, C)
    if mean.numel() != C or var.numel() != C or grad_y.shape != x.shape:
        raise RuntimeError("dice_backward: mean/var must have shape [C] and grad_y the shape of x")
    R = _rows(x)
    acc = _acc_dtype(x.dtype)
    xc = x.contiguous()
    gc = grad_y.to(x.dtype).contiguous()
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    sums = torch.zeros(3 * C, dtype=acc, device=x.device)
    mean = mean.to(acc).contiguous().reshape(C)
    rstd = (var.to(acc).reshape(C) + eps).rsqrt()
    a, g, b = _params(x, alpha, gamma, beta)
    has_g, has_b = gamma is not None, beta is not None
    if R > 0 and C > 0:
        ACC = _tl_acc(x.dtype)
        block_r, block_c = _blocks(R, C)
        c_blocks = triton.cdiv(C, block_c)
        parts, tiles_per_part = _parts(R, block_r)
        partial = torch.empty(parts, 3 * C, dtype=acc, device=x.device)
        _bwd_reduce_kernel[(parts, c_blocks)](
            gc, xc, mean, rstd, a, g, b, partial, R, C, tiles_per_part, HAS_GAMMA=has_g,
            HAS_BETA=has_b, BLOCK_R=block_r, BLOCK_C=block_c, ACC=ACC)
        _sum_parts_kernel[(triton.cdiv(3 * C, 32),)](
            partial, sums, parts, 3 * C, CHUNK=COMBINE_CHUNK, BLOCK_C=32, ACC=ACC)
        s_h, s_hx = sums[C:2 * C], sums[2 * C:]
        if training:
            # n on the device: no host synchronization; n = 0 has no valid row to receive k1, k2
            if lengths is not None:  # clamped as in _row_valid
                n = lengths.clamp(0, x.shape[1]).sum().to(acc)
            else:
                n = torch.full((), R, dtype=acc, device=x.device)
            f = -1.0 / n.clamp_min(1)  # gamma rstd is applied in the kernel, after h + k1
            k1, k2 = (f * s_h).contiguous(), (f * s_hx).contiguous()
        else:
            k1 = k2 = rstd
        T = x.shape[1] if x.dim() == 3 else R
        lens = lengths.contiguous() if lengths is not None else xc
        _bwd_dx_kernel[(triton.cdiv(R, block_r), c_blocks)](
            gc, xc, dx, lens, mean, rstd, a, g, b, k1, k2, R, C, T,
            HAS_LENGTHS=lengths is not None, STAT_TERMS=bool(training), HAS_GAMMA=has_g,
            HAS_BETA=has_b, BLOCK_R=block_r, BLOCK_C=block_c, ACC=ACC)
    zeros = torch.zeros(C, dtype=alpha.dtype, device=x.device)
    return (dx, sums[:C].to(alpha.dtype).reshape(alpha.shape),
            sums[2 * C:].to(gamma.dtype).reshape(gamma.shape) if has_g else zeros,
            sums[C:2 * C].to(beta.dtype).reshape(beta.shape) if has_b else zeros.clone())
