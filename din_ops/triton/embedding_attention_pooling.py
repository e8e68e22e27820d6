"""Triton kernels for ``din_ops::embedding_attention_pooling`` and its backward and
Dice-statistics ops (SPEC section 4). The ground truth is
``din_ops.reference.embedding_attention_pooling``: ``attention_pooling`` on the keys
``concat_f tables[f][ids[f]]`` (``reference.embedding_keys``), each table getting a coalesced
sparse gradient.

Design: staged, by chunks of rows
---------------------------------
The attention kernels (``attention_pooling.py``) stay as they are; the keys are built a chunk of
rows at a time and only that chunk is ever stored.

* Gather (``_gather_kernel``): the keys of a chunk, ``[R, T, D]`` (padded) or ``[N, D]``
  (jagged), table ``f`` filling columns ``[sum_{g<f} D_g, + D_f)``. Ids are read at valid
  positions only; padding positions (``t >= lengths[b]``) get zero keys without reading their id.
* Attention: the Triton functions of ``attention_pooling`` on the chunk (query, keys, lengths,
  grad_out, grad_attn and attn sliced by rows).
* Key gradients (backward): per table, once for the whole batch, a stable ``torch.sort`` of the
  ids of valid positions (padding positions and ``padding_idx`` get the sentinel ``E_f``, sorted
  last) gives each distinct id its run of sorted positions; for each chunk, ``_segsum_kernel``
  sums, per distinct id, the chunk's key-gradient rows of that id (the sorted positions whose
  position lies in the chunk: a contiguous part of the run, found by ``torch.searchsorted`` on
  ``run * P + position``, which the stable sort makes ascending) and adds them to that id's fp32
  (fp64) row. One program owns each id: no atomics, and the order of every sum is fixed (chunk
  order, then a fixed lane tree), so the result is deterministic.
* Chunks. Padded ids are cut into chunks of ``R = CONFIG.chunk_bytes // (T * D * itemsize)``
  rows (at least one): the cut depends on shapes only, so no host read. Jagged ids are one chunk
  (the keys of all ``N`` positions): cutting them by rows would need the offsets on the host.
  A chunk's parameter gradients are summed over chunks in the accumulation dtype (the attention
  functions return them in the input dtype: with fp16/bf16 inputs and several chunks each chunk's
  part is rounded once). Statistics (``*_stats``) of several chunks are merged with Chan's
  formula in float64 from each chunk's (count, mean, var); the stats backward scales each chunk's
  ``grad_mean``/``grad_var`` by ``count_chunk / count_total`` (the attention kernel divides by
  the chunk's own count).

Host synchronization: none in the forward ops (grids and chunks come from shapes). The backward's
outputs have data-dependent sizes (``U_f`` distinct ids per table, as in ``coalesce``): it reads
them once per table (``sorted[is_first]``), nothing else.

Numerics: keys are gathered in the table dtype (what ``nn.Embedding`` returns); the attention
kernels accumulate in fp32 (fp64 for fp64); per-position key gradients come back in the input
dtype (as ``nn.Embedding(sparse=True)``'s gradient values are) and are summed per id in fp32
(fp64), then rounded to the table dtype.

Memory safety of direct op calls: ids of CPU tensors (the interpreter) are checked on the host (a
RuntimeError, like the C++ kernels); on CUDA the gather clamps ids into ``[0, E_f)`` and the
backward drops ids outside it (results for such inputs are unspecified; nothing is read or
written out of bounds).
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .._library import config_context, register_triton
from . import attention_pooling as _ap


@dataclasses.dataclass
class _Config:
    # keys of one chunk (padded layout): 64 MiB; a DIN batch (4096 x 100 x 36 fp32 = 59 MiB) is one chunk
    chunk_bytes: int = 64 << 20
    interpreter_programs: int = 3  # under TRITON_INTERPRET every program costs ~2 ms


CONFIG = _Config()


configure = config_context(CONFIG, "embedding_attention_pooling")


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def _gather_kernel(ids_ptr, tab_ptr, len_ptr, out_ptr, n_pos, T, E, s_e, s_d, D, col, D_f, n_blocks,
                   LAYOUT: tl.constexpr, BP: tl.constexpr, BD: tl.constexpr):
    # keys[p, col + d] = tables[f][ids[f][p], d] (reference.embedding_keys), 0 at padding.
    # LAYOUT 0: padded, all valid; 1: padded with lengths; 2: jagged (every position valid)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs_p = tl.arange(0, BP)
    offs_d = tl.arange(0, BD)
    for blk in range(pid.to(tl.int64), n_blocks, nprog):  # int64: positions * D may pass 2^31
        p = blk * BP + offs_p
        p_ok = p < n_pos
        valid = p_ok & (E > 0)
        if LAYOUT == 1:
            n = tl.load(len_ptr + p // T, mask=p_ok, other=0).to(tl.int64)
            valid = valid & ((p % T) < n)
        idx = tl.load(ids_ptr + p, mask=valid, other=0).to(tl.int64)  # padding ids are never read
        idx = tl.minimum(tl.maximum(idx, 0), E - 1)  # direct op calls on CUDA are not value-checked
        for d0 in range(0, D_f, BD):
            d = d0 + offs_d
            d_ok = d < D_f
            v = tl.load(tab_ptr + idx[:, None] * s_e + d[None, :] * s_d, mask=valid[:, None] & d_ok[None, :],
                        other=0)
            tl.store(out_ptr + p[:, None] * D + col + d[None, :], v, mask=p_ok[:, None] & d_ok[None, :])


@triton.jit
def _segsum_kernel(dk_ptr, perm_ptr, lo_ptr, hi_ptr, gv_ptr, p0, U, D, col, D_f, u_per,
                   FIRST: tl.constexpr, ACC: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
    # gv[u] (+)= sum of dk[perm[i] - p0, col : col + D_f] over sorted positions i in [lo[u], hi[u]):
    # the chunk's key-gradient rows of distinct id u; lane k holds occurrences k, k + BK, ...
    pid = tl.program_id(0)
    offs_k = tl.arange(0, BK)
    offs_d = tl.arange(0, BD)
    u_lo = pid.to(tl.int64) * u_per
    u_hi = tl.minimum(u_lo + u_per, U)
    for u in range(u_lo, u_hi):
        lo = tl.load(lo_ptr + u)
        cnt = (tl.load(hi_ptr + u) - lo).to(tl.int32)
        for d0 in range(0, D_f, BD):
            d = d0 + offs_d
            d_ok = d < D_f
            acc = tl.zeros([BK, BD], ACC)
            for k0 in range(0, cnt, BK):
                kk = k0 + offs_k
                k_ok = kk < cnt
                pos = tl.where(k_ok, tl.load(perm_ptr + lo + kk, mask=k_ok, other=0) - p0, 0)
                acc += tl.load(dk_ptr + pos[:, None] * D + col + d[None, :], mask=k_ok[:, None] & d_ok[None, :],
                               other=0).to(ACC)
            s = tl.sum(acc, axis=0)
            dst = gv_ptr + u * D_f + d
            if not FIRST:
                s = tl.load(dst, mask=d_ok, other=0) + s
            tl.store(dst, s, mask=d_ok)


# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------
def _interpreted(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


def _programs(blocks: int, like: torch.Tensor) -> int:
    """A grid of one program per block on a GPU; under the interpreter a few, each looping."""
    if blocks <= 0:
        return 0
    if _interpreted(like):
        return min(blocks, CONFIG.interpreter_programs)
    return blocks


def _block_d(D_f: int) -> int:
    return min(256, triton.next_power_of_2(max(D_f, 1)))


class _Layout:
    """The batch as chunks of rows: shapes, per-table column ranges, checks of direct op calls."""

    def __init__(self, query, tables, ids, lengths, offsets):
        if len(tables) == 0 or len(tables) != len(ids):
            raise RuntimeError(f"embedding_attention_pooling: expected one ids tensor per table, got "
                               f"{len(tables)} tables and {len(ids)} ids")
        widths = [int(t.shape[1]) if t.dim() == 2 else -1 for t in tables]
        if any(w < 0 for w in widths) or sum(widths) != query.shape[-1]:
            raise RuntimeError(f"embedding_attention_pooling: tables must be [E_f, D_f] with sum D_f = D = "
                               f"{query.shape[-1]}, got {[tuple(t.shape) for t in tables]}")
        shape = tuple(ids[0].shape)
        for i in ids:
            if tuple(i.shape) != shape or i.dtype not in (torch.int32, torch.int64):
                raise RuntimeError(f"embedding_attention_pooling: ids must be int32/int64 tensors of one shape, "
                                   f"got {[(x.dtype, tuple(x.shape)) for x in ids]}")
        self.tables = tables
        self.ids = [i.contiguous() for i in ids]
        self.widths = widths
        self.cols = [sum(widths[:f]) for f in range(len(widths))]
        self.D = sum(widths)
        self.B = query.shape[0]
        self.dtype = tables[0].dtype
        self.device = query.device
        self.jagged = offsets is not None
        self.lengths = lengths
        self.offsets = offsets
        if self.jagged:
            if len(shape) != 1:
                raise RuntimeError(f"embedding_attention_pooling: jagged ids must be [N], got {shape}")
            self.T = 0
            self.P = shape[0]
            self.rows = max(self.B, 1)
            self.layout = 2
        else:
            if len(shape) != 2 or shape[0] != self.B:
                raise RuntimeError(f"embedding_attention_pooling: padded ids must be [B={self.B}, T], got {shape}")
            self.T = shape[1]
            self.P = self.B * self.T
            row_bytes = self.T * self.D * tables[0].element_size()
            self.rows = max(1, CONFIG.chunk_bytes // max(row_bytes, 1))
            self.layout = 0 if lengths is None else 1
        self._check_values()

    def _check_values(self):
        """Ids of valid positions in ``[0, E_f)``, for CPU tensors (read on the host at no sync cost)."""
        if self.device.type != "cpu" or not _ap._CHECK_CPU_VALUES or self.P == 0:
            return
        mask = self.valid_mask()
        for f, (tab, idx) in enumerate(zip(self.tables, self.ids)):
            v = idx[mask] if mask is not None else idx
            if v.numel() and (int(v.min()) < 0 or int(v.max()) >= tab.shape[0]):
                raise RuntimeError(f"embedding_attention_pooling: ids[{f}] must lie in [0, {tab.shape[0]}) at valid "
                                   f"positions, got values in [{int(v.min())}, {int(v.max())}]")

    def valid_mask(self):
        """[B, T] bool of valid positions (None: all valid)."""
        if self.layout != 1:
            return None
        t = torch.arange(self.T, device=self.device)
        return t[None, :] < self.lengths.to(torch.int64)[:, None]

    def chunks(self):
        """(row slice, first position) of each chunk; at least one, so B = 0 gives shaped outputs."""
        if self.jagged:
            return [(slice(None), 0)]
        return [(slice(r0, r0 + self.rows), r0 * self.T) for r0 in range(0, max(self.B, 1), self.rows)]

    def keys(self, rows):
        """The keys of a chunk: [R, T, D] or [N, D] in the table dtype."""
        if self.jagged:
            n_pos, shape, lens = self.P, (self.P, self.D), None
            ids = self.ids
        else:
            ids = [i[rows] for i in self.ids]
            R = ids[0].shape[0]
            n_pos, shape = R * self.T, (R, self.T, self.D)
            lens = self.lengths[rows].contiguous() if self.layout == 1 else None
        keys = torch.empty(shape, dtype=self.dtype, device=self.device)
        BP = 32
        n_blocks = triton.cdiv(n_pos, BP)
        G = _programs(n_blocks, keys)
        for f, (tab, idx) in enumerate(zip(self.tables, ids)):
            if G == 0 or self.widths[f] == 0:
                continue
            BD = _block_d(self.widths[f])
            _gather_kernel[(G,)](idx, tab, lens if lens is not None else idx, keys, n_pos, max(self.T, 1),
                                 tab.shape[0], tab.stride(0), tab.stride(1), self.D, self.cols[f], self.widths[f],
                                 n_blocks, LAYOUT=self.layout, BP=BP, BD=BD, num_warps=4)
        return keys

    def chunk_lengths(self, rows):
        return None if self.layout != 1 else self.lengths[rows]

    def chunk_count(self, rows, C, acc_t):
        """Valid (position, candidate) pairs of a chunk, a device scalar (as the attention kernels count)."""
        if self.layout == 1:
            return (self.lengths[rows].clamp(0, self.T).sum() * C).to(acc_t)
        R = len(range(self.B)[rows])
        return torch.full((), float(R * self.T * C), dtype=acc_t, device=self.device)


def _acc_t(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_of(x, rows):
    return None if x is None else x[rows]


# --- key gradients per distinct id --------------------------------------------------------------
class _SparseGrads:
    """Per table: the sorted valid ids, their runs, and fp32 (fp64) rows that chunks add into."""

    def __init__(self, lay: _Layout, padding_idx):
        self.lay = lay
        acc_t = _acc_t(lay.dtype)
        mask = lay.valid_mask()
        P = lay.P
        self.tables = []
        self.grad_indices = []
        for f, (tab, idx) in enumerate(zip(lay.tables, lay.ids)):
            E = tab.shape[0]
            key = idx.to(torch.int64)
            drop = None if mask is None else ~mask
            pad = padding_idx[f] if f < len(padding_idx) else -1
            if pad is not None and pad >= 0:
                drop = (key == pad) if drop is None else (drop | (key == pad))
            if drop is not None:
                key = key.masked_fill(drop, E)  # sentinel E: sorts last, never a distinct id
            key = key.reshape(-1)
            srt, perm = torch.sort(key, stable=True)
            first = torch.ones_like(srt, dtype=torch.bool)
            first[1:] = srt[1:] != srt[:-1]
            run = torch.cumsum(first, 0) - 1
            # the data-dependent size U_f: the only host read of the backward (as in coalesce)
            uniq = srt[first & (srt < E) & (srt >= 0)]
            start = torch.searchsorted(srt, uniq)
            end = torch.searchsorted(srt, uniq, right=True)
            self.tables.append(dict(perm=perm, start=start, end=end, run=run, comp=None,
                                    gv=torch.empty((uniq.numel(), lay.widths[f]), dtype=acc_t, device=lay.device),
                                    first=True))
            self.grad_indices.append(uniq)
        self.P = P

    def add(self, dk, rows, p0, n_chunks):
        """Adds the chunk's key gradients ``dk`` ([R, T, D] or [N, D]) to every table's rows."""
        lay = self.lay
        dk = dk.contiguous()
        n_pos = dk.numel() // max(lay.D, 1)
        for f, st in enumerate(self.tables):
            U = st["gv"].shape[0]
            if U == 0:
                continue
            if n_chunks == 1:
                lo, hi = st["start"], st["end"]
            else:
                # the run's sorted positions whose position lies in [p0, p0 + n_pos): run * P + perm
                # ascends (stable sort), so both ends are one searchsorted each
                if st["comp"] is None:
                    st["comp"] = st["run"] * max(self.P, 1) + st["perm"]
                    st["base"] = st["run"][st["start"]] * max(self.P, 1)
                lo = torch.searchsorted(st["comp"], st["base"] + p0)
                hi = torch.searchsorted(st["comp"], st["base"] + p0 + n_pos)
            u_per = triton.cdiv(U, CONFIG.interpreter_programs) if _interpreted(dk) else 1
            BD = _block_d(lay.widths[f])
            _segsum_kernel[(triton.cdiv(U, u_per),)](
                dk, st["perm"], lo, hi, st["gv"], p0, U, lay.D, lay.cols[f], lay.widths[f], u_per,
                FIRST=st["first"], ACC=tl.float64 if st["gv"].dtype == torch.float64 else tl.float32,
                BK=max(1, min(32, 4096 // BD)), BD=BD, num_warps=4)
            st["first"] = False

    def result(self):
        gi, gv = [], []
        for f, st in enumerate(self.tables):
            g = st["gv"]
            if st["first"]:  # no chunk had a position of these ids (cannot happen when U > 0)
                g = g.zero_()
            gi.append(self.grad_indices[f])
            gv.append(g.to(self.lay.dtype))
        return gi, gv


def _sum_lists(acc, part):
    """Adds a chunk's parameter-gradient lists (9 entries after grad_keys) into ``acc``."""
    if acc is None:
        return [[t.to(_acc_t(t.dtype)) for t in lst] for lst in part]
    for a, p in zip(acc, part):
        for i, t in enumerate(p):
            a[i] = a[i] + t.to(a[i].dtype)
    return acc


