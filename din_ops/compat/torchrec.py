"""DIN on TorchRec: model-parallel embedding tables, din_ops' fused attention on their jagged output.

    import din_ops.compat.torchrec as trec

    model = trec.TorchRecDIN(num_items, num_categories, user_fields=(943, 2, 7, 21))
    # or trec.TorchRecDIN.from_din(din): the same network with a din_ops.models.DIN's weights
    kjt = trec.features(users, items, categories, hist_items, hist_categories, lengths=lengths)
    logits = model(kjt)                                        # [B, C]

    dmp = trec.shard(model, "row_wise", optimizer="rowwise_adagrad", lr=0.1)  # under torchrun
    mba = trec.MBA(model, lam=0.01, frequencies=trec.frequencies(model, batches))
    logits, penalty = dmp(kjt, mba=mba)
    (loss + penalty).backward()       # the fused optimizer updates the tables in the backward

Requires ``pip install --no-deps -r requirements-torchrec.txt`` (torchrec 1.8.0 with
fbgemm-gpu-cpu 1.8.0); nothing else in din_ops imports this module.

**The tables.** One ``torchrec.EmbeddingCollection`` holds every table of
:class:`din_ops.models.DIN`, each ``num + 1`` rows of width ``embed_dim`` (row 0 is the padding
id, as in DIN): ``user0``, ``user1``, ... (feature ``user{i}``, one id per user), ``item``
(features ``item``, the candidates, and ``hist_item``, the history) and ``category`` (features
``category`` and ``hist_category``). The candidate and the history share their tables, as in the
paper. A sequence ``EmbeddingCollection`` (not an ``EmbeddingBagCollection``) is used for every
table: its output for the history is the ``JaggedTensor`` that goes, values ``[N, 2E]`` and offsets
``[B + 1]``, straight into :func:`din_ops.attention_pooling`'s jagged layout, no padding anywhere.

**C candidates per user.** The ``item`` and ``category`` features hold C ids per user (the same C
for every user of the batch); the attention reads each user's history once for all C
(``query [B, C, 2E]``) and the logits are ``[B, C]``. With C = 1 this is DIN's ``forward``; with
C > 1 it equals ``DIN.forward`` on the user's row repeated C times.

**MBA with sharded tables** (:class:`MBA`). The mini-batch aware regularizer (paper eq. 2.4) is a
penalty added to the loss, taken on the rows the batch looked up:
``(lam / 2) * sum_j ||w_j||^2 / max(n_j, 1)`` over the distinct ids j of the (global) batch,
each once, the padding id excluded. Its gradient ``lam / max(n_j, 1) * w_j`` reaches each row
through the lookup's own backward, so it works with TorchRec's fused optimizers (FBGEMM TBE: the
optimizer runs inside the backward and never shows a gradient) as well as with any optimizer on
unfused tables, and equals :class:`din_ops.optim.MBASGD` / :class:`din_ops.optim.MBAAdagrad`
(tests/test_torchrec.py). Under several processes the distinct ids of every process are
all-gathered (one all-gather per step for all tables, an int64 per id, two with online counts) and
an id seen by several processes is counted by the lowest rank only; the frequencies ``n`` are kept
replicated on every process (int64 per row: 8 bytes against ``4 * embed_dim`` for the row
itself), given (:func:`frequencies`) or counted on the fly from the global batches.

**Sharding** (:func:`shard`). ``DistributedModelParallel`` with the ``fused`` compute kernel
(FBGEMM TBE with the optimizer in the backward: SGD, Adagrad or row-wise Adagrad, all "exact":
the rows of duplicate ids are summed before the update), ``row_wise`` (every table split in
contiguous row blocks over the processes) or ``table_wise`` (whole tables, placed greedily on the
process with the fewest rows so far). The MLPs are data parallel (DDP, averaged gradients); they
train with any torch optimizer over :func:`dense_parameters`. TorchRec divides the gradients of the
embedding all-to-all by the world size (``torchrec.distributed.comm_ops.get_gradient_division``),
so each process' loss is the mean over its own examples and the training equals one process on
the global batch. fbgemm-gpu-cpu 1.8.0's ``dense`` kernel returns pooled rows for sequence tables
on CPU (so ``DistributedModelParallel`` fails in the output all-to-all): on CPU the unfused path
is the unsharded model (``nn.Embedding`` tables, any torch optimizer), on one process or in
``DistributedDataParallel`` (replicated tables, averaged gradients; the MBA scaling is the same).

**Padding.** TorchRec's tables have no ``padding_idx``: :func:`features` keeps only the valid
history positions, so id 0 is never looked up; an explicit 0 would be trained like any id (DIN's
``nn.Embedding(padding_idx=0)`` would not), though never regularized.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .. import reference as _ref
from ..models import DIN, _MLP, check_attention_options, check_din_config
from ..nn import AttentionPooling, Dice

try:
    import torchrec
    from torchrec import EmbeddingCollection, EmbeddingConfig, JaggedTensor, KeyedJaggedTensor
except ImportError as e:  # the optional extra
    raise ImportError("din_ops.compat.torchrec needs torchrec: pip install --no-deps -r requirements-torchrec.txt "
                      f"({e})") from e

__all__ = ["TorchRecDIN", "MBA", "features", "feature_keys", "frequencies", "shard", "sharding_plan",
           "dense_parameters", "table_bytes", "SHARDINGS", "OPTIMIZERS"]

SHARDINGS = ("row_wise", "table_wise")
OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")
PADDING_IDX = 0


def _user_keys(num_fields: int) -> List[str]:
    return [f"user{i}" for i in range(num_fields)]


def feature_keys(num_user_fields: int) -> List[str]:
    """The keys of the model's ``KeyedJaggedTensor``, in order."""
    return _user_keys(num_user_fields) + ["item", "category", "hist_item", "hist_category"]


