"""Complete CTR models built on din_ops: the paper's DIN and its BaseModel (Zhou et al., KDD 2018).

:class:`DIN` embeds the user-profile fields, the candidate item and its category, and the
behaviour history (items and their categories, sharing the candidate's tables), pools the history
with the local activation unit (:class:`din_ops.nn.AttentionPooling`), and scores
``[user fields, candidate, user interest]`` with an MLP whose hidden layers use Dice
(:class:`din_ops.nn.Dice`) or PReLU; the output is a logit (``predict`` applies the sigmoid).
:class:`BaseModel` is the same network with sum pooling of the history (the paper's baseline).

``backend="eager"`` builds the same network (same parameters, same initialization under the same
seed, same ``state_dict``) whose attention unit and Dice are plain PyTorch, written as DeepCTR-Torch
writes them (expand, concatenate ``[q, k, q - k, q * k]``, ``nn.Linear``, mask, ``bmm``). It is
the baseline the fused ops are measured against.

Embedding tables are ``nn.Embedding(sparse=True)`` with row 0 reserved for padding, so MBA
regularization (paper eq. 2.4) trains them in one line with :mod:`din_ops.optim`::

    model = din_ops.models.DIN(num_items, num_categories, user_fields=(943, 2, 7, 21))
    opt = din_ops.optim.MBAAdagrad(model.parameters(), lr=0.05, lam=0.01,
                                   frequencies=model.frequencies(batches),
                                   padding_idx=din_ops.optim.embedding_padding(model))
"""
from __future__ import annotations

from typing import Dict, Iterable, Mapping, Optional, Sequence

import numbers

import torch
from torch import nn

from . import _library as lib
from . import reference as _ref
from .nn import AttentionPooling, Dice, EmbeddingAttentionPooling
from .ops.attention_pooling import ACTIVATIONS, NORMALIZATIONS

__all__ = ["DIN", "BaseModel", "EagerAttentionPooling", "EagerDice", "BACKENDS", "distributed",
           "sync_sparse_grads_"]

BACKENDS = ("din_ops", "eager")


class EagerDice(Dice):
    """:class:`din_ops.nn.Dice` computed in plain PyTorch (same parameters and buffers).

    Statistics over the valid rows (all rows of ``x [N, C]``; ``t < lengths[b]`` of ``[B, T, C]``),
    running statistics updated like ``BatchNorm1d`` in training and used in eval mode.
    """

    def forward(self, x, lengths=None, offsets=None):
        return _ref.dice(x, self.alpha, self.running_mean, self.running_var, lengths=lengths, gamma=self.gamma,
                         beta=self.beta, training=self.training, momentum=self.momentum, eps=self.eps)


class EagerAttentionPooling(AttentionPooling):
    """:class:`din_ops.nn.AttentionPooling` in plain PyTorch, the way DIN implementations write it.

    Same parameters, initialization and results as the fused module; the ``[B, T, 4D]``
    concatenation and every hidden activation are materialized. Query ``[B, D]`` only.
    """

    def forward(self, query, keys, lengths: Optional[torch.Tensor] = None, offsets: Optional[torch.Tensor] = None,
                return_weights: bool = False):
        if query.dim() != 2:
            raise ValueError("EagerAttentionPooling takes query [B, D]")
        if offsets is not None:
            keys, lengths = _ref.jagged_to_padded(keys, offsets)
        B, T, D = keys.shape
        mask = _ref.valid_mask(lengths, B, T, keys.device)  # [B, T]
        q = query.unsqueeze(1).expand(B, T, D)
        h = torch.cat([q, keys, q - keys, q * keys], dim=-1)  # [B, T, 4D]
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if self.activation == "sigmoid":
                h = torch.sigmoid(h)
            elif self.activation == "relu":
                h = torch.relu(h)
            elif self.activation == "prelu":  # per channel of the last dim (nn.PReLU would take dim 1)
                h = torch.where(h >= 0, h, self.prelu[i].weight * h)
            elif self.activation == "dice":
                d = self.dice[i]
                h = _ref.dice(h, d.alpha, d.running_mean, d.running_var, lengths=lengths if lengths is not None
                              else torch.full((B,), T, device=keys.device), gamma=d.gamma, beta=d.beta,
                              training=self.training, momentum=d.momentum, eps=d.eps)
        s = self.output(h).squeeze(-1) * self.scale  # [B, T]
        if self.normalization == "softmax":
            s = s.masked_fill(~mask, float("-inf"))
            w = torch.softmax(s.masked_fill(~mask.any(1, keepdim=True), 0.0), dim=-1)
            w = w.masked_fill(~mask, 0.0)
        else:
            w = s.masked_fill(~mask, 0.0)
        out = torch.bmm(w.unsqueeze(1), keys).squeeze(1)
        if return_weights:
            return out, (w[mask] if offsets is not None else w)
        return out


