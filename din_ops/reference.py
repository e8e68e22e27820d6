"""The DIN operators in plain PyTorch: the ground truth every backend is tested against.

Written to read like the paper (Zhou et al., KDD 2018) and SPEC.md, not to be fast: the
attention unit materializes the ``[q, k, q - k, q * k]`` concatenation, jagged inputs are padded
first, and autograd supplies every gradient. Each function carries the name of its op.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "jagged_to_padded",
    "padded_to_jagged",
    "valid_mask",
    "attention_pooling",
    "attention_pooling_stats",
    "embedding_keys",
    "embedding_attention_pooling",
    "dice",
    "dice_pointwise",
    "masked_moments",
    "mba_sparse_update_",
    "mba_penalty",
    "count_frequencies",
]


# --- layouts ------------------------------------------------------------------------------
def valid_mask(lengths: Optional[torch.Tensor], B: int, T: int, device=None) -> torch.Tensor:
    """``[B, T]`` bool: position t of row b is valid iff ``t < lengths[b]``."""
    if lengths is None:
        return torch.ones(B, T, dtype=torch.bool, device=device)
    return torch.arange(T, device=lengths.device)[None, :] < lengths.to(torch.int64)[:, None]


def jagged_to_padded(values: torch.Tensor, offsets: torch.Tensor, T: Optional[int] = None):
    """``values [N, *S]``, ``offsets [B+1]`` -> ``(padded [B, T, *S], lengths [B])`` (zeros padded)."""
    offsets = offsets.to(torch.int64)
    lengths = offsets[1:] - offsets[:-1]
    B = lengths.numel()
    if T is None:
        T = int(lengths.max()) if B > 0 else 0
    padded = values.new_zeros((B, T) + tuple(values.shape[1:]))
    mask = valid_mask(lengths, B, T)
    padded[mask] = values  # row-major order of the mask is the jagged order
    return padded, lengths


def padded_to_jagged(padded: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``padded [B, T, *S]`` -> ``values [N, *S]`` holding the valid positions, row by row."""
    B, T = padded.shape[:2]
    return padded[valid_mask(lengths, B, T, padded.device)]


# --- 2. dice --------------------------------------------------------------------------------
def masked_moments(x: torch.Tensor, mask: torch.Tensor):
    """Per-channel mean and biased variance of ``x [..., C]`` over positions where ``mask``.

    The statistics of an empty set are taken as 0 (mean 0, variance 0), so zero valid rows
    give finite results.
    """
    C = x.shape[-1]
    xs = x.reshape(-1, C)
    m = mask.reshape(-1).to(xs.dtype)[:, None]
    n = m.sum()
    denom = n.clamp_min(1)
    mean = (xs * m).sum(0) / denom
    var = (((xs - mean) ** 2) * m).sum(0) / denom
    return mean, var, n


def dice_pointwise(x, alpha, mean, var, gamma=None, beta=None, eps=1e-8):
    """``f(s) = p(s) * s + (1 - p(s)) * alpha * s`` with ``p = sigmoid(gamma * (s - E) / sqrt(Var + eps) + beta)``."""
    xn = (x - mean) / torch.sqrt(var + eps)
    if gamma is not None:
        xn = xn * gamma
    if beta is not None:
        xn = xn + beta
    p = torch.sigmoid(xn)
    return p * x + (1 - p) * alpha * x


def _update_running(running_mean, running_var, mean, var, n, momentum):
    """``BatchNorm1d``'s running update with the unbiased variance; no update for an empty batch."""
    if running_mean is None or running_var is None:
        return
    with torch.no_grad():
        n = float(n)
        if n <= 0:
            return
        unbiased = var * (n / (n - 1)) if n > 1 else var
        running_mean.mul_(1 - momentum).add_(momentum * mean.to(running_mean.dtype))
        running_var.mul_(1 - momentum).add_(momentum * unbiased.to(running_var.dtype))