def features(users: torch.Tensor, items: torch.Tensor, categories: torch.Tensor, hist_items: torch.Tensor,
             hist_categories: torch.Tensor, lengths: Optional[torch.Tensor] = None,
             offsets: Optional[torch.Tensor] = None) -> KeyedJaggedTensor:
    """A ``KeyedJaggedTensor`` of :class:`TorchRecDIN`'s features from :class:`din_ops.models.DIN`'s
    inputs: ``users [B, F]``, candidates ``items``/``categories`` ``[B]`` (or ``[B, C]``), the history
    padded ``[B, T]`` with ``lengths [B]`` (None: all T valid) or jagged ``[N]`` with ``offsets [B + 1]``.
    Only the valid history positions are kept (key order: :func:`feature_keys`)."""
    B = items.shape[0]
    items, categories = items.reshape(B, -1), categories.reshape(B, -1)
    if items.shape != categories.shape:
        raise ValueError(f"categories must have the shape of items {tuple(items.shape)}, "
                         f"got {tuple(categories.shape)}")
    C = items.shape[1]
    if offsets is not None:
        hist_len = offsets[1:] - offsets[:-1]
        hi, hc = hist_items.reshape(-1), hist_categories.reshape(-1)
    else:
        T = hist_items.shape[1]
        hist_len = torch.full((B,), T, dtype=torch.int64) if lengths is None else lengths.to(torch.int64)
        mask = _ref.valid_mask(hist_len, B, T, hist_items.device)
        hi, hc = hist_items[mask], hist_categories[mask]
    F = users.shape[1] if users.dim() == 2 else 0
    ones = torch.ones(B, dtype=torch.int64, device=items.device)
    cand = torch.full((B,), C, dtype=torch.int64, device=items.device)
    values = [users[:, i] for i in range(F)] + [items.reshape(-1), categories.reshape(-1), hi, hc]
    hist_len = hist_len.to(device=items.device, dtype=torch.int64)
    lens = [ones] * F + [cand, cand, hist_len, hist_len]
    return KeyedJaggedTensor.from_lengths_sync(keys=feature_keys(F), lengths=torch.cat(lens),
                                               values=torch.cat([v.to(torch.int64) for v in values]))


def _table_features(num_user_fields: int) -> Dict[str, List[str]]:
    out = {k: [k] for k in _user_keys(num_user_fields)}
    out["item"] = ["item", "hist_item"]
    out["category"] = ["category", "hist_category"]
    return out