def _check_count(v, name: str, minimum: int = 1):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")


def _check_counts(values, name: str):
    if isinstance(values, (str, bytes, torch.Tensor)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a sequence of ints, got {type(values).__name__}")
    for i, v in enumerate(values):
        _check_count(v, f"{name}[{i}]")


def check_attention_options(attention_activation, attention_normalization):
    """The attention unit's activation and normalization names of a DIN constructor."""
    if attention_activation not in ACTIVATIONS:
        raise ValueError(f"attention_activation must be one of {ACTIVATIONS}, got {attention_activation!r}")
    if attention_normalization not in NORMALIZATIONS:
        raise ValueError(f"attention_normalization must be one of {NORMALIZATIONS}, "
                         f"got {attention_normalization!r}")


def check_din_config(num_items, num_categories, user_fields, embed_dim, attention_units, mlp_units, init_std):
    """Constructor arguments of :class:`DIN` (the activations and backend are checked by name)."""
    _check_count(num_items, "num_items")
    _check_count(num_categories, "num_categories")
    _check_counts(user_fields, "user_fields")
    _check_count(embed_dim, "embed_dim")
    _check_counts(attention_units, "attention_units")
    _check_counts(mlp_units, "mlp_units")
    if isinstance(init_std, bool) or not isinstance(init_std, numbers.Real) or not 0 <= init_std < float("inf"):
        raise ValueError(f"init_std must be a finite number >= 0, got {init_std!r}")


def _check_ids(t, name: str, dims: int, device):
    lib.check_tensor(t, name, dims=dims, device=device)
    if t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int64 (or int32) ids, got {t.dtype}")


def check_din_inputs(model, users, items, categories, hist_items, hist_categories, lengths, offsets):
    """``DIN.forward``'s inputs: ids in range of their tables, shapes, devices, rows. The value
    checks read CPU tensors on the host (one read for every range); CUDA tensors get
    device-side asserts (or none): see :func:`din_ops.set_cuda_value_checks`."""
    device = model.item_embedding.weight.device
    _check_ids(items, "items", 1, device)
    B = items.shape[0]
    _check_ids(categories, "categories", 1, device)
    if categories.shape != items.shape:
        raise ValueError(f"categories must have shape [B] = [{B}] like items, got {tuple(categories.shape)}")
    F = len(model.user_embeddings)
    if F:
        _check_ids(users, "users", 2, device)
        if tuple(users.shape) != (B, F):
            raise ValueError(f"users must have shape [B, F] = [{B}, {F}] (one column per user field), "
                             f"got {tuple(users.shape)}")
    jagged = offsets is not None
    if isinstance(hist_items, torch.Tensor) and hist_items.dim() != (1 if jagged else 2):
        raise ValueError("offsets is for a jagged history hist_items [N]; a padded one [B, T] takes lengths"
                         if jagged else "a jagged history hist_items [N] needs offsets [B + 1]; a padded one "
                         f"is [B, T], got shape {tuple(hist_items.shape)}")
    _check_ids(hist_items, "hist_items", 1 if jagged else 2, device)
    _check_ids(hist_categories, "hist_categories", 1 if jagged else 2, device)
    if hist_categories.shape != hist_items.shape:
        raise ValueError(f"hist_categories must have the shape of hist_items {tuple(hist_items.shape)}, "
                         f"got {tuple(hist_categories.shape)}")
    if jagged:
        if lengths is not None:
            raise ValueError("lengths is for a padded history [B, T]; a jagged history [N] takes offsets")
        lib.check_offsets(offsets, B, hist_items.shape[0], device)
    else:
        if hist_items.shape[0] != B:
            raise ValueError(f"hist_items must have shape [B, T] with B = {B} (the batch of items), "
                             f"got {tuple(hist_items.shape)}")
        if lengths is not None:
            lib.check_lengths(lengths, B, hist_items.shape[1], device)
    mode = lib.value_check_mode(items)
    if mode == "off":
        return
    named = [("items", items, model.item_embedding), ("categories", categories, model.category_embedding),
             ("hist_items", hist_items, model.item_embedding),
             ("hist_categories", hist_categories, model.category_embedding)]
    named += [(f"users[:, {i}]", users[:, i], e) for i, e in enumerate(model.user_embeddings)]
    named = [x for x in named if x[1].numel() > 0]
    if not named:
        return
    if mode == "async":  # CUDA: device-side asserts, no host synchronization
        for name, t, emb in named:
            lib.check_index_range(t, emb.num_embeddings, name)
        return
    # one host synchronization for every range
    bounds = torch.stack([torch.stack([t.min(), t.max()]).to(torch.int64) for _, t, _ in named]).tolist()
    for (name, _, emb), (lo, hi) in zip(named, bounds):
        if lo < 0 or hi >= emb.num_embeddings:
            raise ValueError(f"{name} must lie in [0, {emb.num_embeddings}) (ids of its table, 0 pads), "
                             f"got values in [{lo}, {hi}]")


def check_score_inputs(model, users, items, categories, hist_items, hist_categories, lengths) -> int:
    """``DIN.score``'s inputs (one user, C candidates); returns C."""
    device = model.item_embedding.weight.device
    _check_ids(items, "items", 1, device)
    _check_ids(categories, "categories", 1, device)
    C = items.shape[0]
    if categories.shape != items.shape:
        raise ValueError(f"categories must have shape [C] = [{C}] like items, got {tuple(categories.shape)}")
    F = len(model.user_embeddings)
    if F:
        _check_ids(users, "users", 2, device)
        if tuple(users.shape) != (1, F):
            raise ValueError(f"users must have shape [1, F] = [1, {F}] (one user), got {tuple(users.shape)}")
    _check_ids(hist_items, "hist_items", 2, device)
    _check_ids(hist_categories, "hist_categories", 2, device)
    if hist_items.shape[0] != 1:
        raise ValueError(f"hist_items must have shape [1, T] (one user's history), got {tuple(hist_items.shape)}")
    if hist_categories.shape != hist_items.shape:
        raise ValueError(f"hist_categories must have the shape of hist_items {tuple(hist_items.shape)}, "
                         f"got {tuple(hist_categories.shape)}")
    if lengths is not None:
        lib.check_lengths(lengths, 1, hist_items.shape[1], device)
    named = [("items", items, model.item_embedding), ("categories", categories, model.category_embedding),
             ("hist_items", hist_items, model.item_embedding),
             ("hist_categories", hist_categories, model.category_embedding)]
    named += [(f"users[:, {i}]", users[:, i], e) for i, e in enumerate(model.user_embeddings)]
    for name, t, emb in named:
        lib.check_index_range(t, emb.num_embeddings, name)
    return C


def _check_backend(backend: str):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


class _MLP(nn.Module):
    """Hidden ``nn.Linear`` layers with Dice or PReLU, then a ``[1, H_last]`` output layer."""

    def __init__(self, in_features: int, hidden_units: Sequence[int], activation: str, backend: str):
        super().__init__()
        if activation not in ("dice", "prelu", "relu"):
            raise ValueError(f"mlp_activation must be 'dice', 'prelu' or 'relu', got {activation!r}")
        dims = [in_features] + list(hidden_units)
        self.layers = nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(len(hidden_units)))
        if activation == "dice":
            cls = Dice if backend == "din_ops" else EagerDice
            self.acts = nn.ModuleList(cls(h) for h in hidden_units)
        elif activation == "prelu":
            self.acts = nn.ModuleList(nn.PReLU(h) for h in hidden_units)
        else:
            self.acts = nn.ModuleList(nn.ReLU() for _ in hidden_units)
        self.output = nn.Linear(dims[-1], 1)

    def forward(self, x):
        for layer, act in zip(self.layers, self.acts):
            x = act(layer(x))
        return self.output(x).squeeze(-1)