def dice(
    x: torch.Tensor,
    alpha: torch.Tensor,
    running_mean: Optional[torch.Tensor] = None,
    running_var: Optional[torch.Tensor] = None,
    *,
    lengths: Optional[torch.Tensor] = None,
    offsets: Optional[torch.Tensor] = None,
    gamma: Optional[torch.Tensor] = None,
    beta: Optional[torch.Tensor] = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Dice (paper section 2.2) with statistics over valid rows only (SPEC section 2).

    ``x [N, C]`` (all rows valid; ``offsets`` only names the rows), or ``x [B, T, C]`` with
    ``lengths``. Padded positions are transformed with the same statistics but never enter them.
    """
    if x.dim() == 3:
        mask = valid_mask(lengths, x.shape[0], x.shape[1], x.device)
    else:
        mask = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    if training:
        xf = x.to(torch.float64) if x.dtype == torch.float64 else x.float()
        mean, var, n = masked_moments(xf, mask)
        _update_running(running_mean, running_var, mean.detach(), var.detach(), n, momentum)
        mean, var = mean.to(x.dtype), var.to(x.dtype)
    else:
        mean, var = running_mean.to(x.dtype), running_var.to(x.dtype)
    return dice_pointwise(x, alpha, mean, var, gamma, beta, eps)


# --- 1. attention_pooling ------------------------------------------------------------------
def _activate(h, name, i, prelu_weights, dice_state):
    if name == "sigmoid":
        return torch.sigmoid(h)
    if name == "relu":
        return torch.relu(h)
    if name == "identity":
        return h
    if name == "prelu":
        a = prelu_weights[i]
        return torch.where(h >= 0, h, a * h)
    if name == "dice":
        alpha, rm, rv, gamma, beta, mask, training, momentum, eps = dice_state(i)
        if training:
            mean, var, n = masked_moments(h, mask)
            _update_running(rm, rv, mean.detach(), var.detach(), n, momentum)
        else:
            mean, var = rm.to(h.dtype), rv.to(h.dtype)
        return dice_pointwise(h, alpha, mean, var, gamma, beta, eps)
    raise ValueError(f"unknown activation {name!r}")


def _unit_input(query, keys, lengths, offsets):
    """The attention MLP's input ``[B, C, T, 4D]`` with the padded keys and the valid masks."""
    if offsets is not None:
        kp, lengths = jagged_to_padded(keys, offsets)
    else:
        kp = keys
    q = query.unsqueeze(1) if query.dim() == 2 else query  # [B, C, D]
    B, C, D = q.shape
    T = kp.shape[1]
    mask = valid_mask(lengths, B, T, keys.device)  # [B, T]
    # [B, C, T, 4D]: the concatenation the fused kernels never build
    qe = q.unsqueeze(2).expand(B, C, T, D)
    ke = kp.unsqueeze(1).expand(B, C, T, D)
    h = torch.cat([qe, ke, qe - ke, qe * ke], dim=-1)
    return h, kp, mask, mask.unsqueeze(1).expand(B, C, T)


def attention_pooling(
    query: torch.Tensor,
    keys: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    *,
    lengths: Optional[torch.Tensor] = None,
    offsets: Optional[torch.Tensor] = None,
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
    """The local activation unit and weighted sum pooling, paper eq. (1.2), as DIN code writes it.

    ``V_U(A) = sum_j a(e_j, v_A) e_j`` where ``a`` is an MLP over ``[q, k, q - k, q * k]``.
    ``query [B, D]`` or ``[B, C, D]`` (C candidates share one history); keys ``[B, T, D]`` with
    ``lengths`` or jagged ``[N, D]`` with ``offsets``. Returns ``out`` shaped like ``query``, and
    with ``return_weights`` the attention weights (``[B, T]``/``[N]``, or ``[B, C, T]``/``[N, C]``).
    """
    jagged = offsets is not None
    single = query.dim() == 2
    h, kp, mask, mask_bct = _unit_input(query, keys, lengths, offsets)

    def dice_state(i):
        return (
            dice_alpha[i],
            dice_running_mean[i] if dice_running_mean is not None else None,
            dice_running_var[i] if dice_running_var is not None else None,
            dice_gamma[i] if dice_gamma is not None else None,
            dice_beta[i] if dice_beta is not None else None,
            mask_bct,
            training,
            momentum,
            eps,
        )

    n_hidden = len(weights) - 1
    for i in range(n_hidden):
        h = F.linear(h, weights[i], biases[i])
        h = _activate(h, activation, i, prelu_weights, dice_state)
    s = scale * F.linear(h, weights[-1], biases[-1]).squeeze(-1)  # [B, C, T]
    if normalization == "none":
        w = torch.where(mask_bct, s, torch.zeros_like(s))
    elif normalization == "softmax":
        s = s.masked_fill(~mask_bct, float("-inf"))
        s = s.masked_fill(~mask_bct.any(-1, keepdim=True), 0.0)  # empty rows: no -inf-only softmax
        w = torch.softmax(s, dim=-1)
        w = torch.where(mask_bct, w, torch.zeros_like(w))  # rows with no valid position: 0
    else:
        raise ValueError(f"unknown normalization {normalization!r}")
    out = torch.einsum("bct,btd->bcd", w, kp)
    if single:
        out, w = out.squeeze(1), w.squeeze(1)
    if not return_weights:
        return out
    if jagged:
        w = w[mask] if single else w.transpose(1, 2)[mask]  # [N] or [N, C]
    return out, w


def attention_pooling_stats(
    query: torch.Tensor,
    keys: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    *,
    lengths: Optional[torch.Tensor] = None,
    offsets: Optional[torch.Tensor] = None,
    activation: str = "dice",
    prelu_weights: Optional[Sequence[torch.Tensor]] = None,
    dice_alpha: Optional[Sequence[torch.Tensor]] = None,
    dice_mean: Optional[Sequence[torch.Tensor]] = None,
    dice_var: Optional[Sequence[torch.Tensor]] = None,
    dice_gamma: Optional[Sequence[torch.Tensor]] = None,
    dice_beta: Optional[Sequence[torch.Tensor]] = None,
    eps: float = 1e-8,
):
    """The batch statistics Dice takes in training for hidden layer ``L = len(weights) - 1``.

    ``weights``/``biases`` hold hidden layers ``0..L`` (no output layer). Returns the mean and the
    biased variance of layer L's pre-activation over the valid positions (and candidates); the
    layers below apply their activation with the given statistics ``dice_mean``/``dice_var``.
    Chaining it layer by layer gives the statistics of ``attention_pooling`` in training.
    """
    h, _, _, mask_bct = _unit_input(query, keys, lengths, offsets)

    def dice_state(i):
        return (
            dice_alpha[i],
            dice_mean[i],
            dice_var[i],
            dice_gamma[i] if dice_gamma is not None else None,
            dice_beta[i] if dice_beta is not None else None,
            mask_bct,
            False,  # the statistics of layers below L are given
            0.0,
            eps,
        )

    L = len(weights) - 1
    for i in range(L):
        h = F.linear(h, weights[i], biases[i])
        h = _activate(h, activation, i, prelu_weights, dice_state)
    mean, var, _ = masked_moments(F.linear(h, weights[L], biases[L]), mask_bct)
    return mean, var


# --- 4. embedding attention pooling ------------------------------------------------------------
def embedding_keys(tables, ids, *, lengths=None, offsets=None, padding_idx=None):
    """The keys ``concat_f tables[f][ids[f]]`` that ``embedding_attention_pooling`` never stores,
    as ``nn.Embedding(sparse=True)`` lookups (so each table's gradient is sparse).

    Padded ids ``[B, T]`` may hold anything at padding positions (``t >= lengths[b]``): only the
    valid positions are looked up, and the padding keys are zeros, so a table's gradient has rows
    for the ids of valid positions only.
    ``padding_idx``: None, one int for every table, or one entry (int or None) per table.
    """
    if padding_idx is None or isinstance(padding_idx, int):
        padding_idx = [padding_idx] * len(tables)
    mask = None
    if offsets is None and lengths is not None:
        mask = valid_mask(lengths, ids[0].shape[0], ids[0].shape[1], ids[0].device)
    parts = []
    for table, idx, pad in zip(tables, ids, padding_idx):
        idx = idx.long()
        if mask is None:
            parts.append(F.embedding(idx, table, padding_idx=pad, sparse=True))
            continue
        e = F.embedding(idx[mask], table, padding_idx=pad, sparse=True)  # [N, D_f]
        parts.append(e.new_zeros(*idx.shape, table.shape[1]).index_put((mask,), e))
    return torch.cat(parts, dim=-1)


def embedding_attention_pooling(query, tables, ids, weights, biases, *, lengths=None, offsets=None,
                                padding_idx=None, **options):
    """``attention_pooling(query, embedding_keys(tables, ids), ...)``: section 4 as its definition
    (an ``nn.Embedding`` gather per field, concatenated, then the local activation unit).
    ``options`` are :func:`attention_pooling`'s."""
    keys = embedding_keys(tables, ids, lengths=lengths, offsets=offsets, padding_idx=padding_idx)
    return attention_pooling(query, keys, weights, biases, lengths=lengths, offsets=offsets, **options)


# --- 3. mini-batch aware regularization ---------------------------------------------------------
def count_frequencies(indices: torch.Tensor, num_embeddings: int, padding_idx: Optional[int] = None):
    """``n_j``: occurrences of feature j in an index stream (any shape), as int64 ``[num_embeddings]``."""
    n = torch.bincount(indices.reshape(-1).to(torch.int64), minlength=num_embeddings)
    if padding_idx is not None:
        n[padding_idx] = 0
    return n


def _present_rows(indices, grad, num_embeddings, padding_idx):
    uniq, inverse = torch.unique(indices.to(torch.int64), return_inverse=True)
    g = grad.new_zeros(uniq.numel(), grad.shape[1]).index_add_(0, inverse, grad)
    if padding_idx is not None:
        keep = uniq != (padding_idx % num_embeddings)
        uniq, g = uniq[keep], g[keep]
    return uniq, g


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
    """Paper eq. (2.4), row by row: ``w_j <- w_j - lr * (g_j + lam / n_j * w_j)`` for present j.

    ``g_j`` sums the gradient rows of every occurrence of j in ``indices``. ``n_j == 0`` is
    treated as 1. Adagrad (``"adagrad"``: element-wise state, ``"adagrad_rowwise"``: one
    accumulator per row holding the mean of ``g**2``) sees the regularized gradient.
    """
    uniq, g = _present_rows(indices, grad, weight.shape[0], padding_idx)
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight[uniq].to(acc)
    n = freq[uniq].to(acc).clamp_min(1)
    g = g.to(acc) + (lam / n)[:, None] * w
    if optimizer == "sgd":
        new = w - lr * g
    elif optimizer == "adagrad":
        s = state[uniq].to(acc) + g * g
        state[uniq] = s.to(state.dtype)
        new = w - lr * g / (s.sqrt() + eps)
    elif optimizer == "adagrad_rowwise":
        s = state[uniq].to(acc) + (g * g).mean(1)
        state[uniq] = s.to(state.dtype)
        new = w - lr * g / (s.sqrt() + eps)[:, None]
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}")
    weight[uniq] = new.to(weight.dtype)
    return weight


def mba_penalty(weight, indices, freq, lam, padding_idx: Optional[int] = None):
    """``(lam / 2) * sum_{j in batch} ||w_j||^2 / n_j`` over distinct indices (``n_j == 0`` as 1)."""
    uniq = torch.unique(indices.to(torch.int64))
    if padding_idx is not None:
        uniq = uniq[uniq != (padding_idx % weight.shape[0])]
    n = freq[uniq].to(weight.dtype).clamp_min(1)
    return 0.5 * lam * ((weight[uniq] ** 2).sum(1) / n).sum()