class TorchRecDIN(nn.Module):
    """:class:`din_ops.models.DIN` with its tables in one ``torchrec.EmbeddingCollection``.

    Arguments as :class:`din_ops.models.DIN` (``backend="din_ops"``, attention pooling). Under the
    same seed it draws the same initial parameters as ``DIN`` (each table ``N(0, init_std^2)``,
    row 0 zero, then the attention unit and the MLP); :meth:`from_din` copies a ``DIN``'s weights.

    ``forward(features, mba=None)``: ``features`` is a ``KeyedJaggedTensor`` with the keys of
    :func:`feature_keys` (:func:`features` builds one): one id per user for each ``user{i}``, C ids
    per user for ``item`` and ``category``, the history for ``hist_item`` and ``hist_category``
    (the same lengths). Returns logits ``[B, C]``; with an :class:`MBA`, ``(logits, penalty)``.
    :meth:`check_features` checks the input first (a ValueError naming the key).
    The penalty is taken inside ``forward`` so that ``DistributedModelParallel`` (which wraps the
    model in DDP) sees one forward per step.
    """

    def __init__(self, num_items: int, num_categories: int, user_fields: Sequence[int] = (), *, embed_dim: int = 16,
                 attention_units: Sequence[int] = (80, 40), attention_activation: str = "sigmoid",
                 attention_normalization: str = "none", mlp_units: Sequence[int] = (200, 80),
                 mlp_activation: str = "prelu", init_std: float = 0.05, device: Optional[torch.device] = None):
        super().__init__()
        check_din_config(num_items, num_categories, user_fields, embed_dim, attention_units, mlp_units, init_std)
        check_attention_options(attention_activation, attention_normalization)
        self.embed_dim = embed_dim
        self.num_user_fields = len(user_fields)

        def init(w):  # DIN's tables: N(0, init_std^2); the padding row is zeroed below
            with torch.no_grad():
                w.normal_(0.0, init_std)

        sizes = dict(zip(_user_keys(len(user_fields)), user_fields), item=num_items, category=num_categories)
        # rows of each table, kept here: DistributedModelParallel replaces self.embeddings in place
        self.table_rows = {name: sizes[name] + 1 for name in _table_features(len(user_fields))}
        tables = [EmbeddingConfig(name=name, num_embeddings=self.table_rows[name], embedding_dim=embed_dim,
                                  feature_names=feats, init_fn=init)
                  for name, feats in _table_features(len(user_fields)).items()]
        # the tables draw in DIN's order (users, item, category), then the unit, then the MLP
        self.embeddings = EmbeddingCollection(tables=tables, device=device)
        with torch.no_grad():  # not in init_fn: sharding calls it again on each shard (then copies these rows in)
            for emb in self.embeddings.embeddings.values():
                emb.weight[PADDING_IDX].zero_()
        d = 2 * embed_dim
        self.attention = AttentionPooling(d, hidden_units=attention_units, activation=attention_activation,
                                          normalization=attention_normalization, device=device)
        self.mlp = _MLP(embed_dim * len(user_fields) + 2 * d, mlp_units, mlp_activation, "din_ops")
        if device is not None:
            self.mlp.to(device)

    @classmethod
    def from_din(cls, din: DIN, **kwargs) -> "TorchRecDIN":
        """The same network as ``din`` (attention pooling, ``backend="din_ops"``), its weights copied."""
        if din.attention is None:
            raise ValueError("from_din needs a DIN with attention pooling (BaseModel's sum pooling is not built)")
        att = din.attention
        mlp = din.mlp
        first = mlp.acts[0] if len(mlp.acts) else None
        act = "dice" if isinstance(first, Dice) else "relu" if isinstance(first, nn.ReLU) else "prelu"
        tables = din.tables()
        user_fields = [tables[k].num_embeddings - 1 for k in _user_keys(len(din.user_embeddings))]
        model = cls(tables["item"].num_embeddings - 1, tables["category"].num_embeddings - 1, user_fields,
                    embed_dim=din.embed_dim, attention_units=[l.out_features for l in att.layers],
                    attention_activation=att.activation, attention_normalization=att.normalization,
                    mlp_units=[l.out_features for l in mlp.layers], mlp_activation=act, **kwargs)
        model.load_din_state_(din)
        return model

    @torch.no_grad()
    def load_din_state_(self, din: DIN) -> "TorchRecDIN":
        """Copies ``din``'s tables, attention unit and MLP into this (unsharded) model."""
        for name, emb in din.tables().items():
            self.embeddings.embeddings[name].weight.copy_(emb.weight)
        self.attention.load_state_dict(din.attention.state_dict())
        self.mlp.load_state_dict(din.mlp.state_dict())
        return self

    def table_features(self) -> Dict[str, List[str]]:
        """``{table: [feature keys]}`` (the candidate and history features share a table)."""
        return _table_features(self.num_user_fields)

    def check_features(self, features: KeyedJaggedTensor) -> None:
        """``forward``'s input: every key, one id per user field, the history's two features of one
        length, ids in range of their tables (read on the host, one read for every range)."""
        if not isinstance(features, KeyedJaggedTensor):
            raise TypeError(f"features must be a torchrec KeyedJaggedTensor, got {type(features).__name__}")
        want = feature_keys(self.num_user_fields)
        missing = [k for k in want if k not in features.keys()]
        if missing:
            raise ValueError(f"features lacks the keys {missing} (it needs {want}; "
                             "see din_ops.compat.torchrec.features)")
        jts = features.to_dict()
        for k in _user_keys(self.num_user_fields):
            if bool((jts[k].lengths() != 1).any()):
                raise ValueError(f"features[{k!r}] must hold one id per user")
        if not torch.equal(jts["hist_item"].lengths(), jts["hist_category"].lengths()):
            raise ValueError("features['hist_item'] and features['hist_category'] must have the same lengths")
        named = [(k, jts[k].values(), t) for t, feats in self.table_features().items() for k in feats]
        named = [x for x in named if x[1].numel() > 0]
        if not named:
            return
        bounds = torch.stack([torch.stack([v.min(), v.max()]).to(torch.int64) for _, v, _ in named]).tolist()
        for (k, _, t), (lo, hi) in zip(named, bounds):
            if lo < 0 or hi >= self.table_rows[t]:
                raise ValueError(f"features[{k!r}] must lie in [0, {self.table_rows[t]}) (ids of table {t!r}, "
                                 f"0 pads), got values in [{lo}, {hi}]")

    def forward(self, features: KeyedJaggedTensor, mba: Optional["MBA"] = None):
        self.check_features(features)
        emb = self.embeddings(features)
        if hasattr(emb, "wait"):  # DistributedModelParallel: the output all-to-all's awaitable
            emb = emb.wait()
        B = features.stride()
        cand = emb["item"].values()
        C = cand.shape[0] // B if B else 0
        if cand.shape[0] != B * C or emb["category"].values().shape[0] != B * C:
            raise ValueError("every user of a batch needs the same number C of candidate items and categories")
        query = torch.cat([cand, emb["category"].values()], dim=-1).view(B, C, 2 * self.embed_dim)
        hist = emb["hist_item"]
        hist_cat = emb["hist_category"].values()
        if hist_cat.shape[0] != hist.values().shape[0]:
            raise ValueError("hist_item and hist_category must have the same lengths")
        keys = torch.cat([hist.values(), hist_cat], dim=-1)  # [N, 2E], jagged as it came
        interest = self.attention(query, keys, offsets=hist.offsets())  # [B, C, 2E]
        users = [emb[k].values() for k in _user_keys(self.num_user_fields)]  # [B, E] each
        parts = [u.unsqueeze(1).expand(B, C, self.embed_dim) for u in users] + [query, interest]
        x = torch.cat(parts, dim=-1).view(B * C, -1)  # PReLU and Dice take [N, H]
        logits = self.mlp(x).view(B, C)
        if mba is None:
            return logits
        return logits, mba.penalty(features, emb)