# ------------------------------------------------------------------------------------------------
# the ops
# ------------------------------------------------------------------------------------------------
@register_triton("embedding_attention_pooling")
def embedding_attention_pooling(query, tables, ids, lengths, offsets, padding_idx, weights, biases, act_weights,
                                norm_mean, norm_var, norm_weight, norm_bias, activation, normalization, scale, eps):
    """The forward: ``(out, attn)`` of ``attention_pooling`` on the gathered keys, chunk by chunk
    (see the module docstring: padded ids in chunks of rows, jagged ids in one chunk). No host
    synchronization."""
    act_weights, norm_mean, norm_var, norm_weight, norm_bias = _ap._lists(act_weights, norm_mean, norm_var,
                                                                          norm_weight, norm_bias)
    lay = _Layout(query, tables, ids, lengths, offsets)
    chunks = lay.chunks()
    outs, attns = [], []
    for rows, _ in chunks:
        out, attn = _ap.attention_pooling(query[rows], lay.keys(rows), lay.chunk_lengths(rows), offsets, weights,
                                          biases, act_weights, norm_mean, norm_var, norm_weight, norm_bias,
                                          activation, normalization, scale, eps)
        outs.append(out)
        attns.append(attn)
    if len(chunks) == 1:
        return outs[0], attns[0]
    return torch.cat(outs), torch.cat(attns)


