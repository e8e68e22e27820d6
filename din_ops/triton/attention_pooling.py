"""Triton kernels for ``din_ops::attention_pooling`` and its backward and Dice-statistics ops
(SPEC section 1). The ground truth is ``din_ops.reference.attention_pooling``.

Design
------
* Jobs. One job is one row (user) and a block of ``CB`` of its candidates; jobs are spread over a
  persistent grid of ``num_programs`` programs (``pid, pid + G, ...``). A job streams its history
  tile by tile (``BT`` positions) and evaluates the MLP for all ``BT x CB`` (position, candidate)
  pairs of a tile at once, as ``M = BT * CB`` rows of one matrix product, so the history is read
  from memory once for all candidates of the block (row ``m`` is position ``m // CB``, candidate
  ``m % CB``).
* Layer 0 is folded (SPEC section 1): ``W0 [q, k, q-k, q*k] = (Wq + Wd) q + (Wk - Wd + Wp diag(q)) k``.
  With one candidate per job the folded ``A = Wk - Wd + Wp diag(q)`` is built once per row and
  a tile costs one ``[BT, D] x [D, H0]`` product; with several candidates a tile costs
  ``K (Wk - Wd)^T + (K * q_c) Wp^T`` (two products) plus the per-row constant ``(Wq + Wd) q_c + b0``.
  The ``[.., 4D]`` concatenation is never built.
* Padding. ``D`` and each ``H`` are padded to powers of two (at least 16, the smallest
  ``tl.dot`` operand); padded weight entries load as 0, so padded channels stay 0 through every
  layer and never reach a valid output. Positions past a row's length are masked: they are not
  loaded (0), their scores are discarded, and nothing is written for them except the zeros of
  the padded ``attn`` / ``grad_keys`` layout.
* Softmax is online (running max and sum per candidate, the pooled vector rescaled); the raw
  scores go to ``attn`` (or an fp32 scratch for fp16/bf16) and a second, cheap pass over the
  row's ``[len, C]`` scores writes the normalized weights.
* Backward recomputes the MLP per tile (nothing ``[N, H]`` is stored). Softmax needs
  ``sum_u w_u dw_u`` per candidate first: one extra pass over the row reading keys and weights.
  Per-position results (grad_keys) are written directly; per-(row, candidate) results
  (grad_query part, and ``dc = sum_t dz0_t``) go to ``[B*C, .]`` buffers; everything summed over
  rows (weight, bias, alpha and Dice grads) accumulates in registers per program and is flushed
  once per program. Deterministic mode (``torch.are_deterministic_algorithms_enabled()``, the
  interpreter, or CPU tensors) writes one partial row per program to a ``[num_programs, P]``
  buffer reduced by ``torch.sum`` (fixed order); otherwise programs ``tl.atomic_add`` their row.
  The layer-0 terms through ``c = (Wq + Wd) q + b0`` are finished from ``dc`` by a second,
  small kernel (``_finish_kernel``: ``dWq = (q part of dWd) = dc^T Q`` as per-program partials,
  ``dq += dc (Wq + Wd)``) and ``db0 = sum dc``; no cuBLAS call, so deterministic mode needs no
  ``CUBLAS_WORKSPACE_CONFIG``.
* Statistics (Dice in training): per program a running (count, mean, M2) per channel, merged
  across tiles with Chan's formula (no ``E[z^2] - E[z]^2`` cancellation); the per-program
  partials are merged on the host in float64, in program order.

Numerics
--------
fp16/bf16 are upcast right after loading; every sum, softmax statistic and gradient accumulates
in fp32 (fp64 for fp64 inputs); outputs are cast back to the input dtype.
* fp32 inputs: ``tl.dot`` with ``CONFIG.fp32_precision`` (forward) / ``fp32_precision_bwd``
  (backward, statistics), default ``"tf32"``: TF32 operands (10-bit mantissa), fp32
  accumulation, about 3e-4 relative error (the rate torch's own TF32 matmuls give), inside the
  ~1e-3 budget. ``"tf32x3"`` (three TF32 products, ~fp32 accuracy) doubles the shared memory of
  every product operand: it fits for hidden sizes like (80, 40) and falls back to TF32 where it
  does not (see ``_launch``). Under the interpreter products are exact fp32.
* fp16/bf16 inputs on GPU: product operands in the input dtype (activations and the folded ``A``
  rounded to it, as a PyTorch model in that dtype rounds every layer's output), fp32
  accumulation. Under the interpreter (wrong bf16 arithmetic) they run in fp32.
* fp64 inputs: computed in fp64 throughout (``tl.dot`` fp64, ``"ieee"``); scalars (``scale``,
  ``eps``) reach the kernels as an fp32 (hi, lo) pair so they keep ~48 bits. fp64 operands take
  twice the shared memory: layers as wide as (200, 80, 40) do not fit one SM, and the launch
  then raises a RuntimeError naming the cause (fp64 is for tests and gradchecks).

Block sizes and heuristics (``CONFIG``)
---------------------------------------
* ``block_m`` (forward 64, backward 32) is the number of (position, candidate) rows per tile.
  64 rows cover a typical DIN history (T <= 100, mean ~50) in one or two tiles and make each
  product one 64-row warpgroup MMA; ``BT`` is ``block_m / CB`` shrunk to the next power of two of
  the typical row length (T, or ceil(N/B) for jagged) so short histories do not compute on
  masked rows; ``BT * CB >= 16`` always (smallest ``tl.dot``). The backward keeps ~3x more
  tiles live (activations, their gradients, weight-gradient accumulators), so half the rows.
* ``num_warps`` 8 (forward and backward): ptxas (sm_90a, triton 3.7) gives the forward at
  (D, H) = (36, (80, 40)) 255 registers with 164 bytes of spill per thread at 8 warps and
  976 bytes at 4; the backward spills ~3.5 KB at 8 warps and ~13 KB at 4.
* Weight loads are kept inside the loops on purpose (``_KEEP_IN_LOOP``): hoisted, their
  address tensors alone spilled >1.3 KB per thread in the forward.
* ``max_cb`` (16): candidates per job; more candidates split into several jobs per row (the
  history is then read ``ceil(C / 16)`` times; the backward sums the jobs' grad_keys parts).
* ``programs_per_sm`` (8): the persistent grid is ``min(jobs, SMs * programs_per_sm)``; more
  programs hide latency, fewer shrink the backward's partial-gradient buffer.
* Shared memory per program (sm_90, defaults): forward 64 KiB fp32 / 32 KiB bf16 at (80, 40),
  192 / 96 KiB at (200, 80, 40); backward 88 / 40 KiB and 212 / 128 KiB.
These defaults come from compiler reports, not yet from timings on the GPU:
bench/tune_attention_pooling_triton.py sweeps them (and measures the error) on one.
"""
from __future__ import annotations

import dataclasses
import math
import struct
from typing import List

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .._library import assert_async, config_context, register_triton, triton_interpret, value_check_mode

_ACT = {"sigmoid": 0, "relu": 1, "identity": 2, "prelu": 3, "dice": 4}
MAX_HIDDEN = 4
# Positions within a row are int32 in the kernels (row starts and every element offset are
# int64), so t0 + BT must not wrap.
_MAX_ROW = 2**31 - 2**16


@dataclasses.dataclass
class _Config:
    block_m: int = 64
    block_m_bwd: int = 32
    max_cb: int = 16
    num_warps: int = 8
    num_warps_bwd: int = 8
    num_stages: int = 1
    programs_per_sm: int = 8
    interpreter_programs: int = 3  # under TRITON_INTERPRET every program costs; 3 still strides
    fp32_precision: str = "tf32"
    fp32_precision_bwd: str = "tf32"  # backward and statistics
    use_atomics: bool = True  # only outside deterministic mode


CONFIG = _Config()


configure = config_context(CONFIG, "attention_pooling")


# ------------------------------------------------------------------------------------------------
# jit helpers
# ------------------------------------------------------------------------------------------------
# _KEEP_IN_LOOP: weight loaders take an integer ``z`` that is 0 but not provably so
# (``t0 >= n`` inside the tile loop, ``n < 0`` per row) and add it to their strides and bounds.
# Otherwise the compiler hoists the loop-invariant loads, their address and mask tensors (two
# registers per element of a weight matrix) and their shared-memory copies out of the loops,
# where they stay live: register spills, and with hidden sizes like (200, 80, 40) more shared
# memory than an H100/H200 SM has. Reloading weights hits L1/L2; index math is cheap.
@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _nonfinite(x, AXIS: tl.constexpr):
    # 0, or NaN where x holds an inf or a NaN along AXIS (x - x is 0 only for finite x). An inf in
    # q or k makes the reference's [q, k, q - k, q * k] layer NaN (inf - inf) for weights of mixed
    # sign, where the folded form gives +-inf: layer 0 of such a position is made NaN.
    return tl.sum(x - x, axis=AXIS)


@triton.jit
def _row_extent(b, len_ptr, off_ptr, T, LAYOUT: tl.constexpr):
    # LAYOUT 0: padded, all valid; 1: padded with lengths; 2: jagged with offsets, where T is N
    # (keys' rows). Out-of-range values (a direct op call skips the host checks) are clamped,
    # n into [0, T], start into [0, N] and end into [start, N], so nothing is accessed out of
    # bounds. x - min(x, 0) rather than max(x, 0) keeps n < 0 unprovable (_KEEP_IN_LOOP).
    if LAYOUT == 2:
        lo = tl.load(off_ptr + b).to(tl.int64)
        start = tl.minimum(lo - tl.minimum(lo, 0), T)
        end = tl.minimum(tl.maximum(tl.load(off_ptr + b + 1).to(tl.int64), start), T)
        n = (end - start).to(tl.int32)
    elif LAYOUT == 1:
        start = b.to(tl.int64) * T
        n = tl.minimum(tl.load(len_ptr + b).to(tl.int64), T)
        n = (n - tl.minimum(n, 0)).to(tl.int32)
    else:
        start = b.to(tl.int64) * T
        n = (b * 0 + T).to(tl.int32)
    return start, n