class DIN(nn.Module):
    """Deep Interest Network (paper section 4, Figure 2, right).

    Args:
        num_items, num_categories: vocabulary sizes; ids run from 1, and 0 pads histories (the
            tables have ``num + 1`` rows, row 0 is ``padding_idx``).
        user_fields: vocabulary size of each categorical user-profile field (user id, gender,
            age group, ...), ids from 1 as well; one table per field.
        embed_dim: width of every embedding; the candidate and each behaviour are
            ``[item, category]`` embeddings of width ``2 * embed_dim``.
        attention_units, attention_activation, attention_normalization: the local activation
            unit (:class:`din_ops.nn.AttentionPooling`): hidden sizes, activation after each
            (``sigmoid`` as in the paper's code, ``dice``, ``prelu``, ``relu``, ``identity``),
            ``none`` (the paper: no softmax) or ``softmax``.
        mlp_units, mlp_activation: the top MLP (paper: 200, 80 with PReLU or Dice).
        pooling: ``attention`` (DIN) or ``sum`` (BaseModel).
        backend: ``din_ops`` (fused ops) or ``eager`` (plain PyTorch, same parameters).
        sparse: ``nn.Embedding(sparse=True)``, for :mod:`din_ops.optim` and MBA. With
            ``backend="din_ops"`` the history's lookups are then fused into the attention
            (:class:`din_ops.nn.EmbeddingAttentionPooling`: the keys ``[B, T, 2E]`` and their
            gradient are never stored; the tables get one gradient row per distinct id); dense
            tables keep plain ``nn.Embedding`` lookups.
        init_std: embeddings are drawn from ``N(0, init_std^2)`` (padding row 0).

    ``forward(users, items, categories, hist_items, hist_categories, lengths=None, offsets=None)``:
    ``users [B, F]`` (one column per user field), ``items [B]``, ``categories [B]``, and the
    history padded (``[B, T]`` with ``lengths [B]``; padding may hold any id) or jagged (``[N]``
    with ``offsets [B + 1]``). Returns logits ``[B]``.

    ``forward`` and :meth:`score` check their ids (in range of their tables), lengths and
    offsets: on the host for CPU tensors (a ValueError naming the argument and the values); on
    CUDA tensors with device-side asserts, or not at all, as :func:`din_ops.set_cuda_value_checks`
    says, so neither synchronizes and inference can be captured in a ``torch.cuda.CUDAGraph``.
    """

    def __init__(
        self,
        num_items: int,
        num_categories: int,
        user_fields: Sequence[int] = (),
        *,
        embed_dim: int = 16,
        attention_units: Sequence[int] = (80, 40),
        attention_activation: str = "sigmoid",
        attention_normalization: str = "none",
        mlp_units: Sequence[int] = (200, 80),
        mlp_activation: str = "prelu",
        pooling: str = "attention",
        backend: str = "din_ops",
        sparse: bool = True,
        init_std: float = 0.05,
    ):
        super().__init__()
        _check_backend(backend)
        check_din_config(num_items, num_categories, user_fields, embed_dim, attention_units, mlp_units, init_std)
        if pooling not in ("attention", "sum"):
            raise ValueError(f"pooling must be 'attention' or 'sum', got {pooling!r}")
        check_attention_options(attention_activation, attention_normalization)
        self.backend = backend
        self.pooling = pooling
        self.embed_dim = embed_dim

        def table(n):
            emb = nn.Embedding(n + 1, embed_dim, padding_idx=0, sparse=sparse)
            with torch.no_grad():
                emb.weight.normal_(0.0, init_std)
                emb.weight[0].zero_()
            return emb

        self.user_embeddings = nn.ModuleList(table(n) for n in user_fields)
        self.item_embedding = table(num_items)
        self.category_embedding = table(num_categories)
        d = 2 * embed_dim
        self.attention = None
        if pooling == "attention":
            cls = AttentionPooling if backend == "din_ops" else EagerAttentionPooling
            self.attention = cls(d, hidden_units=attention_units, activation=attention_activation,
                                 normalization=attention_normalization)
        self.mlp = _MLP(embed_dim * len(user_fields) + 2 * d, mlp_units, mlp_activation, backend)
        # din_ops with sparse tables: the history's lookups fused into the attention (keys never
        # stored). Not a submodule: it shares the tables and the attention, so the state_dict is
        # unchanged. Dense tables keep plain lookups: their gradient needs no distinct-id count,
        # which on CUDA is a host read.
        history = None
        if backend == "din_ops" and self.attention is not None and sparse:
            history = EmbeddingAttentionPooling((self.item_embedding, self.category_embedding), self.attention)
        object.__setattr__(self, "_history_pooling", history)

    def tables(self) -> Dict[str, nn.Embedding]:
        """The embedding tables by name (``user0``, ``user1``, ..., ``item``, ``category``)."""
        out = {f"user{i}": e for i, e in enumerate(self.user_embeddings)}
        out["item"] = self.item_embedding
        out["category"] = self.category_embedding
        return out

    def frequencies(self, batches: Iterable[Mapping[str, torch.Tensor]]) -> Dict[torch.Tensor, torch.Tensor]:
        """``{table weight: n}``: occurrences of each id in the batches, for MBA (paper eq. 2.4).

        Each batch is a mapping with ``users``, ``items``, ``categories``, ``hist_items``,
        ``hist_categories`` and ``lengths`` (padded history) like ``forward``'s arguments.
        """
        from .ops.mba import count_frequencies

        counts = {e.weight: torch.zeros(e.num_embeddings, dtype=torch.int64) for e in self.tables().values()}
        for b in batches:
            hist_mask = _ref.valid_mask(b["lengths"], *b["hist_items"].shape)
            streams = [(self.item_embedding, b["items"]), (self.item_embedding, b["hist_items"][hist_mask]),
                       (self.category_embedding, b["categories"]),
                       (self.category_embedding, b["hist_categories"][hist_mask])]
            streams += [(e, b["users"][:, i]) for i, e in enumerate(self.user_embeddings)]
            for emb, idx in streams:
                counts[emb.weight] += count_frequencies(idx.reshape(-1).cpu(), emb.num_embeddings, padding_idx=0)
        return counts

    def _history(self, hist_items, hist_categories):
        return torch.cat([self.item_embedding(hist_items), self.category_embedding(hist_categories)], dim=-1)

    def forward(self, users, items, categories, hist_items, hist_categories, lengths=None, offsets=None):
        check_din_inputs(self, users, items, categories, hist_items, hist_categories, lengths, offsets)
        query = torch.cat([self.item_embedding(items), self.category_embedding(categories)], dim=-1)  # [B, 2E]
        history = getattr(self, "_history_pooling", None)  # absent in modules pickled before it existed
        if history is not None:
            interest = history(query, [hist_items, hist_categories], lengths=lengths, offsets=offsets)
        else:
            keys = self._history(hist_items, hist_categories)  # [B, T, 2E] or [N, 2E]
            if self.attention is not None:
                interest = self.attention(query, keys, lengths=lengths, offsets=offsets)
            elif offsets is not None:
                seg = torch.repeat_interleave(torch.arange(offsets.numel() - 1, device=keys.device),
                                              offsets[1:] - offsets[:-1], output_size=keys.shape[0])
                interest = keys.new_zeros(query.shape).index_add_(0, seg, keys)
            else:
                mask = _ref.valid_mask(lengths, keys.shape[0], keys.shape[1], keys.device)
                interest = torch.bmm(mask.to(keys.dtype).unsqueeze(1), keys).squeeze(1)
        parts = [e(users[:, i]) for i, e in enumerate(self.user_embeddings)] + [query, interest]
        return self.mlp(torch.cat(parts, dim=-1))

    @torch.no_grad()
    def predict(self, *args, **kwargs) -> torch.Tensor:
        """Click probabilities ``sigmoid(forward(...))``."""
        return torch.sigmoid(self(*args, **kwargs))

    def score(self, users, items, categories, hist_items, hist_categories, lengths=None):
        """Serving: one user against C candidate ads; logits ``[C]``, equal to ``forward`` on the
        user's features and history repeated for each candidate.

        ``users [1, F]``, ``items [C]``, ``categories [C]``, the history ``hist_items [1, T]`` and
        ``hist_categories [1, T]`` with ``lengths [1]`` (None: all T valid). With
        ``backend="din_ops"`` the attention takes ``query [1, C, D]`` and reads the history once
        for all C candidates; the eager backend expands it to C rows, as DeepCTR-Torch users do.
        """
        C = check_score_inputs(self, users, items, categories, hist_items, hist_categories, lengths)
        query = torch.cat([self.item_embedding(items), self.category_embedding(categories)], dim=-1)  # [C, 2E]
        keys = self._history(hist_items, hist_categories)  # [1, T, 2E]
        if self.attention is None:
            mask = _ref.valid_mask(lengths, 1, keys.shape[1], keys.device)
            interest = torch.bmm(mask.to(keys.dtype).unsqueeze(1), keys).squeeze(1).expand(C, -1)
        elif self.backend == "din_ops":
            interest = self.attention(query.unsqueeze(0), keys, lengths=lengths).squeeze(0)  # [C, 2E]
        else:
            T = keys.shape[1]
            interest = self.attention(query, keys.expand(C, T, keys.shape[2]),
                                      lengths=None if lengths is None else lengths.expand(C))
        parts = [e(users[:, i]).expand(C, -1) for i, e in enumerate(self.user_embeddings)] + [query, interest]
        return self.mlp(torch.cat(parts, dim=-1))

    def serving(self) -> "DINServing":
        """A module whose ``forward`` is :meth:`score`, to export for serving (``torch.export``,
        AOTInductor, ONNX); it shares this model's parameters."""
        return DINServing(self)