def _backward(mode, grad_out, grad_attn, attn, grad_mean, grad_var, mean, query, tables, ids, lengths, offsets,
              padding_idx, weights, biases, act_weights, norm_mean, norm_var, norm_weight, norm_bias, activation,
              normalization, scale, eps):
    lay = _Layout(query, tables, ids, lengths, offsets)
    sg = _SparseGrads(lay, list(padding_idx))
    chunks = lay.chunks()
    C = 1 if query.dim() == 2 else query.shape[1]
    if mode == 1 and len(chunks) > 1:
        total = sum(lay.chunk_count(rows, C, torch.float64) for rows, _ in chunks).clamp_min(1)
    dqs = []
    params = None
    dtypes = None
    for rows, p0 in chunks:
        keys = lay.keys(rows)
        if mode == 0:
            res = _ap.attention_pooling_backward(
                grad_out[rows], _rows_of(grad_attn, rows), attn[rows], query[rows], keys, lay.chunk_lengths(rows),
                offsets, weights, biases, act_weights, norm_mean, norm_var, norm_weight, norm_bias, activation,
                normalization, scale, eps)
        else:
            gm, gv = grad_mean, grad_var
            if len(chunks) > 1:  # the kernel divides by the chunk's count; the statistics are the batch's
                ratio = lay.chunk_count(rows, C, torch.float64) / total
                gm = (grad_mean.to(torch.float64) * ratio).to(grad_mean.dtype)
                gv = (grad_var.to(torch.float64) * ratio).to(grad_var.dtype)
            res = _ap.attention_pooling_stats_backward(
                gm, gv, mean, query[rows], keys, lay.chunk_lengths(rows), offsets, weights, biases, act_weights,
                norm_mean, norm_var, norm_weight, norm_bias, activation, eps)
        del keys
        dq, dk, rest = res[0], res[1], list(res[2:])
        sg.add(dk, rows, p0, len(chunks))
        del dk
        dqs.append(dq)
        if dtypes is None:
            dtypes = [[t.dtype for t in lst] for lst in rest]
        params = rest if len(chunks) == 1 else _sum_lists(params, rest)
    if len(chunks) > 1:
        params = [[t.to(dt) for t, dt in zip(lst, dts)] for lst, dts in zip(params, dtypes)]
        dq = torch.cat(dqs)
    else:
        dq = dqs[0]
    gi, gv = sg.result()
    return (dq, gi, gv, *params)