@triton.jit
def _vec(ptr, N, NP: tl.constexpr, ACC: tl.constexpr):
    offs = tl.arange(0, NP)
    return tl.load(ptr + offs, mask=offs < N, other=0).to(ACC)


@triton.jit
def _w0T(w0_ptr, D, H0, part, z, DP: tl.constexpr, HP0: tl.constexpr, ACC: tl.constexpr):
    # block ``part`` (0 q, 1 k, 2 q-k, 3 q*k) of W0 [H0, 4D], transposed: [DP, HP0].
    # ``z``: see _KEEP_IN_LOOP
    Dz = D + z
    d = tl.arange(0, DP)
    h = tl.arange(0, HP0)
    mask = (d[:, None] < Dz) & (h[None, :] < H0 + z)
    return tl.load(w0_ptr + h[None, :] * (4 * Dz) + part * Dz + d[:, None], mask=mask, other=0).to(ACC)


@triton.jit
def _w0(w0_ptr, D, H0, part, z, DP: tl.constexpr, HP0: tl.constexpr, ACC: tl.constexpr):
    # block ``part`` of W0 [H0, 4D] as stored: [HP0, DP]
    Dz = D + z
    d = tl.arange(0, DP)
    h = tl.arange(0, HP0)
    mask = (h[:, None] < H0 + z) & (d[None, :] < Dz)
    return tl.load(w0_ptr + h[:, None] * (4 * Dz) + part * Dz + d[None, :], mask=mask, other=0).to(ACC)


@triton.jit
def _wT(w_ptr, K, N, z, KP: tl.constexpr, NP: tl.constexpr, ACC: tl.constexpr):
    # W [N, K] (nn.Linear layout) transposed: [KP, NP]
    Kz = K + z
    k = tl.arange(0, KP)
    n = tl.arange(0, NP)
    mask = (k[:, None] < Kz) & (n[None, :] < N + z)
    return tl.load(w_ptr + n[None, :] * Kz + k[:, None], mask=mask, other=0).to(ACC)


