"""MovieLens-100K as a CTR data set with behaviour histories, for the DIN example.

The data is the copy of ML-100K shipped inside the ``recbole==1.2.1`` wheel
(``recbole/dataset_example/ml-100k/``; ``pip install --no-deps recbole==1.2.1``), read with the
standard library and NumPy only (recbole itself is not imported).

One example per rating: the user's profile (user id, gender, age group, occupation), the rated
movie and its category (the first genre listed for it), the label ``rating >= 4``, and the
history: the movies the user rated strictly earlier (with their categories), oldest first,
truncated to the last ``max_len``. The split is by time over all ratings: the earliest
``1 - test_fraction`` are the training set, the rest the test set.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Dict, Iterator, Optional

import numpy as np
import torch

AGE_EDGES = (18, 25, 35, 45, 50, 56)  # MovieLens-1M's age groups


def dataset_dir(path: Optional[str] = None) -> str:
    """The folder holding ``ml-100k.inter``, ``.item`` and ``.user`` (default: inside recbole)."""
    if path:
        return path
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("MovieLens-100K is read from the recbole wheel: "
                                "pip install --no-deps recbole==1.2.1 (or pass --data-dir)")
    return os.path.join(list(spec.submodule_search_locations)[0], "dataset_example", "ml-100k")


def _read(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        header = [h.split(":")[0] for h in f.readline().rstrip("\n").split("\t")]
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    return header, rows


class _Vocab(dict):
    """token -> id, ids from 1 (0 is padding)."""

    def id(self, token):
        if token not in self:
            self[token] = len(self) + 1
        return self[token]


@dataclass
class Split:
    users: torch.Tensor          # [M, 4] int64: user id, gender, age group, occupation
    items: torch.Tensor          # [M]
    categories: torch.Tensor     # [M]
    hist_items: torch.Tensor     # [M, T] (0 pads the tail)
    hist_categories: torch.Tensor
    lengths: torch.Tensor        # [M]
    labels: torch.Tensor         # [M] float32

    def __len__(self):
        return self.items.shape[0]

    def head(self, n: Optional[int]) -> "Split":
        """The first ``n`` examples (all when ``n`` is None)."""
        if n is None:
            return self
        return Split(*(getattr(self, f)[:n] for f in self.__dataclass_fields__))

    def batch(self, idx) -> Dict[str, torch.Tensor]:
        L = self.lengths[idx]
        T = max(int(L.max()) if L.numel() else 0, 1)  # trim the batch to its longest history
        return dict(users=self.users[idx], items=self.items[idx], categories=self.categories[idx],
                    hist_items=self.hist_items[idx, :T], hist_categories=self.hist_categories[idx, :T],
                    lengths=L, labels=self.labels[idx])

    def batches(self, batch_size: int, generator: Optional[torch.Generator] = None,
                shuffle: bool = False) -> Iterator[Dict[str, torch.Tensor]]:
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for s in range(0, n, batch_size):
            yield self.batch(order[s:s + batch_size])


@dataclass
class MovieLens100K:
    train: Split
    test: Split
    user_fields: tuple           # vocabulary size of each user field
    num_items: int
    num_categories: int


def load(data_dir: Optional[str] = None, max_len: int = 50, test_fraction: float = 0.2,
         threshold: float = 4.0) -> MovieLens100K:
    d = dataset_dir(data_dir)
    _, inter = _read(os.path.join(d, "ml-100k.inter"))
    _, item_rows = _read(os.path.join(d, "ml-100k.item"))
    _, user_rows = _read(os.path.join(d, "ml-100k.user"))

    uid, gender, age, occ, item_v, cat_v = (_Vocab() for _ in range(6))
    profile = {}
    for u, a, g, o, _zip in user_rows:
        profile[u] = (uid.id(u), gender.id(g), int(np.searchsorted(AGE_EDGES, int(a), side="right")) + 1,
                      occ.id(o))
    item_cat = {}
    for it, _title, _year, genres in item_rows:
        item_cat[it] = cat_v.id((genres.split() or ["unknown"])[0])
        item_v.id(it)

    u_tok = [r[0] for r in inter]
    i_tok = [r[1] for r in inter]
    rating = np.array([float(r[2]) for r in inter])
    ts = np.array([float(r[3]) for r in inter])
    users = np.array([profile[u] for u in u_tok], dtype=np.int64)
    items = np.array([item_v.id(i) for i in i_tok], dtype=np.int64)
    cats = np.array([item_cat.get(i, cat_v.id("unknown")) for i in i_tok], dtype=np.int64)

    order = np.lexsort((items, users[:, 0], ts))  # time, then user, then item: deterministic
    users, items, cats, rating, ts = users[order], items[order], cats[order], rating[order], ts[order]
    M = len(items)
    hist_items = np.zeros((M, max_len), dtype=np.int64)
    hist_cats = np.zeros((M, max_len), dtype=np.int64)
    lengths = np.zeros(M, dtype=np.int64)
    by_user: Dict[int, list] = {}
    for k in range(M):
        by_user.setdefault(int(users[k, 0]), []).append(k)
    for rows in by_user.values():
        rows = np.asarray(rows)
        t_u = ts[rows]
        earlier = np.searchsorted(t_u, t_u, side="left")  # ratings strictly before each one
        for j, k in enumerate(rows):
            n = earlier[j]
            h = rows[max(0, n - max_len):n]
            lengths[k] = len(h)
            hist_items[k, :len(h)] = items[h]
            hist_cats[k, :len(h)] = cats[h]

    labels = (rating >= threshold).astype(np.float32)
    n_train = int(round(M * (1 - test_fraction)))

    def split(sl):
        t = torch.from_numpy
        return Split(t(users[sl]), t(items[sl]), t(cats[sl]), t(hist_items[sl]), t(hist_cats[sl]),
                     t(lengths[sl]), t(labels[sl]))

    fields = (len(uid), len(gender), len(AGE_EDGES) + 1, len(occ))
    return MovieLens100K(split(slice(0, n_train)), split(slice(n_train, M)), fields, len(item_v), len(cat_v))


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    labels = np.asarray(labels, dtype=bool)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = np.asarray(scores)[order]
    ranks = np.empty(len(s), dtype=np.float64)
    i = 0
    while i < len(s):  # average ranks over runs of equal scores
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1
        i = j + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Per-user AUC weighted by the user's number of examples (paper eq. 5.1), over users with both labels."""
    users = np.asarray(users)
    order = np.argsort(users, kind="mergesort")
    u, lab, sc = users[order], np.asarray(labels)[order], np.asarray(scores)[order]
    bounds = np.flatnonzero(np.diff(u)) + 1
    num = den = 0.0
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(u)]):
        y = lab[lo:hi]
        if 0 < y.sum() < len(y):
            num += (hi - lo) * auc(y, sc[lo:hi])
            den += hi - lo
    return num / den if den else float("nan")