class DINServing(nn.Module):
    """``forward(users [1, F], items [C], categories [C], hist_items [1, T], hist_categories [1, T],
    lengths [1])`` -> logits ``[C]``: :meth:`DIN.score` of the wrapped model, for export with a
    dynamic number of candidates C and history length T (``examples/serve_din.py``)."""

    def __init__(self, model: DIN):
        super().__init__()
        self.model = model

    def forward(self, users, items, categories, hist_items, hist_categories, lengths):
        return self.model.score(users, items, categories, hist_items, hist_categories, lengths)


class BaseModel(DIN):
    """The paper's BaseModel (section 4.1): :class:`DIN` with sum pooling of the behaviours."""

    def __init__(self, num_items: int, num_categories: int, user_fields: Sequence[int] = (), **kwargs):
        kwargs.pop("pooling", None)
        for k in ("attention_units", "attention_activation", "attention_normalization"):
            kwargs.pop(k, None)
        super().__init__(num_items, num_categories, user_fields, pooling="sum", **kwargs)


# --- data-parallel training -----------------------------------------------------------------------
def _sparse_tables(module: nn.Module):
    return [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Embedding) and m.sparse]


def distributed(model: nn.Module, process_group=None, **kwargs):
    """``DistributedDataParallel(model)`` for a model with ``nn.Embedding(sparse=True)`` tables.

    DDP averages the dense gradients; the sparse tables are left out of it and averaged by
    :func:`sync_sparse_grads_` (call it after ``backward``, before the optimizer step), which uses
    dense all-gathers only: DDP's own sparse all-reduce over gloo corrupted the heap now and then
    in our runs (torch 2.13, CPU; with or without din_ops in the model).
    """
    from torch.nn.parallel import DistributedDataParallel

    names = [f"{n}.weight" if n else "weight" for n, _ in _sparse_tables(model)]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return DistributedDataParallel(model, process_group=process_group, **kwargs)