# --- MBA ---------------------------------------------------------------------------------------------
def frequencies(model: TorchRecDIN, batches: Iterable[KeyedJaggedTensor]) -> Dict[str, torch.Tensor]:
    """``{table: n}``: occurrences of each id in ``batches`` (``KeyedJaggedTensor``s of the whole
    training set), int64 ``[num_embeddings]``, the padding id not counted. Equal to
    :meth:`din_ops.models.DIN.frequencies` on the same data."""
    sizes = model.table_rows
    counts = {t: torch.zeros(n, dtype=torch.int64) for t, n in sizes.items()}
    for kjt in batches:
        model.check_features(kjt)
        for t, feats in model.table_features().items():
            ids = torch.cat([kjt[f].values() for f in feats]).to(torch.int64)
            counts[t] += torch.bincount(ids, minlength=sizes[t])
    for c in counts.values():
        c[PADDING_IDX] = 0
    return counts


class MBA:
    """Mini-batch aware regularization (paper eq. 2.4) of :class:`TorchRecDIN`'s tables, as a penalty
    on the looked-up rows: pass it to the model's ``forward`` and add the penalty to the loss.

    Args:
        model: the (unsharded) model, for its tables and their features.
        lam: the regularization strength lambda.
        frequencies: ``{table: n [num_embeddings]}`` counts over the training set
            (:func:`frequencies`), replicated on every process (copied: :attr:`counts` holds them).
            Tables left out are counted on the fly: each batch's occurrences (of every process)
            are added before its penalty is taken, as :mod:`din_ops.optim` counts online.
        process_group: the processes that share the global batch (default: the world, when
            ``torch.distributed`` is initialized).

    The penalty is ``(lam / 2) * sum_j ||w_j||^2 / max(n_j, 1)`` over the distinct ids j of the
    global batch (each once, the padding id 0 left out), on the rows looked up for j. Under ``W > 1``
    processes, each process' share is the ids it saw that no lower rank saw, times ``W`` when
    TorchRec divides the embedding gradients by the world size (its default), so the rows' gradient
    summed over processes is ``lam / max(n_j, 1) * w_j`` and the processes' losses add up to the
    single-process loss ``mean(bce) + penalty`` times ``W``.
    """

    def __init__(self, model: TorchRecDIN, lam: float, frequencies: Optional[Mapping[str, torch.Tensor]] = None,
                 process_group=None):
        from ..ops.mba import _check_number

        self.lam = _check_number(lam, "lam")
        self.tables = model.table_features()
        sizes = model.table_rows
        frequencies = dict(frequencies or {})
        unknown = set(frequencies) - set(sizes)
        if unknown:
            raise ValueError(f"frequencies has tables the model does not: {sorted(unknown)}")
        # every table's counts in one int64 tensor (``counts[t]`` are views of it), given ones copied
        self._base, total = {}, 0
        for t in self.tables:
            self._base[t] = total
            total += sizes[t]
        self._flat = torch.zeros(total, dtype=torch.int64)
        self._online_mask = torch.zeros(total, dtype=torch.int64)
        self.counts: Dict[str, torch.Tensor] = {}
        self.online = set()
        for t in self.tables:
            n, view = sizes[t], self._flat[self._base[t]:self._base[t] + sizes[t]]
            if t in frequencies:
                f = frequencies[t]
                if not isinstance(f, torch.Tensor) or tuple(f.shape) != (n,):
                    raise ValueError(f"frequencies[{t!r}] must be a tensor of shape [{n}]")
                view.copy_(f)
            else:
                self._online_mask[self._base[t]:self._base[t] + n] = 1
                self.online.add(t)
            self.counts[t] = view
        self.process_group = process_group

    def _world(self) -> Tuple[int, int]:
        if not (dist.is_available() and dist.is_initialized()):
            return 1, 0
        return dist.get_world_size(self.process_group), dist.get_rank(self.process_group)

    def _gather(self, t: torch.Tensor, world: int) -> List[torch.Tensor]:
        """Every process' 1-D int64 tensor (sizes differ)."""
        n = torch.tensor([t.numel()], dtype=torch.int64)
        sizes = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(sizes, n, group=self.process_group)
        sizes = [int(s) for s in sizes]
        pad = t.new_zeros(max(sizes))
        pad[:t.numel()] = t
        out = [torch.empty_like(pad) for _ in range(world)]
        dist.all_gather(out, pad, group=self.process_group)
        return [o[:s] for o, s in zip(out, sizes)]

    def penalty(self, features: KeyedJaggedTensor, embeddings: Mapping[str, JaggedTensor]) -> torch.Tensor:
        """This process' penalty term for the batch ``features`` whose looked-up rows are ``embeddings``."""
        world, rank = self._world()
        scale = world if world > 1 and torchrec.distributed.comm_ops.get_gradient_division() else 1
        ids, rows = [], []
        for table, feats in self.tables.items():
            t_ids = torch.cat([features[f].values() for f in feats]).to(torch.int64)
            keep = t_ids != PADDING_IDX
            ids.append(t_ids[keep] + self._base[table])  # one id space for all tables: one unique, one gather
            rows.append(torch.cat([embeddings[f].values() for f in feats])[keep])
        ids, rows = torch.cat(ids), torch.cat(rows)
        uniq, inverse, occurrences = torch.unique(ids, return_inverse=True, return_counts=True)
        # one looked-up row per distinct id: the lookup's backward sums into the table row
        first = torch.full((uniq.numel(),), ids.numel(), dtype=torch.int64).scatter_reduce_(
            0, inverse, torch.arange(ids.numel()), "amin")
        owned = None
        if world > 1:
            online = bool(self.online)
            parts = self._gather(torch.cat([uniq, occurrences]) if online else uniq, world)
            all_uniq = [p[:p.numel() // 2] for p in parts] if online else parts
            if online:
                for u, p in zip(all_uniq, parts):
                    self._online_add(u, p[p.numel() // 2:])
            if rank > 0:  # an id seen by a lower rank is that rank's
                owned = ~torch.isin(uniq, torch.cat(all_uniq[:rank]))
        elif self.online:
            self._online_add(uniq, occurrences)
        n = self._flat[uniq].clamp_min(1).to(rows.dtype)
        w = rows[first]
        terms = (w * w).sum(1) / n
        if owned is not None:
            terms = terms[owned]
        return terms.sum() * (0.5 * self.lam * scale)

    def _online_add(self, uniq: torch.Tensor, occurrences: torch.Tensor) -> None:
        self._flat.index_add_(0, uniq, occurrences * self._online_mask[uniq])


# --- DistributedModelParallel --------------------------------------------------------------------------
def _emb_optim(name: str):
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    table = {"sgd": EmbOptimType.EXACT_SGD, "adagrad": EmbOptimType.EXACT_ADAGRAD,
             "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD}
    if name not in table:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    return table[name]


def sharding_plan(model: TorchRecDIN, sharding: str, world_size: int, sharder=None):
    """A ``ShardingPlan`` for ``model.embeddings``: every table ``row_wise`` over the processes, or
    ``table_wise`` with each table (largest first) on the process holding the fewest rows so far.
    Compute kernel ``fused`` (FBGEMM TBE, the optimizer in the backward)."""
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise, table_wise
    from torchrec.distributed.types import ShardingPlan

    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")
    sharder = sharder or EmbeddingCollectionSharder()
    configs = model.embeddings.embedding_configs()
    if sharding == "row_wise":
        per_table = {c.name: row_wise(compute_kernel="fused") for c in configs}
    else:
        load = [0] * world_size
        per_table = {}
        for c in sorted(configs, key=lambda c: -c.num_embeddings):
            r = min(range(world_size), key=lambda i: (load[i], i))
            load[r] += c.num_embeddings
            per_table[c.name] = table_wise(rank=r, compute_kernel="fused")
    module_plan = construct_module_sharding_plan(model.embeddings, per_table, sharder=sharder,
                                                 local_size=world_size, world_size=world_size, device_type="cpu")
    return ShardingPlan({"embeddings": module_plan})


def shard(model: TorchRecDIN, sharding: str = "row_wise", *, optimizer: str = "rowwise_adagrad", lr: float = 0.01,
          eps: float = 1e-10, process_group=None, device: Optional[torch.device] = None):
    """``DistributedModelParallel(model)``: the tables sharded (:func:`sharding_plan`) and trained by
    the fused ``optimizer`` (``sgd``, ``adagrad``, ``rowwise_adagrad``: FBGEMM's exact kernels) at
    ``lr`` with ``eps``; the rest of the model data parallel (train it with an optimizer over
    :func:`dense_parameters`). Every process must call it with the same (same-seeded) ``model``:
    each keeps its shards of the tables as they are. ``torch.distributed`` must be initialized."""
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingEnv

    pg = process_group or dist.GroupMember.WORLD
    sharder = EmbeddingCollectionSharder(fused_params={"optimizer": _emb_optim(optimizer), "learning_rate": lr,
                                                       "eps": eps})
    plan = sharding_plan(model, sharding, dist.get_world_size(pg), sharder)
    return DistributedModelParallel(model, env=ShardingEnv.from_process_group(pg), device=device or torch.device("cpu"),
                                    plan=plan, sharders=[sharder])


def _is_table(name: str) -> bool:
    return name.startswith("embeddings.") or ".embeddings.embeddings." in name


def dense_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The parameters outside the embedding tables (the attention unit, the MLP), sharded or not."""
    return [p for n, p in model.named_parameters() if not _is_table(n)]


def table_bytes(model: nn.Module) -> Dict[str, int]:
    """Bytes this process holds for the tables: ``weights`` (its shards) and ``optimizer`` (the fused
    optimizer's state of its shards, e.g. one float per row for row-wise Adagrad)."""
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if _is_table(n))
    state = 0
    opt = getattr(model, "fused_optimizer", None)
    if opt is not None:
        for per_param in opt.state.values():
            for v in per_param.values():
                if hasattr(v, "local_shards"):
                    state += sum(s.tensor.numel() * s.tensor.element_size() for s in v.local_shards())
                elif isinstance(v, torch.Tensor):
                    state += v.numel() * v.element_size()
    return {"weights": weights, "optimizer": state}