@register_triton("embedding_attention_pooling_backward")
def embedding_attention_pooling_backward(grad_out, grad_attn, attn, query, tables, ids, lengths, offsets,
                                         padding_idx, weights, biases, act_weights, norm_mean, norm_var, norm_weight,
                                         norm_bias, activation, normalization, scale, eps):
    """Gradients of ``embedding_attention_pooling``: ``(grad_query, grad_indices, grad_values,
    grad_weights, grad_biases, grad_act_weights, grad_norm_mean, grad_norm_var, grad_norm_weight,
    grad_norm_bias)``, per table the distinct ids (int64, ascending) of valid positions other than
    ``padding_idx[f]`` and their summed key-gradient columns. Reads the number of distinct ids of
    each table on the host (the sparse gradient's size is data-dependent, as in ``coalesce``);
    nothing else."""
    return _backward(0, grad_out, grad_attn, attn, None, None, None, query, tables, ids, lengths, offsets,
                     padding_idx, weights, biases, act_weights, norm_mean, norm_var, norm_weight, norm_bias,
                     activation, normalization, scale, eps)


@register_triton("embedding_attention_pooling_stats")
def embedding_attention_pooling_stats(query, tables, ids, lengths, offsets, padding_idx, weights, biases,
                                      act_weights, norm_mean, norm_var, norm_weight, norm_bias, activation, eps):
    """Mean and biased variance over the valid pairs of a hidden layer's pre-activation, as
    ``attention_pooling_stats`` on the gathered keys. Several chunks are merged in float64 with
    Chan's formula; a batch of one valid pair gives var -0.0, as ``attention_pooling_stats``.
    No host synchronization."""
    act_weights, norm_mean, norm_var, norm_weight, norm_bias = _ap._lists(act_weights, norm_mean, norm_var,
                                                                          norm_weight, norm_bias)
    lay = _Layout(query, tables, ids, lengths, offsets)
    chunks = lay.chunks()
    C = 1 if query.dim() == 2 else query.shape[1]
    parts = []
    for rows, _ in chunks:
        m, v = _ap.attention_pooling_stats(query[rows], lay.keys(rows), lay.chunk_lengths(rows), offsets, weights,
                                           biases, act_weights, norm_mean, norm_var, norm_weight, norm_bias,
                                           activation, eps)
        if len(chunks) == 1:
            return m, v
        parts.append((lay.chunk_count(rows, C, torch.float64), m.to(torch.float64), v.to(torch.float64)))
    acc_t = _acc_t(query.dtype)
    n = torch.stack([p[0] for p in parts])[:, None]
    mu = torch.stack([p[1] for p in parts])
    var = torch.stack([p[2] for p in parts]).abs()  # -0.0 (one pair) is a variance of 0
    n_tot = n.sum(0)
    nsafe = n_tot.clamp_min(1)
    mean = (n * mu).sum(0) / nsafe
    m2 = (n * var + n * (mu - mean) ** 2).sum(0)
    var = m2 / nsafe
    var = torch.where((n_tot == 1) & (var == 0), -0.0, var)
    return mean.to(acc_t), var.to(acc_t)


@register_triton("embedding_attention_pooling_stats_backward")
def embedding_attention_pooling_stats_backward(grad_mean, grad_var, mean, query, tables, ids, lengths, offsets,
                                               padding_idx, weights, biases, act_weights, norm_mean, norm_var,
                                               norm_weight, norm_bias, activation, eps):
    """Gradients of ``embedding_attention_pooling_stats``, laid out as
    ``embedding_attention_pooling_backward``'s. Reads the number of distinct ids of each table on
    the host (the sparse gradient's size is data-dependent, as in ``coalesce``)."""
    return _backward(1, None, None, None, grad_mean, grad_var, mean, query, tables, ids, lengths, offsets,
                     padding_idx, weights, biases, act_weights, norm_mean, norm_var, norm_weight, norm_bias,
                     activation, "none", 1.0, eps)