@torch.no_grad()
def sync_sparse_grads_(model: nn.Module, process_group=None) -> None:
    """Averages the sparse gradients of ``model``'s embedding tables over the processes, in place.

    Each table's gradient rows (indices and values, duplicates summed first) are all-gathered and
    the result, divided by the world size, becomes the new sparse gradient: what DDP would compute,
    as a sum of the processes' sparse gradients. A table without gradient counts as empty.
    """
    import torch.distributed as dist

    world = dist.get_world_size(process_group)
    for _, emb in _sparse_tables(model):
        p = emb.weight
        if p.grad is not None:
            g = p.grad.coalesce()
            idx, val = g.indices()[0], g.values()
        else:
            idx = torch.zeros(0, dtype=torch.int64, device=p.device)
            val = p.new_zeros((0, p.shape[1]))
        n = torch.tensor([idx.numel()], dtype=torch.int64, device=p.device)
        counts = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(counts, n, group=process_group)
        counts = [int(c) for c in counts]
        m = max(counts)
        idx_pad = torch.zeros(m, dtype=idx.dtype, device=p.device)
        idx_pad[:idx.numel()] = idx
        val_pad = val.new_zeros((m, val.shape[1]))
        val_pad[:val.shape[0]] = val
        all_idx = [torch.empty_like(idx_pad) for _ in range(world)]
        all_val = [torch.empty_like(val_pad) for _ in range(world)]
        dist.all_gather(all_idx, idx_pad, group=process_group)
        dist.all_gather(all_val, val_pad, group=process_group)
        idx = torch.cat([t[:c] for t, c in zip(all_idx, counts)])
        val = torch.cat([t[:c] for t, c in zip(all_val, counts)]) / world
        p.grad = torch.sparse_coo_tensor(idx[None], val, p.shape).coalesce()
