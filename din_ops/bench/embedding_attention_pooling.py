"""Providers for benchmarking embedding_attention_pooling (SPEC section 4): ids in, interest out.

A DIN history of two fields (item and category, ``D/2`` wide each, as the model concatenates
them) looked up from tables of ``E`` rows, then the attention unit and pooling:

- ``eager``: ``nn.Embedding(sparse=True)`` lookups of the padded ``[B, T]`` ids, concatenated
  to ``keys [B, T, D]``, then DeepCTR-Torch's attention (:func:`attention_pooling.eager`).
- ``compile``: the same lookups, then ``torch.compile`` of eager's attention (inductor does not
  compile the sparse embedding backward: with the lookups inside, the graph breaks there).
- ``gather+din_ops``: the same lookups, then ``din_ops.attention_pooling``: what a din_ops user
  writes without the fused lookup, and the pair the fused op is measured against.
- ``din_ops``: ``din_ops.embedding_attention_pooling``: the keys are never stored, and the
  tables' sparse gradients come out coalesced.

``fwd+bwd`` computes the gradients of the query, both tables (sparse) and the MLP. Padding
positions hold id 0 (``padding_idx``), as DIN histories do. Ids (``dist``):

- ``zipf`` (default): item ids Zipf(1.05)-distributed over ``E`` rows, the MBA benchmark's
  distribution (a few hot items occur thousands of times), category ids Zipf over ``E / 1000``
  rows (DIN's datasets have some 1000x fewer categories than items).
- ``uniform``: both fields uniform over ``E`` rows: at E = 1M nearly every id of a 2M-position
  batch is distinct, the worst case for a coalesced gradient (one row per distinct id).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import din_ops
from din_ops import reference as R

from . import attention_pooling as _attention
from .common import OpBench, rel_err, tolerance, upcast
from .mba import zipf_indices


@dataclasses.dataclass
class Case:
    query: torch.Tensor          # [B, D]
    tables: List[torch.Tensor]   # item [E, D/2], category [E or E/1000, D/2]
    ids: List[torch.Tensor]      # two [B, T] int64, 0 at padding positions
    lengths: torch.Tensor        # [B]
    weights: List[torch.Tensor]
    biases: List[torch.Tensor]
    activation: str = "sigmoid"
    normalization: str = "none"
    grad_out: Optional[torch.Tensor] = None
    dist: str = "zipf"

    @property
    def dtype(self):
        return self.query.dtype

    @property
    def shape(self):
        B, T = self.ids[0].shape
        return dict(B=B, T=T, D=self.query.shape[1], E=self.tables[0].shape[0],
                    H="x".join(str(w.shape[0]) for w in self.weights[:-1]), dist=self.dist)

    def params(self) -> List[torch.Tensor]:
        return [self.query, *self.tables, *self.weights, *self.biases]

    def attention_case(self, keys) -> _attention.Case:
        return _attention.Case(query=self.query, keys=keys, lengths=self.lengths, weights=self.weights,
                               biases=self.biases, activation=self.activation, normalization=self.normalization)


def make_case(B=2048, T=100, D=36, hidden=(80, 40), E=1_000_000, dtype=torch.float32, device="cpu", min_len=1,
              seed=0, requires_grad=True, dist="zipf") -> Case:
    g = torch.Generator().manual_seed(seed)
    dims = [4 * D, *hidden, 1]
    half = D // 2

    def t(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(device=device, dtype=dtype).requires_grad_(requires_grad)

    lengths = torch.randint(min(min_len, T), T + 1, (B,), generator=g)
    pad = torch.arange(T) >= lengths.unsqueeze(1)
    rows = (E, E) if dist == "uniform" else (E, max(E // 1000, 2))
    ids = []
    for n in rows:
        if dist == "uniform":
            i = torch.randint(1, n, (B, T), generator=g)
        else:
            i = 1 + zipf_indices(B * T, n - 1, g).view(B, T)
        i[pad] = 0
        ids.append(i.to(device))
    case = Case(query=t(B, D), tables=[t(rows[0], half, s=0.1), t(rows[1], D - half, s=0.1)], ids=ids,
                lengths=lengths.to(device),
                weights=[t(dims[i + 1], dims[i], s=dims[i] ** -0.5) for i in range(len(dims) - 1)],
                biases=[t(dims[i + 1], s=0.1) for i in range(len(dims) - 1)], dist=dist)
    case.grad_out = torch.randn(B, D, generator=g).to(device=device, dtype=dtype)
    return case


def _lookup(c: Case) -> torch.Tensor:
    return torch.cat([F.embedding(i, t, padding_idx=0, sparse=True) for t, i in zip(c.tables, c.ids)], dim=-1)


def eager(c: Case) -> torch.Tensor:
    return _attention.eager(c.attention_case(_lookup(c)))


def gather_din_ops(c: Case) -> torch.Tensor:
    return din_ops.attention_pooling(c.query, _lookup(c), c.weights, c.biases, lengths=c.lengths,
                                     activation=c.activation, normalization=c.normalization)


def fused(c: Case) -> torch.Tensor:
    return din_ops.embedding_attention_pooling(c.query, c.tables, c.ids, c.weights, c.biases, lengths=c.lengths,
                                               padding_idx=0, activation=c.activation,
                                               normalization=c.normalization)


def compiled(c: Case) -> torch.Tensor:
    return _attention.compiled(c.attention_case(_lookup(c)))


PROVIDERS: Dict[str, Callable[[Case], torch.Tensor]] = {
    "eager": eager,
    "compile": compiled,
    "gather+din_ops": gather_din_ops,
    "din_ops": fused,
}


def _dense(g):
    return g.coalesce().to_dense() if g is not None and g.is_sparse else g


class EmbeddingAttentionBench(OpBench):
    name = "embedding_attention_pooling"
    providers = PROVIDERS

    def case_key(self, shape):
        return (shape["B"], shape["T"], shape["D"], tuple(shape["hidden"]), shape.get("E", 1_000_000),
                shape.get("min_len", 1), shape.get("dist", "zipf"))

    def make_case(self, shape, dtype, device, seed=0):
        return make_case(B=shape["B"], T=shape["T"], D=shape["D"], hidden=tuple(shape["hidden"]),
                         E=shape.get("E", 1_000_000), min_len=shape.get("min_len", 1), dtype=dtype, device=device,
                         seed=seed, dist=shape.get("dist", "zipf"))

    def shape_dict(self, c):
        s = c.shape
        return dict(B=s["B"], T=s["T"], D=s["D"], H=s["H"], E=s["E"])

    def shape_str(self, c):
        s = c.shape
        full = " full" if s["T"] > 1 and bool((c.lengths == s["T"]).all()) else ""
        return f"B={s['B']} T={s['T']}{full} D={s['D']} (2 fields) E={s['E']} {s['dist']} ids H={s['H']}"

    def inputs(self, c):
        return c.params()

    def reference(self, c, mode):
        tables = [upcast(t) for t in c.tables]
        args = dict(lengths=c.lengths, padding_idx=0, activation=c.activation, normalization=c.normalization)
        ref = [upcast(c.query), *tables, *(upcast(w) for w in c.weights), *(upcast(b) for b in c.biases)]
        nw = len(c.weights)
        if mode != "fwd+bwd":
            with torch.no_grad():
                return R.embedding_attention_pooling(ref[0], ref[1:3], c.ids, ref[3:3 + nw], ref[3 + nw:],
                                                     **args), None
        out = R.embedding_attention_pooling(ref[0], ref[1:3], c.ids, ref[3:3 + nw], ref[3 + nw:], **args)
        grads = torch.autograd.grad(out, ref, c.grad_out.to(out.dtype))
        return out.detach(), [_dense(g.detach()) for g in grads]

    def check(self, provider, case, mode):
        """As :meth:`OpBench.check`, with the sparse table gradients compared densely."""
        if mode != "fwd+bwd":
            return super().check(provider, case, mode)
        ref_out, ref_grads = self._reference_cached(case, mode, "spec")
        out = self.providers[provider](case)
        grads = torch.autograd.grad(out, self.inputs(case), case.grad_out)
        err = max([rel_err(out, ref_out)] + [rel_err(_dense(g), r) for g, r in zip(grads, ref_grads)])
        return err, tolerance(case.dtype, case.query.device)

    def flops(self, c, mode):
        keys = torch.empty(()).expand(*c.ids[0].shape, c.query.shape[1])  # shape only
        return _attention.flops(c.attention_case(keys), mode)

    def bytes_moved(self, c, mode):
        """Read the valid positions' ids and table rows once, the queries, write the outputs;
        fwd+bwd reads them again and writes one gradient row per valid position at most."""
        B, T = c.ids[0].shape
        D, e = c.query.shape[1], c.query.element_size()
        n = float(c.lengths.sum())
        fwd = n * (D * e + 2 * 8) + 2 * B * D * e
        return fwd * 2 + n * D * e if mode == "fwd+bwd" else fwd


BENCH = EmbeddingAttentionBench()