@triton.jit
def _mm(a, b, DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    return tl.dot(a.to(DOT), b.to(DOT), input_precision=PREC).to(ACC)


@triton.jit
def _layer0(Kx, KQ, C0x, w0, D, H0, z, DP: tl.constexpr, HP0: tl.constexpr, ACC: tl.constexpr,
            DOT: tl.constexpr, PREC: tl.constexpr):
    # z0 = K (Wk - Wd)^T + (K * q) Wp^T + c
    WkdT = _w0T(w0, D, H0, 1, z, DP, HP0, ACC) - _w0T(w0, D, H0, 2, z, DP, HP0, ACC)
    WpT = _w0T(w0, D, H0, 3, z, DP, HP0, ACC)
    return _mm(Kx, WkdT, DOT, PREC, ACC) + _mm(KQ, WpT, DOT, PREC, ACC) + C0x


@triton.jit
def _dense(h, w_ptr, b_ptr, K, N, z, KP: tl.constexpr, NP: tl.constexpr, ACC: tl.constexpr,
           DOT: tl.constexpr, PREC: tl.constexpr):
    return _mm(h, _wT(w_ptr, K, N, z, KP, NP, ACC), DOT, PREC, ACC) + _vec(b_ptr, N, NP, ACC)[None, :]


@triton.jit
def _act_params(a_ptr, m_ptr, v_ptr, g_ptr, e_ptr, H, eps, HP: tl.constexpr, ACT: tl.constexpr,
                HAS_G: tl.constexpr, HAS_BE: tl.constexpr, ACC: tl.constexpr):
    offs = tl.arange(0, HP)
    ok = offs < H
    alpha = tl.zeros([HP], ACC)
    mean = tl.zeros([HP], ACC)
    rstd = tl.zeros([HP], ACC)
    gamma = tl.zeros([HP], ACC) + 1.0
    beta = tl.zeros([HP], ACC)
    if ACT >= 3:  # prelu / dice alpha (prelu [1] alphas arrive expanded to [H])
        alpha = tl.load(a_ptr + offs, mask=ok, other=0).to(ACC)
    if ACT == 4:
        mean = tl.load(m_ptr + offs, mask=ok, other=0).to(ACC)
        var = tl.load(v_ptr + offs, mask=ok, other=1).to(ACC)
        # var -0.0 marks a batch of one valid pair (attention_pooling_stats): the normalized value
        # and its gradient are exactly 0 there, not 1/sqrt(eps) times a rounding residue
        one_pair = (var == 0) & (var.to(tl.float32).to(tl.int32, bitcast=True) < 0)
        rstd = tl.where(one_pair, 0.0, 1.0 / tl.sqrt(var + eps))
        if HAS_G:
            gamma = tl.load(g_ptr + offs, mask=ok, other=0).to(ACC)
        if HAS_BE:
            beta = tl.load(e_ptr + offs, mask=ok, other=0).to(ACC)
    return alpha, mean, rstd, gamma, beta


@triton.jit
def _act_fwd(z, a_ptr, m_ptr, v_ptr, g_ptr, e_ptr, H, eps, HP: tl.constexpr, ACT: tl.constexpr,
             HAS_G: tl.constexpr, HAS_BE: tl.constexpr, ACC: tl.constexpr):
    out = z
    if ACT == 0:
        out = _sigmoid(z)
    elif ACT == 1:
        out = tl.where(z < 0, 0.0, z)  # keeps NaN, as torch.relu (tl.maximum drops it on GPUs)
    elif ACT == 3:
        alpha, mean, rstd, gamma, beta = _act_params(a_ptr, m_ptr, v_ptr, g_ptr, e_ptr, H, eps, HP,
                                                     ACT, HAS_G, HAS_BE, ACC)
        out = tl.where(z >= 0, z, alpha[None, :] * z)
    elif ACT == 4:
        # Dice with the given statistics: f = z * (alpha + (1 - alpha) * p), p = sigmoid(gamma * xhat + beta)
        alpha, mean, rstd, gamma, beta = _act_params(a_ptr, m_ptr, v_ptr, g_ptr, e_ptr, H, eps, HP,
                                                     ACT, HAS_G, HAS_BE, ACC)
        p = _sigmoid((z - mean[None, :]) * rstd[None, :] * gamma[None, :] + beta[None, :])
        # p z + (1 - p) alpha z as p (z - alpha z) + alpha z: NaN at z = +-inf like the reference's
        out = p * (z - alpha[None, :] * z) + alpha[None, :] * z
    return out


@triton.jit
def _act_bwd(dh, z, a_ptr, m_ptr, v_ptr, g_ptr, e_ptr, H, eps, HP: tl.constexpr, ACT: tl.constexpr,
             HAS_G: tl.constexpr, HAS_BE: tl.constexpr, ACC: tl.constexpr):
    # returns dz and the per-element terms of d alpha, of d beta (u) and of d gamma (u * xhat)
    dz = dh
    da = dh
    u = dh
    ux = dh
    if ACT == 0:
        s = _sigmoid(z)
        dz = dh * s * (1.0 - s)
    elif ACT == 1:
        dz = tl.where(z <= 0, 0.0, dh)  # NaN z passes dh, as torch's relu backward
    elif ACT == 3:
        alpha, mean, rstd, gamma, beta = _act_params(a_ptr, m_ptr, v_ptr, g_ptr, e_ptr, H, eps, HP,
                                                     ACT, HAS_G, HAS_BE, ACC)
        # torch.where(z >= 0, z, alpha * z) as autograd sees it: both branches get a gradient,
        # so a NaN alpha (or an inf z) poisons as in the reference
        pos = z >= 0
        dneg = tl.where(pos, 0.0, dh)
        dz = tl.where(pos, dh, 0.0) + alpha[None, :] * dneg
        da = dneg * z
    elif ACT == 4:
        alpha, mean, rstd, gamma, beta = _act_params(a_ptr, m_ptr, v_ptr, g_ptr, e_ptr, H, eps, HP,
                                                     ACT, HAS_G, HAS_BE, ACC)
        xhat = (z - mean[None, :]) * rstd[None, :]
        p = _sigmoid(xhat * gamma[None, :] + beta[None, :])
        a2 = alpha[None, :]
        u = dh * z * (1.0 - a2) * p * (1.0 - p)
        dz = dh * (a2 + (1.0 - a2) * p) + u * (gamma * rstd)[None, :]
        da = dh * z * (1.0 - p)
        ux = u * xhat
    return dz, da, u, ux


@triton.jit
def _hidden_fwd(z0, w1, b1, w2, b2, w3, b3,
                a0, m0, v0, g0, e0, a1, m1, v1, g1, e1, a2, m2, v2, g2, e2, a3, m3, v3, g3, e3,
                H0, H1, H2, H3, eps, z, NA: tl.constexpr, ACT: tl.constexpr, HAS_G: tl.constexpr,
                HAS_BE: tl.constexpr, HP0: tl.constexpr, HP1: tl.constexpr, HP2: tl.constexpr,
                HP3: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    # the NA activated layers: h0 = act(z0), z_i = h_{i-1} W_i^T + b_i, h_i = act(z_i)
    h0 = z0
    z1 = z0
    h1 = z0
    z2 = z0
    h2 = z0
    z3 = z0
    h3 = z0
    if NA >= 1:
        h0 = _act_fwd(z0, a0, m0, v0, g0, e0, H0, eps, HP0, ACT, HAS_G, HAS_BE, ACC)
    if NA >= 2:
        z1 = _dense(h0, w1, b1, H0, H1, z, HP0, HP1, ACC, DOT, PREC)
        h1 = _act_fwd(z1, a1, m1, v1, g1, e1, H1, eps, HP1, ACT, HAS_G, HAS_BE, ACC)
    if NA >= 3:
        z2 = _dense(h1, w2, b2, H1, H2, z, HP1, HP2, ACC, DOT, PREC)
        h2 = _act_fwd(z2, a2, m2, v2, g2, e2, H2, eps, HP2, ACT, HAS_G, HAS_BE, ACC)
    if NA >= 4:
        z3 = _dense(h2, w3, b3, H2, H3, z, HP2, HP3, ACC, DOT, PREC)
        h3 = _act_fwd(z3, a3, m3, v3, g3, e3, H3, eps, HP3, ACT, HAS_G, HAS_BE, ACC)
    return h0, z1, h1, z2, h2, z3, h3


@triton.jit
def _last(h0, h1, h2, h3, NA: tl.constexpr):
    r = h0
    if NA == 2:
        r = h1
    elif NA == 3:
        r = h2
    elif NA == 4:
        r = h3
    return r


@triton.jit
def _to2d(x, BT: tl.constexpr, CB: tl.constexpr):
    # [M] -> [BT, CB]
    if CB == 1:
        r = x[:, None]
    else:
        r = tl.reshape(x, (BT, CB))
    return r


@triton.jit
def _from_cb(v, BT: tl.constexpr, CB: tl.constexpr):
    # per-candidate [CB] -> per-row [M]
    if CB == 1:
        r = tl.broadcast_to(v, (BT,))
    else:
        r = tl.reshape(tl.broadcast_to(v[None, :], (BT, CB)), (BT * CB,))
    return r


@triton.jit
def _sum_t(x, BT: tl.constexpr, CB: tl.constexpr, W: tl.constexpr):
    # [M, W] -> [CB, W]: sum over the positions of the tile
    if CB == 1:
        r = tl.sum(x, axis=0)[None, :]
    else:
        r = tl.sum(tl.reshape(x, (BT, CB, W)), axis=0)
    return r


@triton.jit
def _sum_c(x, BT: tl.constexpr, CB: tl.constexpr, W: tl.constexpr):
    # [M, W] -> [BT, W]: sum over the candidates of the tile
    if CB == 1:
        r = x
    else:
        r = tl.sum(tl.reshape(x, (BT, CB, W)), axis=1)
    return r


@triton.jit
def _flush(ptr, acc, mask, ATOMIC: tl.constexpr):
    if ATOMIC:
        tl.atomic_add(ptr, acc, mask=mask)
    else:
        tl.store(ptr, acc, mask=mask)


@triton.jit
def _flush_mat(base, off, acc, R, Cn, RP: tl.constexpr, CP: tl.constexpr, ATOMIC: tl.constexpr):
    r = tl.arange(0, RP)
    c = tl.arange(0, CP)
    _flush(base + off + r[:, None] * Cn + c[None, :], acc, (r[:, None] < R) & (c[None, :] < Cn), ATOMIC)


@triton.jit
def _flush_vec(base, off, acc, N, NP: tl.constexpr, ATOMIC: tl.constexpr):
    r = tl.arange(0, NP)
    _flush(base + off + r, acc, r < N, ATOMIC)


# ------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_kernel(q_ptr, k_ptr, len_ptr, off_ptr, out_ptr, attn_ptr, sbuf_ptr,
                w0, b0, w1, b1, w2, b2, w3, b3, wo, bo,
                a0, m0, v0, g0, e0, a1, m1, v1, g1, e1, a2, m2, v2, g2, e2, a3, m3, v3, g3, e3,
                T, C, D, H0, H1, H2, H3, HL, n_cblk, n_jobs,
                scale_hi, scale_lo, eps_hi, eps_lo,
                LAYOUT: tl.constexpr, NH: tl.constexpr, ACT: tl.constexpr, HAS_G: tl.constexpr,
                HAS_BE: tl.constexpr, SOFTMAX: tl.constexpr, SCRATCH: tl.constexpr,
                CB: tl.constexpr, BT: tl.constexpr, DP: tl.constexpr,
                HP0: tl.constexpr, HP1: tl.constexpr, HP2: tl.constexpr, HP3: tl.constexpr,
                HPL: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    M: tl.constexpr = BT * CB
    scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    eps = tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC)
    offs_m = tl.arange(0, M)
    t_in = offs_m // CB
    c_in = offs_m % CB
    offs_c = tl.arange(0, CB)
    offs_d = tl.arange(0, DP)
    d_ok = offs_d < D
    bias0 = _vec(b0, H0, HP0, ACC)
    ATTN_T = attn_ptr.dtype.element_ty

    for job in range(pid, n_jobs, nprog):
        b = job // n_cblk
        cb = job % n_cblk
        start, n = _row_extent(b, len_ptr, off_ptr, T, LAYOUT)
        jz = (n < 0).to(tl.int32)  # 0; see _KEEP_IN_LOOP
        c_glob = cb * CB + c_in
        c_ok = c_glob < C
        cc = cb * CB + offs_c
        cc_ok = cc < C
        qrow = b.to(tl.int64) * C
        # folded layer 0 (SPEC section 1): z0 = (Wk - Wd + Wp diag(q)) k + (Wq + Wd) q + b0
        WqdT = _w0T(w0, D, H0, 0, jz, DP, HP0, ACC) + _w0T(w0, D, H0, 2, jz, DP, HP0, ACC)
        if CB == 1:
            q = tl.load(q_ptr + (qrow + cb) * D + offs_d, mask=d_ok, other=0).to(ACC)
            AT = (_w0T(w0, D, H0, 1, jz, DP, HP0, ACC) - _w0T(w0, D, H0, 2, jz, DP, HP0, ACC)
                  + _w0T(w0, D, H0, 3, jz, DP, HP0, ACC) * q[:, None])
            c0 = tl.sum(WqdT * q[:, None], axis=0) + bias0 + _nonfinite(q, 0)
        else:
            Qx = tl.load(q_ptr + (qrow + c_glob)[:, None] * D + offs_d[None, :],
                         mask=c_ok[:, None] & d_ok[None, :], other=0).to(ACC)
            C0x = _mm(Qx, WqdT, DOT, PREC, ACC) + (bias0[None, :] + _nonfinite(Qx, 1)[:, None])
        if LAYOUT == 2:
            a_off = start * C + c_glob
            a_st = C
        else:
            a_off = (qrow + c_glob) * T
            a_st = 1
        m_run = tl.full([CB], float("-inf"), ACC)
        l_run = tl.zeros([CB], ACC)
        acc = tl.zeros([CB, DP], ACC)
        for t0 in range(0, n, BT):
            t = t0 + t_in
            t_ok = t < n
            ok = t_ok & c_ok
            wz = (t0 >= n).to(tl.int32)  # 0; see _KEEP_IN_LOOP
            Kx = tl.load(k_ptr + (start + t)[:, None] * D + offs_d[None, :],
                         mask=t_ok[:, None] & d_ok[None, :], other=0).to(ACC)
            if CB == 1:
                z0 = _mm(Kx, AT, DOT, PREC, ACC) + c0[None, :]
            else:
                z0 = _layer0(Kx, Kx * Qx, C0x, w0, D, H0, wz, DP, HP0, ACC, DOT, PREC)
            z0 = z0 + _nonfinite(Kx, 1)[:, None]
            h0, z1, h1, z2, h2, z3, h3 = _hidden_fwd(
                z0, w1, b1, w2, b2, w3, b3, a0, m0, v0, g0, e0, a1, m1, v1, g1, e1, a2, m2, v2, g2, e2,
                a3, m3, v3, g3, e3, H0, H1, H2, H3, eps, wz, NH, ACT, HAS_G, HAS_BE, HP0, HP1, HP2, HP3,
                ACC, DOT, PREC)
            if NH == 0:
                s = tl.sum(z0, axis=1)  # layer 0 is the output layer: only column 0 is non-zero
            else:
                s = tl.sum(_last(h0, h1, h2, h3, NH) * _vec(wo, HL, HPL, ACC)[None, :], axis=1)
                s = s + tl.load(bo).to(ACC)
            s = s * scale
            aidx = a_off + t.to(tl.int64) * a_st
            if SOFTMAX:
                if SCRATCH:
                    tl.store(sbuf_ptr + aidx, s.to(tl.float32), mask=ok)
                else:
                    tl.store(attn_ptr + aidx, s.to(ATTN_T), mask=ok)
                # tl.max skips NaN scores; exp(s - m) brings them back into l_run and acc
                m_new = tl.maximum(m_run, tl.max(_to2d(tl.where(ok, s, float("-inf")), BT, CB), axis=0))
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # only -inf so far: no inf - inf
                corr = tl.exp(m_run - m_use)
                pm = tl.where(ok, tl.exp(s - _from_cb(m_use, BT, CB)), 0.0)
                l_run = l_run * corr + tl.sum(_to2d(pm, BT, CB), axis=0)
                acc = acc * corr[:, None] + _sum_t(pm[:, None] * Kx, BT, CB, DP)
                m_run = m_new
            else:
                w = tl.where(ok, s, 0.0)
                tl.store(attn_ptr + aidx, w.to(ATTN_T), mask=ok)
                acc = acc + _sum_t(w[:, None] * Kx, BT, CB, DP)
        if SOFTMAX:
            # a NaN or 0 sum (all scores -inf) divides as in torch.softmax; an empty row gives 0
            l_den = tl.where(n > 0, l_run, 1.0)
            acc = acc / l_den[:, None]
        tl.store(out_ptr + (qrow + cc)[:, None] * D + offs_d[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=cc_ok[:, None] & d_ok[None, :])
        if SOFTMAX:
            tl.debug_barrier()  # the raw scores written above are read back by other threads
            m_x = _from_cb(tl.where(m_run == float("-inf"), 0.0, m_run), BT, CB)
            l_x = _from_cb(l_den, BT, CB)
            for t0 in range(0, n, BT):
                t = t0 + t_in
                ok = (t < n) & c_ok
                aidx = a_off + t.to(tl.int64) * a_st
                if SCRATCH:
                    s = tl.load(sbuf_ptr + aidx, mask=ok, other=0).to(ACC)
                else:
                    s = tl.load(attn_ptr + aidx, mask=ok, other=0).to(ACC)
                tl.store(attn_ptr + aidx, (tl.exp(s - m_x) / l_x).to(ATTN_T), mask=ok)
        if LAYOUT != 2:
            zero = tl.zeros([M], ATTN_T)
            for t0 in range(n, T, BT):
                t = t0 + t_in
                tl.store(attn_ptr + a_off + t.to(tl.int64) * a_st, zero, mask=(t < T) & c_ok)


# ------------------------------------------------------------------------------------------------
# backward (MODE 0: attention_pooling_backward; MODE 1: attention_pooling_stats_backward)
# ------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_kernel(go_ptr, ga_ptr, attn_ptr, gm_ptr, gv_ptr, mean_ptr, cnt_ptr,
                q_ptr, k_ptr, len_ptr, off_ptr,
                dq_ptr, dk_ptr, dc_ptr, part_ptr,
                o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15, o16, o17, o18, o19, o20,
                o21,
                w0, b0, w1, b1, w2, b2, w3, b3, wh, bh,
                a0, m0, v0, g0, e0, a1, m1, v1, g1, e1, a2, m2, v2, g2, e2, a3, m3, v3, g3, e3,
                T, C, D, H0, H1, H2, H3, HL, HH, n_cblk, n_jobs, dk_slice, P,
                scale_hi, scale_lo, eps_hi, eps_lo,
                MODE: tl.constexpr, LAYOUT: tl.constexpr, NA: tl.constexpr, ACT: tl.constexpr,
                HAS_G: tl.constexpr, HAS_BE: tl.constexpr, SOFTMAX: tl.constexpr, HAS_GA: tl.constexpr,
                CB: tl.constexpr, BT: tl.constexpr, DP: tl.constexpr,
                HP0: tl.constexpr, HP1: tl.constexpr, HP2: tl.constexpr, HP3: tl.constexpr,
                HPL: tl.constexpr, HPH: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                PREC: tl.constexpr, ATOMIC: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    M: tl.constexpr = BT * CB
    scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    eps = tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC)
    offs_m = tl.arange(0, M)
    t_in = offs_m // CB
    c_in = offs_m % CB
    offs_c = tl.arange(0, CB)
    offs_bt = tl.arange(0, BT)
    offs_d = tl.arange(0, DP)
    d_ok = offs_d < D
    offs_h0 = tl.arange(0, HP0)
    offs_hh = tl.arange(0, HPH)
    bias0 = _vec(b0, H0, HP0, ACC)
    DK_T = dk_ptr.dtype.element_ty

    # accumulators of everything summed over rows
    dWkd = tl.zeros([HP0, DP], ACC)
    dWp = tl.zeros([HP0, DP], ACC)
    if NA >= 1:
        dA0 = tl.zeros([HP0], ACC)
        dU0 = tl.zeros([HP0], ACC)
        dX0 = tl.zeros([HP0], ACC)
        if MODE == 0:
            dWh = tl.zeros([HPL], ACC)
            dBh = tl.zeros([1], ACC)
        else:
            dWh = tl.zeros([HPH, HPL], ACC)
            dBh = tl.zeros([HPH], ACC)
    if NA >= 2:
        dW1 = tl.zeros([HP1, HP0], ACC)
        dB1 = tl.zeros([HP1], ACC)
        dA1 = tl.zeros([HP1], ACC)
        dU1 = tl.zeros([HP1], ACC)
        dX1 = tl.zeros([HP1], ACC)
    if NA >= 3:
        dW2 = tl.zeros([HP2, HP1], ACC)
        dB2 = tl.zeros([HP2], ACC)
        dA2 = tl.zeros([HP2], ACC)
        dU2 = tl.zeros([HP2], ACC)
        dX2 = tl.zeros([HP2], ACC)
    if NA >= 4:
        dW3 = tl.zeros([HP3, HP2], ACC)
        dB3 = tl.zeros([HP3], ACC)
        dA3 = tl.zeros([HP3], ACC)
        dU3 = tl.zeros([HP3], ACC)
        dX3 = tl.zeros([HP3], ACC)
    if MODE == 1:
        cnt = tl.load(cnt_ptr).to(ACC)
        cnt = tl.where(cnt > 0, cnt, 1.0)
        gmean = _vec(gm_ptr, HH, HPH, ACC) / cnt
        gvar2 = 2.0 * _vec(gv_ptr, HH, HPH, ACC) / cnt
        meanS = _vec(mean_ptr, HH, HPH, ACC)
        hh_ok = offs_hh < HH

    for job in range(pid, n_jobs, nprog):
        b = job // n_cblk
        cb = job % n_cblk
        start, n = _row_extent(b, len_ptr, off_ptr, T, LAYOUT)
        jz = (n < 0).to(tl.int32)  # 0; see _KEEP_IN_LOOP
        c_glob = cb * CB + c_in
        c_ok = c_glob < C
        cc = cb * CB + offs_c
        cc_ok = cc < C
        qrow = b.to(tl.int64) * C
        WqdT = _w0T(w0, D, H0, 0, jz, DP, HP0, ACC) + _w0T(w0, D, H0, 2, jz, DP, HP0, ACC)
        if CB == 1:  # one candidate: per-row vectors, broadcast over the tile (fewer registers)
            q = tl.load(q_ptr + (qrow + cb) * D + offs_d, mask=d_ok, other=0).to(ACC)
            Qx = q[None, :]
            C0x = (tl.sum(WqdT * q[:, None], axis=0) + bias0)[None, :]
        else:
            Qx = tl.load(q_ptr + (qrow + c_glob)[:, None] * D + offs_d[None, :],
                         mask=c_ok[:, None] & d_ok[None, :], other=0).to(ACC)
            C0x = _mm(Qx, WqdT, DOT, PREC, ACC) + bias0[None, :]
        if LAYOUT == 2:
            a_off = start * C + c_glob
            a_st = C
        else:
            a_off = (qrow + c_glob) * T
            a_st = 1
        if MODE == 0:
            if CB == 1:
                Gx = tl.load(go_ptr + (qrow + cb) * D + offs_d, mask=d_ok, other=0).to(ACC)[None, :]
            else:
                Gx = tl.load(go_ptr + (qrow + c_glob)[:, None] * D + offs_d[None, :],
                             mask=c_ok[:, None] & d_ok[None, :], other=0).to(ACC)
            if SOFTMAX:
                # softmax: ds_t = w_t (dw_t - sum_u w_u dw_u); the sum needs its own pass. The
                # saved weights are divided by their sum, which their rounding to fp16/bf16 moves
                # off 1 (and that error would reach every ds_t), as pool_backward does on the CPU.
                ssum = tl.zeros([CB], ACC)
                wsum = tl.zeros([CB], ACC)
                for t0 in range(0, n, BT):
                    t = t0 + t_in
                    t_ok = t < n
                    ok = t_ok & c_ok
                    aidx = a_off + t.to(tl.int64) * a_st
                    Kx = tl.load(k_ptr + (start + t)[:, None] * D + offs_d[None, :],
                                 mask=t_ok[:, None] & d_ok[None, :], other=0).to(ACC)
                    w = tl.load(attn_ptr + aidx, mask=ok, other=0).to(ACC)
                    dw = tl.sum(Kx * Gx, axis=1)
                    if HAS_GA:
                        dw += tl.load(ga_ptr + aidx, mask=ok, other=0).to(ACC)
                    ssum += tl.sum(_to2d(w * dw, BT, CB), axis=0)
                    wsum += tl.sum(_to2d(w, BT, CB), axis=0)
                winv = 1.0 / tl.where(wsum > 0, wsum, 1.0)
                Sx = _from_cb(ssum * winv, BT, CB)
                Ix = _from_cb(winv, BT, CB)
        if CB == 1:
            dq_acc = tl.zeros([1, DP], ACC)
            dc_acc = tl.zeros([1, HP0], ACC)
        else:
            dq_acc = tl.zeros([M, DP], ACC)
            dc_acc = tl.zeros([M, HP0], ACC)
        for t0 in range(0, n, BT):
            t = t0 + t_in
            t_ok = t < n
            ok = t_ok & c_ok
            Kx = tl.load(k_ptr + (start + t)[:, None] * D + offs_d[None, :],
                         mask=t_ok[:, None] & d_ok[None, :], other=0).to(ACC)
            KQ = Kx * Qx
            wz = (t0 >= n).to(tl.int32)  # 0; see _KEEP_IN_LOOP
            z0 = _layer0(Kx, KQ, C0x, w0, D, H0, wz, DP, HP0, ACC, DOT, PREC) + \
                (_nonfinite(Kx, 1) + _nonfinite(Qx, 1))[:, None]
            h0, z1, h1, z2, h2, z3, h3 = _hidden_fwd(
                z0, w1, b1, w2, b2, w3, b3, a0, m0, v0, g0, e0, a1, m1, v1, g1, e1, a2, m2, v2, g2, e2,
                a3, m3, v3, g3, e3, H0, H1, H2, H3, eps, wz, NA, ACT, HAS_G, HAS_BE, HP0, HP1, HP2, HP3,
                ACC, DOT, PREC)
            # gradient at the head
            if MODE == 0:
                aidx = a_off + t.to(tl.int64) * a_st
                w = tl.load(attn_ptr + aidx, mask=ok, other=0).to(ACC)
                dw = tl.sum(Kx * Gx, axis=1)
                if HAS_GA:
                    dw += tl.load(ga_ptr + aidx, mask=ok, other=0).to(ACC)
                if SOFTMAX:
                    ds = w * Ix * (dw - Sx)
                else:
                    ds = dw
                dsr = tl.where(ok, ds, 0.0) * scale
                dKx = w[:, None] * Gx  # out = sum_t w_t k_t
                if NA == 0:
                    dz0 = dsr[:, None] * (offs_h0 == 0).to(ACC)[None, :]
                else:
                    hl = _last(h0, h1, h2, h3, NA)
                    dWh += tl.sum(dsr[:, None] * hl, axis=0)
                    dBh += tl.sum(dsr[:, None], axis=0)
                    dh = dsr[:, None] * _vec(wh, HL, HPL, ACC)[None, :]
            else:
                if NA == 0:
                    zS = z0
                else:
                    hl = _last(h0, h1, h2, h3, NA)
                    WhT = _wT(wh, HL, HH, wz, HPL, HPH, ACC)
                    zS = _mm(hl, WhT, DOT, PREC, ACC) + _vec(bh, HH, HPH, ACC)[None, :]
                # d(mean)/dz = 1/n, d(biased var)/dz = 2 (z - mean) / n on every valid pair
                dzS = tl.where(ok[:, None] & hh_ok[None, :],
                               gmean[None, :] + gvar2[None, :] * (zS - meanS[None, :]), 0.0)
                if NA == 0:
                    dz0 = dzS
                else:
                    dWh += _mm(tl.trans(dzS), hl, DOT, PREC, ACC)
                    dBh += tl.sum(dzS, axis=0)
                    dh = _mm(dzS, tl.trans(WhT), DOT, PREC, ACC)
            # hidden layers, top down
            if NA >= 4:
                dz, da, u, ux = _act_bwd(dh, z3, a3, m3, v3, g3, e3, H3, eps, HP3, ACT, HAS_G, HAS_BE, ACC)
                if ACT >= 3:
                    dA3 += tl.sum(da, axis=0)
                if ACT == 4:
                    dU3 += tl.sum(u, axis=0)
                    dX3 += tl.sum(ux, axis=0)
                dW3 += _mm(tl.trans(dz), h2, DOT, PREC, ACC)
                dB3 += tl.sum(dz, axis=0)
                dh = _mm(dz, tl.trans(_wT(w3, H2, H3, wz, HP2, HP3, ACC)), DOT, PREC, ACC)
            if NA >= 3:
                dz, da, u, ux = _act_bwd(dh, z2, a2, m2, v2, g2, e2, H2, eps, HP2, ACT, HAS_G, HAS_BE, ACC)
                if ACT >= 3:
                    dA2 += tl.sum(da, axis=0)
                if ACT == 4:
                    dU2 += tl.sum(u, axis=0)
                    dX2 += tl.sum(ux, axis=0)
                dW2 += _mm(tl.trans(dz), h1, DOT, PREC, ACC)
                dB2 += tl.sum(dz, axis=0)
                dh = _mm(dz, tl.trans(_wT(w2, H1, H2, wz, HP1, HP2, ACC)), DOT, PREC, ACC)
            if NA >= 2:
                dz, da, u, ux = _act_bwd(dh, z1, a1, m1, v1, g1, e1, H1, eps, HP1, ACT, HAS_G, HAS_BE, ACC)
                if ACT >= 3:
                    dA1 += tl.sum(da, axis=0)
                if ACT == 4:
                    dU1 += tl.sum(u, axis=0)
                    dX1 += tl.sum(ux, axis=0)
                dW1 += _mm(tl.trans(dz), h0, DOT, PREC, ACC)
                dB1 += tl.sum(dz, axis=0)
                dh = _mm(dz, tl.trans(_wT(w1, H0, H1, wz, HP0, HP1, ACC)), DOT, PREC, ACC)
            if NA >= 1:
                dz0, da, u, ux = _act_bwd(dh, z0, a0, m0, v0, g0, e0, H0, eps, HP0, ACT, HAS_G, HAS_BE, ACC)
                if ACT >= 3:
                    dA0 += tl.sum(da, axis=0)
                if ACT == 4:
                    dU0 += tl.sum(u, axis=0)
                    dX0 += tl.sum(ux, axis=0)
            # layer 0: z0 = K (Wk - Wd)^T + (K * q) Wp^T + c
            dWkd += _mm(tl.trans(dz0), Kx, DOT, PREC, ACC)
            dWp += _mm(tl.trans(dz0), KQ, DOT, PREC, ACC)
            if CB == 1:
                dc_acc += tl.sum(dz0, axis=0)[None, :]
            else:
                dc_acc += dz0
            Pm = _mm(dz0, _w0(w0, D, H0, 3, wz, DP, HP0, ACC), DOT, PREC, ACC)
            Wkd = _w0(w0, D, H0, 1, wz, DP, HP0, ACC) - _w0(w0, D, H0, 2, wz, DP, HP0, ACC)
            dK_mlp = _mm(dz0, Wkd, DOT, PREC, ACC) + Pm * Qx
            if MODE == 0:
                dKx += dK_mlp
            else:
                dKx = dK_mlp
            if CB == 1:
                dq_acc += tl.sum(Pm * Kx, axis=0)[None, :]
            else:
                dq_acc += Pm * Kx
            tt = t0 + offs_bt
            tl.store(dk_ptr + cb.to(tl.int64) * dk_slice + (start + tt)[:, None] * D + offs_d[None, :],
                     _sum_c(dKx, BT, CB, DP).to(DK_T), mask=(tt < n)[:, None] & d_ok[None, :])
        tl.store(dq_ptr + (qrow + cc)[:, None] * D + offs_d[None, :], _sum_t(dq_acc, BT, CB, DP),
                 mask=cc_ok[:, None] & d_ok[None, :])
        tl.store(dc_ptr + (qrow + cc)[:, None] * H0 + offs_h0[None, :], _sum_t(dc_acc, BT, CB, HP0),
                 mask=cc_ok[:, None] & (offs_h0 < H0)[None, :])
        if LAYOUT != 2:
            zero = tl.zeros([BT, DP], DK_T)
            for t0 in range(n, T, BT):
                tt = t0 + offs_bt
                tl.store(dk_ptr + cb.to(tl.int64) * dk_slice + (start + tt)[:, None] * D + offs_d[None, :], zero,
                         mask=(tt < T)[:, None] & d_ok[None, :])

    if ATOMIC:
        base = part_ptr
    else:
        base = part_ptr + pid.to(tl.int64) * P
    _flush_mat(base, o0, dWkd, H0, D, HP0, DP, ATOMIC)
    _flush_mat(base, o1, dWp, H0, D, HP0, DP, ATOMIC)
    if NA >= 1:
        if MODE == 0:
            _flush_vec(base, o5, dWh, HL, HPL, ATOMIC)
            _flush_vec(base, o6, dBh, 1, 1, ATOMIC)
        else:
            _flush_mat(base, o5, dWh, HH, HL, HPH, HPL, ATOMIC)
            _flush_vec(base, o6, dBh, HH, HPH, ATOMIC)
        if ACT >= 3:
            _flush_vec(base, o10, dA0, H0, HP0, ATOMIC)
        if ACT == 4:
            _flush_vec(base, o14, dU0, H0, HP0, ATOMIC)
            _flush_vec(base, o18, dX0, H0, HP0, ATOMIC)
    if NA >= 2:
        _flush_mat(base, o2, dW1, H1, H0, HP1, HP0, ATOMIC)
        _flush_vec(base, o7, dB1, H1, HP1, ATOMIC)
        if ACT >= 3:
            _flush_vec(base, o11, dA1, H1, HP1, ATOMIC)
        if ACT == 4:
            _flush_vec(base, o15, dU1, H1, HP1, ATOMIC)
            _flush_vec(base, o19, dX1, H1, HP1, ATOMIC)
    if NA >= 3:
        _flush_mat(base, o3, dW2, H2, H1, HP2, HP1, ATOMIC)
        _flush_vec(base, o8, dB2, H2, HP2, ATOMIC)
        if ACT >= 3:
            _flush_vec(base, o12, dA2, H2, HP2, ATOMIC)
        if ACT == 4:
            _flush_vec(base, o16, dU2, H2, HP2, ATOMIC)
            _flush_vec(base, o20, dX2, H2, HP2, ATOMIC)
    if NA >= 4:
        _flush_mat(base, o4, dW3, H3, H2, HP3, HP2, ATOMIC)
        _flush_vec(base, o9, dB3, H3, HP3, ATOMIC)
        if ACT >= 3:
            _flush_vec(base, o13, dA3, H3, HP3, ATOMIC)
        if ACT == 4:
            _flush_vec(base, o17, dU3, H3, HP3, ATOMIC)
            _flush_vec(base, o21, dX3, H3, HP3, ATOMIC)


# ------------------------------------------------------------------------------------------------
# statistics of a hidden layer's pre-activation (Dice in training)
# ------------------------------------------------------------------------------------------------
@triton.jit
def _stats_kernel(q_ptr, k_ptr, len_ptr, off_ptr, part_ptr,
                  w0, b0, w1, b1, w2, b2, w3, b3, wh, bh,
                  a0, m0, v0, g0, e0, a1, m1, v1, g1, e1, a2, m2, v2, g2, e2, a3, m3, v3, g3, e3,
                  T, C, D, H0, H1, H2, H3, HL, HH, n_cblk, n_jobs, eps_hi, eps_lo,
                  LAYOUT: tl.constexpr, NA: tl.constexpr, ACT: tl.constexpr, HAS_G: tl.constexpr,
                  HAS_BE: tl.constexpr, CB: tl.constexpr, BT: tl.constexpr, DP: tl.constexpr,
                  HP0: tl.constexpr, HP1: tl.constexpr, HP2: tl.constexpr, HP3: tl.constexpr,
                  HPL: tl.constexpr, HPH: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                  PREC: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    M: tl.constexpr = BT * CB
    eps = tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC)
    offs_m = tl.arange(0, M)
    t_in = offs_m // CB
    c_in = offs_m % CB
    offs_d = tl.arange(0, DP)
    d_ok = offs_d < D
    offs_hh = tl.arange(0, HPH)
    bias0 = _vec(b0, H0, HP0, ACC)
    cnt = tl.zeros([HPH], ACC)
    mu = tl.zeros([HPH], ACC)
    m2acc = tl.zeros([HPH], ACC)
    for job in range(pid, n_jobs, nprog):
        b = job // n_cblk
        cb = job % n_cblk
        start, n = _row_extent(b, len_ptr, off_ptr, T, LAYOUT)
        jz = (n < 0).to(tl.int32)  # 0; see _KEEP_IN_LOOP
        c_glob = cb * CB + c_in
        c_ok = c_glob < C
        qrow = b.to(tl.int64) * C
        WqdT = _w0T(w0, D, H0, 0, jz, DP, HP0, ACC) + _w0T(w0, D, H0, 2, jz, DP, HP0, ACC)
        Qx = tl.load(q_ptr + (qrow + c_glob)[:, None] * D + offs_d[None, :],
                     mask=c_ok[:, None] & d_ok[None, :], other=0).to(ACC)
        C0x = _mm(Qx, WqdT, DOT, PREC, ACC) + bias0[None, :]
        for t0 in range(0, n, BT):
            t = t0 + t_in
            t_ok = t < n
            ok = t_ok & c_ok
            Kx = tl.load(k_ptr + (start + t)[:, None] * D + offs_d[None, :],
                         mask=t_ok[:, None] & d_ok[None, :], other=0).to(ACC)
            wz = (t0 >= n).to(tl.int32)  # 0; see _KEEP_IN_LOOP
            z0 = _layer0(Kx, Kx * Qx, C0x, w0, D, H0, wz, DP, HP0, ACC, DOT, PREC) + \
                (_nonfinite(Kx, 1) + _nonfinite(Qx, 1))[:, None]
            h0, z1, h1, z2, h2, z3, h3 = _hidden_fwd(
                z0, w1, b1, w2, b2, w3, b3, a0, m0, v0, g0, e0, a1, m1, v1, g1, e1, a2, m2, v2, g2, e2,
                a3, m3, v3, g3, e3, H0, H1, H2, H3, eps, wz, NA, ACT, HAS_G, HAS_BE, HP0, HP1, HP2, HP3,
                ACC, DOT, PREC)
            if NA == 0:
                zS = z0
            else:
                zS = _dense(_last(h0, h1, h2, h3, NA), wh, bh, HL, HH, wz, HPL, HPH, ACC, DOT, PREC)
            # Chan's merge of this tile's (count, mean, M2) into the program's
            okf = ok.to(ACC)
            nt = tl.sum(okf, axis=0)
            mt = tl.sum(zS * okf[:, None], axis=0) / tl.maximum(nt, 1.0)
            dev = tl.where(ok[:, None], zS - mt[None, :], 0.0)
            m2t = tl.sum(dev * dev, axis=0)
            ntot = cnt + nt
            frac = nt / tl.maximum(ntot, 1.0)
            delta = mt - mu
            mu = mu + delta * frac
            m2acc = m2acc + m2t + delta * delta * cnt * frac
            cnt = ntot
    base = part_ptr + pid.to(tl.int64) * (3 * HH)
    hh_ok = offs_hh < HH
    tl.store(base + offs_hh, cnt, mask=hh_ok)
    tl.store(base + HH + offs_hh, mu, mask=hh_ok)
    tl.store(base + 2 * HH + offs_hh, m2acc, mask=hh_ok)


# ------------------------------------------------------------------------------------------------
# layer-0 terms through c = (Wq + Wd) q + b0, from dc [B*C, H0]
# ------------------------------------------------------------------------------------------------
@triton.jit
def _finish_kernel(dc_ptr, q_ptr, w0, dq_ptr, part_ptr, BC, D, H0, rows_per_prog,
                   BR: tl.constexpr, DP: tl.constexpr, HP0: tl.constexpr, ACC: tl.constexpr,
                   DOT: tl.constexpr, PREC: tl.constexpr):
    # each program owns a contiguous range of rows: dq[rows] += dc[rows] (Wq + Wd), and its
    # partial dc[rows]^T Q[rows] goes to part[pid] (summed in program order on the host)
    pid = tl.program_id(0)
    offs_r = tl.arange(0, BR)
    offs_d = tl.arange(0, DP)
    offs_h = tl.arange(0, HP0)
    d_ok = offs_d < D
    h_ok = offs_h < H0
    Wqd = _w0(w0, D, H0, 0, 0, DP, HP0, ACC) + _w0(w0, D, H0, 2, 0, DP, HP0, ACC)  # [HP0, DP]
    acc = tl.zeros([HP0, DP], ACC)
    r_lo = pid.to(tl.int64) * rows_per_prog
    r_hi = tl.minimum(r_lo + rows_per_prog, BC)
    for r0 in range(r_lo, r_hi, BR):
        r = (r0 + offs_r).to(tl.int64)
        r_ok = r < r_hi
        dc = tl.load(dc_ptr + r[:, None] * H0 + offs_h[None, :], mask=r_ok[:, None] & h_ok[None, :],
                     other=0).to(ACC)
        q = tl.load(q_ptr + r[:, None] * D + offs_d[None, :], mask=r_ok[:, None] & d_ok[None, :],
                    other=0).to(ACC)
        acc += _mm(tl.trans(dc), q, DOT, PREC, ACC)
        dq_p = dq_ptr + r[:, None] * D + offs_d[None, :]
        m = r_ok[:, None] & d_ok[None, :]
        tl.store(dq_p, tl.load(dq_p, mask=m, other=0) + _mm(dc, Wqd, DOT, PREC, ACC), mask=m)
    tl.store(part_ptr + pid.to(tl.int64) * H0 * D + offs_h[:, None] * D + offs_d[None, :], acc,
             mask=h_ok[:, None] & d_ok[None, :])


def _finish_layer0(dc, pb, dq, acc_t):
    """dq += dc (Wq + Wd) in place; returns dc^T Q [H0, D]."""
    BC, H0 = dc.shape
    D = pb.D
    if BC == 0:
        return torch.zeros((H0, D), dtype=acc_t, device=dc.device)
    BR = 32
    progs = _num_programs(-(-BC // (4 * BR)), dc.device)
    per = -(-BC // progs)
    part = torch.empty((progs, H0, D), dtype=acc_t, device=dc.device)
    _launch(_finish_kernel, progs, (dc, pb.q, pb.weights[0], dq, part, BC, D, H0, per), dict(
        BR=BR, DP=pb.DP, HP0=_p2(H0), ACC=pb.ACC, DOT=pb.ACC if pb.ACC == tl.float64 else tl.float32,
        PREC=pb.PREC if pb.dtype == torch.float32 else ("ieee" if pb.ACC == tl.float64 else "tf32"),
        num_warps=4, num_stages=1))
    return part.sum(0) if progs > 1 else part[0]


# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------
def _p2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def _f32(x: float) -> float:
    """``x`` rounded to float32 (to nearest, inf past its range), on the host without torch."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def _split(x: float):
    """An fp32 (hi, lo) pair whose fp64 sum is ``x`` to ~2^-48 relative (kernel scalars are fp32)."""
    hi = _f32(x)
    lo = _f32(x - hi)
    return hi, lo


def _types(dtype, device, backward):
    """(accumulation dtype, matrix-product operand dtype, fp32 input precision)."""
    if dtype == torch.float64:
        return tl.float64, tl.float64, "ieee"
    if dtype == torch.float32:
        return tl.float32, tl.float32, CONFIG.fp32_precision_bwd if backward else CONFIG.fp32_precision
    if device.type == "cuda":  # operands in the input dtype: twice the tensor-core rate, half the bytes
        return tl.float32, (tl.float16 if dtype == torch.float16 else tl.bfloat16), "ieee"
    return tl.float32, tl.float32, "ieee"  # the interpreter computes bf16 products wrongly


def _num_programs(jobs: int, device) -> int:
    if jobs <= 0:
        return 0
    if device.type != "cuda":
        return min(jobs, CONFIG.interpreter_programs)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return min(jobs, sms * CONFIG.programs_per_sm)


def _deterministic(device) -> bool:
    return torch.are_deterministic_algorithms_enabled() or triton_interpret() or device.type != "cuda"


# Value checks of lengths/offsets on CPU tensors (the interpreter), where reading them costs no
# device sync: an error like the C++ kernels'. CUDA tensors are only clamped (_row_extent): the
# launchers read nothing back from the device (no host synchronization; the grid comes from the
# shapes), so the forward and backward can be captured in a CUDA graph.
_CHECK_CPU_VALUES = True


def _check_rows(t, name, size, bound, jagged):
    """Shape (any device) and, on CPU, values of ``lengths [B]`` (in [0, T]) or ``offsets [B + 1]``
    (0, non-decreasing, N)."""
    if t is None:
        raise RuntimeError(f"attention_pooling: jagged keys [N, D] need {name}")
    if t.dim() != 1 or t.shape[0] != size or t.dtype not in (torch.int32, torch.int64):
        raise RuntimeError(f"attention_pooling: {name} must be int32/int64 of shape [{size}], got "
                           f"{t.dtype} {tuple(t.shape)}")
    if not _CHECK_CPU_VALUES or t.device.type != "cpu" or t.numel() == 0:
        return
    if not jagged:
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi > bound:
            raise RuntimeError(f"attention_pooling: lengths must lie in [0, T={bound}], got values in "
                               f"[{lo}, {hi}]")
        return
    if int(t[0]) != 0 or int(t[-1]) != bound:
        raise RuntimeError(f"attention_pooling: offsets must start at 0 and end at N = keys.size(0) = "
                           f"{bound}, got {int(t[0])} and {int(t[-1])}")
    if bool((t[1:] < t[:-1]).any()):
        raise RuntimeError("attention_pooling: offsets must be non-decreasing")


def _check_row_lengths(off_t):
    """Positions within a row are int32 in the kernels: with more than ``_MAX_ROW`` keys in all,
    no row may be longer. CPU tensors (and CUDA ones under ``set_cuda_value_checks("sync")``) are
    read on the host; otherwise a device-side assert, kept even with the value checks off since
    it guards the kernels' memory accesses (it only runs for N > 2^31 - 2^16 keys)."""
    msg = f"attention_pooling (Triton): a row longer than {_MAX_ROW} positions is not supported"
    longest = (off_t[1:] - off_t[:-1]).max()
    if off_t.device.type == "cpu" or value_check_mode(off_t) == "sync":
        if int(longest) > _MAX_ROW:
            raise RuntimeError("din_ops." + msg)
    elif not torch.compiler.is_compiling():
        assert_async(longest <= _MAX_ROW, msg)


class _Problem:
    """Shapes, layout and kernel arguments shared by the four launchers."""

    def __init__(self, query, keys, lengths, offsets, weights, biases, act_weights, norm_mean,
                 norm_var, norm_weight, norm_bias, activation, n_act, block_m, max_cb, backward=False):
        if n_act > MAX_HIDDEN:
            raise ValueError(f"the Triton attention_pooling kernels support at most {MAX_HIDDEN} hidden "
                             f"layers, got {n_act}")
        self.dtype = query.dtype
        self.device = query.device
        self.single = query.dim() == 2
        self.B = query.shape[0]
        self.C = 1 if self.single else query.shape[1]
        self.D = query.shape[-1]
        self.q = query.contiguous()
        self.k = keys.contiguous()
        self.jagged = keys.dim() == 2
        if self.jagged:
            self.layout = 2
            self.T = 0
            self.len_t = self.k
            n_pos = keys.shape[0]
            _check_rows(offsets, "offsets", self.B + 1, n_pos, jagged=True)
            self.off_t = offsets.contiguous()
            typical = -(-n_pos // max(self.B, 1))
            if n_pos > _MAX_ROW and self.B > 0:
                _check_row_lengths(self.off_t)
        else:
            self.T = keys.shape[1]
            if self.T > _MAX_ROW:
                raise RuntimeError(f"din_ops.attention_pooling (Triton): T = {self.T} is above {_MAX_ROW}")
            self.layout = 0 if lengths is None else 1
            if lengths is not None:
                _check_rows(lengths, "lengths", self.B, self.T, jagged=False)
            self.len_t = self.k if lengths is None else lengths.contiguous()
            self.off_t = self.k
            typical = self.T
        self.n_act = n_act
        self.weights = [w.contiguous() for w in weights]
        self.biases = [b.contiguous() for b in biases]
        self.act = _ACT[activation]
        # per activated layer: alpha (prelu [1] expanded to [H]), mean, var, gamma, beta
        H = [w.shape[0] for w in self.weights]
        self.H = H
        dummy = self.q
        per_layer = []
        for i in range(MAX_HIDDEN):
            if i < n_act:
                a = act_weights[i].expand(H[i]).contiguous() if len(act_weights) else dummy
                m = norm_mean[i].contiguous() if len(norm_mean) else dummy
                v = norm_var[i].contiguous() if len(norm_var) else dummy
                g = norm_weight[i].contiguous() if len(norm_weight) else dummy
                e = norm_bias[i].contiguous() if len(norm_bias) else dummy
            else:
                a = m = v = g = e = dummy
            per_layer += [a, m, v, g, e]
        self.act_args = per_layer
        self.has_g = len(norm_weight) > 0
        self.has_be = len(norm_bias) > 0
        # hidden dims of the activated layers (0 when absent) and the head
        hd = [H[i] if i < n_act else 0 for i in range(MAX_HIDDEN)]
        self.hd = hd
        self.HL = H[n_act - 1] if n_act >= 1 else 0
        self.HH = H[n_act]  # the layer after the activated ones: output [1] or the stats layer
        self.HP = [_p2(h) for h in hd]
        if n_act == 0:
            self.HP[0] = _p2(H[0])
        self.HPL = _p2(self.HL)
        self.HPH = _p2(self.HH)
        self.DP = _p2(self.D)
        # dense layers 1..n_act-1 and the head weight (index n_act)
        wl = []
        for i in range(1, MAX_HIDDEN):
            if i < n_act:
                wl += [self.weights[i], self.biases[i]]
            else:
                wl += [dummy, dummy]
        if n_act >= 1:
            head = [self.weights[n_act], self.biases[n_act]]
        else:
            head = [dummy, dummy]
        self.w_args = [self.weights[0], self.biases[0]] + wl + head
        self.ACC, self.DOT, self.PREC = _types(self.dtype, self.device, backward)
        # tiles: CB candidates x BT positions
        self.CB = min(triton.next_power_of_2(max(self.C, 1)), max_cb)
        self.n_cblk = -(-self.C // self.CB)
        bt = max(block_m // self.CB, 1)
        bt = min(bt, triton.next_power_of_2(max(typical, 1)))
        bt = max(bt, -(-16 // self.CB))
        self.BT = bt
        self.n_jobs = self.B * self.n_cblk
        self.grid = _num_programs(self.n_jobs, self.device)

    def dims(self):
        h = self.hd if self.n_act >= 1 else [self.H[0], 0, 0, 0]
        # the kernels' T: for jagged keys N, the bound of the clamped offsets (_row_extent)
        return [self.k.shape[0] if self.jagged else self.T, self.C, self.D, h[0], h[1], h[2], h[3]]

    def hp(self):
        return dict(HP0=self.HP[0], HP1=self.HP[1], HP2=self.HP[2], HP3=self.HP[3], HPL=self.HPL)


_FALLBACK = {}


def _launch(kernel, grid, args, kw):
    """Launches ``kernel``. A variant that needs more shared memory than the SM has (large hidden
    layers: one product's operands alone can exceed it) is retried with cheaper ones, 3xTF32 ->
    TF32 and then half the tile's rows down to 16; the working variant is remembered."""
    key = (kernel.__name__ if hasattr(kernel, "__name__") else id(kernel),
           tuple(sorted((k, str(v)) for k, v in kw.items())))
    kw = dict(kw, **_FALLBACK.get(key, {}))
    changed = {}
    while True:
        try:
            kernel[(grid,)](*args, **kw)
            break
        except OutOfResources as e:
            if kw.get("PREC") == "tf32x3":
                changed["PREC"] = kw["PREC"] = "tf32"
            elif "BT" in kw and kw["BT"] * kw["CB"] > 16 and kw["BT"] > 1:
                changed["BT"] = kw["BT"] = kw["BT"] // 2
            else:
                raise RuntimeError(
                    "din_ops.attention_pooling: the MLP's layers are too wide for one GPU "
                    f"multiprocessor's shared memory in {args[0].dtype} ({e}); use float32 or "
                    "bfloat16 inputs or narrower layers") from e
    if changed:
        _FALLBACK[key] = dict(_FALLBACK.get(key, {}), **changed)


def _acc_torch(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lists(*lists):
    """The forward ops take the lists that may be empty as ``Tensor[]?``: None means empty."""
    return [[] if x is None else x for x in lists]


@register_triton("attention_pooling")
def attention_pooling(query, keys, lengths, offsets, weights, biases, act_weights, norm_mean, norm_var,
                      norm_weight, norm_bias, activation, normalization, scale, eps):
    """The forward: ``(out, attn)``.

    Out-of-range ``lengths``/``offsets`` in a direct ``torch.ops.din_ops`` call are clamped in
    the kernels (memory-safe; results for such rows are unspecified), and on CPU tensors
    rejected with a RuntimeError like the C++ kernels; the public ``din_ops`` functions reject
    them with an error naming the argument."""
    act_weights, norm_mean, norm_var, norm_weight, norm_bias = _lists(act_weights, norm_mean, norm_var,
                                                                      norm_weight, norm_bias)
    pb = _Problem(query, keys, lengths, offsets, weights, biases, act_weights, norm_mean, norm_var,
                  norm_weight, norm_bias, activation, len(weights) - 1, CONFIG.block_m, CONFIG.max_cb)
    out = torch.empty_like(pb.q)
    if pb.single:
        attn_shape = (keys.shape[0],) if pb.jagged else (pb.B, pb.T)
    else:
        attn_shape = (keys.shape[0], pb.C) if pb.jagged else (pb.B, pb.C, pb.T)
    attn = torch.empty(attn_shape, dtype=pb.dtype, device=pb.device)
    if pb.grid == 0:
        return out, attn
    softmax = normalization == "softmax"
    scratch = softmax and pb.dtype in (torch.float16, torch.bfloat16)
    sbuf = torch.empty(attn_shape, dtype=torch.float32, device=pb.device) if scratch else attn
    _launch(_fwd_kernel, pb.grid, (
        pb.q, pb.k, pb.len_t, pb.off_t, out, attn, sbuf, *pb.w_args, *pb.act_args,
        *pb.dims(), pb.HL, pb.n_cblk, pb.n_jobs, *_split(scale), *_split(eps)), dict(
        LAYOUT=pb.layout, NH=pb.n_act, ACT=pb.act, HAS_G=pb.has_g, HAS_BE=pb.has_be,
        SOFTMAX=softmax, SCRATCH=scratch, CB=pb.CB, BT=pb.BT, DP=pb.DP, **pb.hp(),
        ACC=pb.ACC, DOT=pb.DOT, PREC=pb.PREC,
        num_warps=CONFIG.num_warps, num_stages=CONFIG.num_stages))
    return out, attn


def _grad_layout(pb, mode):
    """Offsets of the per-program gradient row (slots as in ``_bwd_kernel``'s flush) and its length.
    The 22 offsets reach the kernel as scalar arguments (a device table would need a host-to-device
    copy, which synchronizes and cannot be captured in a CUDA graph)."""
    H0, D = pb.dims()[3], pb.D
    h = pb.hd
    sizes = [0] * 22
    sizes[0] = sizes[1] = H0 * D
    for i in (1, 2, 3):
        if i < pb.n_act:
            sizes[1 + i] = h[i] * h[i - 1]
            sizes[6 + i] = h[i]
    if pb.n_act >= 1:
        if mode == 0:
            sizes[5], sizes[6] = pb.HL, 1
        else:
            sizes[5], sizes[6] = pb.HH * pb.HL, pb.HH
    for i in range(pb.n_act):
        if pb.act >= 3:
            sizes[10 + i] = h[i]
        if pb.act == 4:
            sizes[14 + i] = sizes[18 + i] = h[i]
    offs, total = [], 0
    for s in sizes:
        offs.append(total)
        total += s
    return offs, sizes, total


def _backward(mode, grad_out, grad_attn, attn, grad_mean, grad_var, mean, query, keys, lengths, offsets,
              weights, biases, act_weights, norm_mean, norm_var, norm_weight, norm_bias, activation,
              normalization, scale, eps):
    n_act = len(weights) - 1
    pb = _Problem(query, keys, lengths, offsets, weights, biases, act_weights, norm_mean, norm_var,
                  norm_weight, norm_bias, activation, n_act, CONFIG.block_m_bwd, CONFIG.max_cb, backward=True)
    dev, dtype = pb.device, pb.dtype
    acc_t = _acc_torch(dtype)
    BC = pb.B * pb.C
    H0, D = pb.dims()[3], pb.D
    offs, sizes, P = _grad_layout(pb, mode)
    deterministic = _deterministic(dev)
    atomic = (not deterministic) and CONFIG.use_atomics
    G = pb.grid
    dq = torch.empty((BC, D), dtype=acc_t, device=dev)
    dc = torch.empty((BC, H0), dtype=acc_t, device=dev)
    if pb.n_cblk == 1:
        dk = torch.empty_like(pb.k)
        dk_slice = 0
    else:
        dk = torch.empty((pb.n_cblk,) + tuple(pb.k.shape), dtype=acc_t, device=dev)
        dk_slice = pb.k.numel()
    if atomic:
        part = torch.zeros((1, P), dtype=acc_t, device=dev)
    else:
        part = torch.empty((max(G, 1), P), dtype=acc_t, device=dev)
        if G == 0:
            part.zero_()
    if G > 0:
        if mode == 0:
            go = grad_out.contiguous()
            ga = grad_attn.contiguous() if grad_attn is not None else go
            at = attn.contiguous()
            gm = gv = mn = cnt = pb.q
        else:
            go = ga = at = pb.q
            gm, gv, mn = grad_mean.contiguous(), grad_var.contiguous(), mean.contiguous()
            cnt = _valid_count(pb, lengths, acc_t)
        _launch(_bwd_kernel, G, (
            go, ga, at, gm, gv, mn, cnt, pb.q, pb.k, pb.len_t, pb.off_t, dq, dk, dc, part, *offs,
            *pb.w_args, *pb.act_args, *pb.dims(), pb.HL, pb.HH, pb.n_cblk, pb.n_jobs, dk_slice, P,
            *_split(scale), *_split(eps)), dict(
            MODE=mode, LAYOUT=pb.layout, NA=n_act, ACT=pb.act, HAS_G=pb.has_g, HAS_BE=pb.has_be,
            SOFTMAX=normalization == "softmax", HAS_GA=grad_attn is not None, CB=pb.CB, BT=pb.BT,
            DP=pb.DP, **pb.hp(), HPH=pb.HPH, ACC=pb.ACC, DOT=pb.DOT, PREC=pb.PREC, ATOMIC=atomic,
            num_warps=CONFIG.num_warps_bwd, num_stages=CONFIG.num_stages))
    else:
        dq.zero_()
        dc.zero_()
        dk.zero_()
    g = part.sum(0) if part.shape[0] > 1 else part[0]

    def piece(slot, shape):  # a copy: the op's outputs must not alias each other
        return g[offs[slot]:offs[slot] + sizes[slot]].view(shape).clone()

    # layer 0 from its folded pieces and dc = sum_t dz0_t per (row, candidate):
    # dWq = (q part of dWd) = dc^T Q, dq += dc (Wq + Wd); a kernel rather than torch matmuls,
    # which refuse deterministic mode without CUBLAS_WORKSPACE_CONFIG
    dWqd = _finish_layer0(dc, pb, dq, acc_t)
    dWkd = piece(0, (H0, D))
    dW0 = torch.cat([dWqd, dWkd, dWqd - dWkd, piece(1, (H0, D))], dim=1)
    dweights = [dW0.to(dtype)]
    dbiases = [dc.sum(0).to(dtype)]
    for i in range(1, n_act):
        dweights.append(piece(1 + i, (pb.hd[i], pb.hd[i - 1])).to(dtype))
        dbiases.append(piece(6 + i, (pb.hd[i],)).to(dtype))
    if n_act >= 1:
        if mode == 0:
            dweights.append(piece(5, (1, pb.HL)).to(dtype))
            dbiases.append(piece(6, (1,)).to(dtype))
        else:
            dweights.append(piece(5, (pb.HH, pb.HL)).to(dtype))
            dbiases.append(piece(6, (pb.HH,)).to(dtype))
    dact: List[torch.Tensor] = []
    dmean: List[torch.Tensor] = []
    dvar: List[torch.Tensor] = []
    dgamma: List[torch.Tensor] = []
    dbeta: List[torch.Tensor] = []
    for i in range(n_act):
        if pb.act >= 3:
            da = piece(10 + i, (pb.hd[i],))
            if act_weights[i].shape[0] != pb.hd[i]:
                da = da.sum().reshape(1)
            dact.append(da.to(dtype))
        if pb.act == 4:
            su, sx = piece(14 + i, (pb.hd[i],)), piece(18 + i, (pb.hd[i],))
            v = norm_var[i].to(acc_t)
            # var -0.0: one valid pair, the kernels' rstd is 0 (see _act_params)
            rstd = torch.where((v == 0) & torch.signbit(v), 0.0, torch.rsqrt(v + eps))
            gamma = norm_weight[i].to(acc_t) if len(norm_weight) else torch.ones_like(rstd)
            dmean.append((-gamma * rstd * su).to(norm_mean[i].dtype))
            dvar.append((-0.5 * gamma * rstd * rstd * sx).to(norm_var[i].dtype))
            if len(norm_weight):
                dgamma.append(sx.to(dtype))
            if len(norm_bias):
                dbeta.append(su.to(dtype))
    if pb.n_cblk == 1:
        dkeys = dk
    else:
        dkeys = dk.sum(0).to(dtype)
    return (dq.to(dtype).reshape(query.shape), dkeys, dweights, dbiases, dact, dmean, dvar, dgamma, dbeta)


def _valid_count(pb, lengths, acc_t):
    """Number of valid (position, candidate) pairs, as a device scalar (no host sync)."""
    if pb.jagged:
        n = float(pb.k.shape[0] * pb.C)
    elif lengths is None:
        n = float(pb.B * pb.T * pb.C)
    else:
        return (lengths.clamp(0, pb.T).sum() * pb.C).to(acc_t).reshape(1)  # as _row_extent counts
    return torch.full((1,), n, dtype=acc_t, device=pb.device)


@register_triton("attention_pooling_backward")
def attention_pooling_backward(grad_out, grad_attn, attn, query, keys, lengths, offsets, weights, biases,
                               act_weights, norm_mean, norm_var, norm_weight, norm_bias, activation,
                               normalization, scale, eps):
    """Gradients of ``attention_pooling`` (see ``_backward``).

    Out-of-range ``lengths``/``offsets`` in a direct ``torch.ops.din_ops`` call are clamped in
    the kernels (memory-safe; results for such rows are unspecified), and on CPU tensors
    rejected with a RuntimeError like the C++ kernels; the public ``din_ops`` functions reject
    them with an error naming the argument."""
    return _backward(0, grad_out, grad_attn, attn, None, None, None, query, keys, lengths, offsets,
                     weights, biases, act_weights, norm_mean, norm_var, norm_weight, norm_bias,
                     activation, normalization, scale, eps)


@register_triton("attention_pooling_stats")
def attention_pooling_stats(query, keys, lengths, offsets, weights, biases, act_weights, norm_mean,
                            norm_var, norm_weight, norm_bias, activation, eps):
    """Mean and variance over the valid pairs of a hidden layer's pre-activation.

    Out-of-range ``lengths``/``offsets`` in a direct ``torch.ops.din_ops`` call are clamped in
    the kernels (memory-safe; results for such rows are unspecified), and on CPU tensors
    rejected with a RuntimeError like the C++ kernels; the public ``din_ops`` functions reject
    them with an error naming the argument."""
    act_weights, norm_mean, norm_var, norm_weight, norm_bias = _lists(act_weights, norm_mean, norm_var,
                                                                      norm_weight, norm_bias)
    n_act = len(weights) - 1
    pb = _Problem(query, keys, lengths, offsets, weights, biases, act_weights, norm_mean, norm_var,
                  norm_weight, norm_bias, activation, n_act, CONFIG.block_m, CONFIG.max_cb, backward=True)
    acc_t = _acc_torch(pb.dtype)
    HH = pb.HH
    G = pb.grid
    if G == 0:
        z = torch.zeros(HH, dtype=acc_t, device=pb.device)
        return z, z.clone()
    part = torch.empty((G, 3, HH), dtype=acc_t, device=pb.device)
    _launch(_stats_kernel, G, (
        pb.q, pb.k, pb.len_t, pb.off_t, part, *pb.w_args, *pb.act_args, *pb.dims(), pb.HL, HH,
        pb.n_cblk, pb.n_jobs, *_split(eps)), dict(
        LAYOUT=pb.layout, NA=n_act, ACT=pb.act, HAS_G=pb.has_g, HAS_BE=pb.has_be, CB=pb.CB, BT=pb.BT,
        DP=pb.DP, **pb.hp(), HPH=pb.HPH, ACC=pb.ACC, DOT=pb.DOT, PREC=pb.PREC,
        num_warps=CONFIG.num_warps, num_stages=CONFIG.num_stages))
    # merge the programs' (count, mean, M2) in float64, in program order
    p = part.to(torch.float64)
    n_i, mu_i, m2_i = p[:, 0], p[:, 1], p[:, 2]
    n = n_i.sum(0)
    nsafe = n.clamp_min(1)
    mean = (n_i * mu_i).sum(0) / nsafe
    m2 = (m2_i + n_i * (mu_i - mean) ** 2).sum(0)
    var = m2 / nsafe
    # -0.0 marks a batch of one valid pair for the consumers' rstd (_act_params); NaN stays NaN
    var = torch.where((n == 1) & (var == 0), -0.0, var)
    return mean.to(acc_t), var.to(acc_t)


@register_triton("attention_pooling_stats_backward")
def attention_pooling_stats_backward(grad_mean, grad_var, mean, query, keys, lengths, offsets, weights,
                                     biases, act_weights, norm_mean, norm_var, norm_weight, norm_bias,
                                     activation, eps):
    """Gradients of ``attention_pooling_stats`` (see ``_backward``).

    Out-of-range ``lengths``/``offsets`` in a direct ``torch.ops.din_ops`` call are clamped in
    the kernels (memory-safe; results for such rows are unspecified), and on CPU tensors
    rejected with a RuntimeError like the C++ kernels; the public ``din_ops`` functions reject
    them with an error naming the argument."""
    return _backward(1, None, None, None, grad_mean, grad_var, mean, query, keys, lengths, offsets,
                     weights, biases, act_weights, norm_mean, norm_var, norm_weight, norm_bias,
                     activation, "none", 1.0, eps)
