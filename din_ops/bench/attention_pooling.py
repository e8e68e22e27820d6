"""Providers for benchmarking attention_pooling: the same DIN attention computed four ways.

- ``eager``: what DeepCTR-Torch's ``AttentionSequencePoolingLayer`` / torch-rechub's
  ``ActivationUnit`` run: expand the query, cat ``[q, k, q-k, q*k]`` to ``[B, T, 4D]``,
  ``nn.Linear`` layers over every padded position, mask, bmm.
- ``compile``: ``torch.compile`` of ``eager`` (one static graph per shape).
- ``careful``: the best plain PyTorch a careful user writes: valid positions only (gathered),
  the first layer folded so no ``[N, 4D]`` tensor exists, ``index_add`` pooling (summed in
  float32 for half-precision inputs).
- ``din_ops``: the fused op.

Every provider takes the same :class:`Case` and returns ``out [B, D]``, or ``out [B, C, D]`` for
a case with ``C`` candidates per row (serving: one user's history scored against C candidate
items). din_ops takes ``query [B, C, D]`` with ``keys [B, T, D]`` directly; ``eager``,
``compile`` and ``careful`` score candidates the way DeepCTR-Torch users do: the history
expanded to one row per candidate (``keys [B*C, T, D]``, lengths repeated, ``query [B*C, D]``),
then the ``[B, D]`` formulation.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import din_ops
from din_ops import reference as R

from .common import OpBench, compile_fn, upcast


@dataclasses.dataclass
class Case:
    query: torch.Tensor          # [B, D], or [B, C, D] with C candidates
    keys: torch.Tensor           # [B, T, D]
    lengths: torch.Tensor        # [B]
    weights: List[torch.Tensor]  # nn.Linear layout, last is [1, H]
    biases: List[torch.Tensor]
    activation: str = "sigmoid"
    normalization: str = "none"
    grad_out: Optional[torch.Tensor] = None  # shaped like query: the output gradient of fwd+bwd
    C: Optional[int] = None      # candidates per row (query [B, C, D]); None: query [B, D]

    @property
    def dtype(self):
        return self.keys.dtype

    @property
    def shape(self):
        B, T, D = self.keys.shape
        return dict(B=B, T=T, D=D, H="x".join(str(w.shape[0]) for w in self.weights[:-1]), C=self.C)

    @property
    def rows(self) -> int:
        """Query rows: B, or B * C with candidates."""
        return self.keys.shape[0] * (self.C or 1)

    def params(self) -> List[torch.Tensor]:
        return [self.query, self.keys, *self.weights, *self.biases]


def make_case(B=2048, T=100, D=36, hidden=(80, 40), activation="sigmoid", normalization="none",
              dtype=torch.float32, device="cpu", min_len=1, seed=0, requires_grad=False,
              C: Optional[int] = None) -> Case:
    """Random DIN inputs; lengths uniform in [min_len, T] (``min_len=T``: every history full).
    ``C``: C candidate queries per row (``query [B, C, D]``). Drawn on the CPU, then moved, so
    every device sees the same numbers."""
    g = torch.Generator().manual_seed(seed)
    dims = [4 * D, *hidden, 1]
    qshape = (B, D) if C is None else (B, C, D)

    def t(*shape, s=1.0):
        x = (torch.randn(*shape, generator=g) * s).to(device=device, dtype=dtype)
        return x.requires_grad_(requires_grad)

    case = Case(
        query=t(*qshape), keys=t(B, T, D),
        lengths=torch.randint(min(min_len, T), T + 1, (B,), generator=g).to(device),
        weights=[t(dims[i + 1], dims[i], s=dims[i] ** -0.5) for i in range(len(dims) - 1)],
        biases=[t(dims[i + 1], s=0.1) for i in range(len(dims) - 1)],
        activation=activation, normalization=normalization, C=C,
    )
    case.grad_out = torch.randn(*qshape, generator=g).to(device=device, dtype=dtype)
    return case


_ACT = {"sigmoid": torch.sigmoid, "relu": torch.relu, "identity": lambda x: x}


def per_candidate(query: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor):
    """How DeepCTR-Torch users score C candidates against one history: ``query [B, C, D]`` ->
    ``[B*C, D]``, the history expanded to ``keys [B*C, T, D]`` (a view for B = 1; the layers
    then materialize ``[B*C, T, 4D]``), lengths repeated."""
    B, C, D = query.shape
    T = keys.shape[1]
    keys = keys.unsqueeze(1).expand(B, C, T, D).reshape(B * C, T, D)
    return query.reshape(B * C, D), keys, lengths.repeat_interleave(C)


def eager(c: Case) -> torch.Tensor:
    """DeepCTR-Torch's formulation (LocalActivationUnit + AttentionSequencePoolingLayer); with
    candidates, on the history expanded to one row per candidate (:func:`per_candidate`)."""
    if c.C is not None:
        q, k, n = per_candidate(c.query, c.keys, c.lengths)
        return _eager(q, k, n, c).view(c.query.shape)
    return _eager(c.query, c.keys, c.lengths, c)


def _eager(query, keys, lengths, c: Case) -> torch.Tensor:
    query = query.unsqueeze(1)
    B, T, _ = keys.shape
    queries = query.expand(-1, T, -1)
    x = torch.cat([queries, keys, queries - keys, queries * keys], dim=-1)  # [B, T, 4D]
    act = _ACT[c.activation]
    for W, b in zip(c.weights[:-1], c.biases[:-1]):
        x = act(F.linear(x, W, b))
    score = F.linear(x, c.weights[-1], c.biases[-1]).transpose(1, 2)  # [B, 1, T]
    mask = (torch.arange(T, device=keys.device).repeat(B, 1) < lengths.view(-1, 1)).unsqueeze(1)
    if c.normalization == "softmax":
        # DeepCTR's padding value: a row with no valid position gets uniform weights over its
        # padding here (the SPEC says zeros), so benchmark cases have lengths >= 1.
        score = torch.where(mask, score, torch.full_like(score, -2 ** 32 + 1))
        score = F.softmax(score, dim=-1)
    else:
        score = torch.where(mask, score, torch.zeros_like(score))
    return torch.matmul(score, keys).squeeze(1)


def careful(c: Case) -> torch.Tensor:
    """Valid positions only, first layer folded: W0 [q,k,q-k,q*k] = (Wq+Wd) q + (Wk-Wd) k + Wp (q*k).
    With candidates, on the history expanded to one row per candidate (:func:`per_candidate`)."""
    if c.C is not None:
        q, k, n = per_candidate(c.query, c.keys, c.lengths)
        return _careful(q, k, n, c).view(c.query.shape)
    return _careful(c.query, c.keys, c.lengths, c)


def _careful(query, keys, lengths, c: Case) -> torch.Tensor:
    B, T, D = keys.shape
    mask = torch.arange(T, device=keys.device)[None, :] < lengths[:, None]
    kv = keys[mask]                                                   # [N, D]
    row = torch.repeat_interleave(torch.arange(B, device=keys.device), lengths, output_size=kv.shape[0])
    W0, b0 = c.weights[0], c.biases[0]
    Wq, Wk, Wd, Wp = W0.split(D, dim=1)
    per_row = F.linear(query, Wq + Wd, b0)                            # [B, H0]
    qv = query[row]                                                   # [N, D]
    h = F.linear(kv, Wk - Wd) + F.linear(qv * kv, Wp) + per_row[row]
    act = _ACT[c.activation]
    if len(c.weights) > 1:
        h = act(h)
        for W, b in zip(c.weights[1:-1], c.biases[1:-1]):
            h = act(F.linear(h, W, b))
        s = F.linear(h, c.weights[-1], c.biases[-1]).squeeze(-1)      # [N]
    else:
        s = h.squeeze(-1)
    # sums over a row's positions in float32 for half-precision inputs (index_add would round
    # after every addition)
    acc = torch.float64 if keys.dtype == torch.float64 else torch.float32
    if c.normalization == "softmax":
        m = torch.full((B,), float("-inf"), device=s.device, dtype=s.dtype).scatter_reduce(
            0, row, s, reduce="amax", include_self=True)
        e = torch.exp(s - m[row])
        s = e / torch.zeros(B, device=s.device, dtype=acc).index_add(0, row, e.to(acc))[row].to(s.dtype)
    out = torch.zeros(B, D, device=keys.device, dtype=acc).index_add(0, row, (s[:, None] * kv).to(acc))
    return out.to(keys.dtype)


def fused(c: Case) -> torch.Tensor:
    return din_ops.attention_pooling(c.query, c.keys, c.weights, c.biases, lengths=c.lengths,
                                     activation=c.activation, normalization=c.normalization)


_compiled: Dict[str, Callable] = {}


def compiled(c: Case) -> torch.Tensor:
    if "eager" not in _compiled:
        _compiled["eager"] = compile_fn(eager)
    return _compiled["eager"](c)


PROVIDERS: Dict[str, Callable[[Case], torch.Tensor]] = {
    "eager": eager,
    "compile": compiled,
    "careful": careful,
    "din_ops": fused,
}


def reference(c: Case) -> torch.Tensor:
    return R.attention_pooling(c.query, c.keys, c.weights, c.biases, lengths=c.lengths,
                               activation=c.activation, normalization=c.normalization)


def flops(c: Case, mode: str, valid_only: bool = True) -> float:
    """Useful FLOPs of the attention unit (valid positions, folded first layer): what din_ops must
    do. Forward: per valid (candidate, position) pair ``2*D*H1`` (folded layer 0, plus ``D`` for
    ``q*k``), the other layers, ``2*D`` for pooling; per query row (B, or B*C with candidates)
    the folded query term ``2*4D*H1``. ``fwd+bwd`` counts 3x forward (the usual input-gradient +
    weight-gradient convention)."""
    B, T, D = c.keys.shape
    Cn = c.C or 1
    n = (float(c.lengths.sum()) if valid_only else float(B * T)) * Cn
    B = B * Cn
    dims = [w.shape[0] for w in c.weights]
    per_pos = 2 * D * dims[0] + D + 2 * D
    for i in range(1, len(dims)):
        per_pos += 2 * dims[i - 1] * dims[i]
    f = n * per_pos + B * 2 * (2 * D) * dims[0]
    return f * 3 if mode == "fwd+bwd" else f


def bytes_moved(c: Case, mode: str) -> float:
    """Fewest bytes: read the valid keys and the queries once and write the outputs; fwd+bwd
    also reads the keys and the output gradient again and writes the key and query gradients.
    With candidates the history is still read once (B*C query and output rows)."""
    B, T, D = c.keys.shape
    e = c.keys.element_size()
    n = float(c.lengths.sum())
    fwd = (n * D + 2 * c.rows * D) * e
    return fwd * 2 + n * D * e if mode == "fwd+bwd" else fwd


class AttentionBench(OpBench):
    name = "attention_pooling"
    providers = PROVIDERS

    def case_key(self, shape):
        return (shape["B"], shape["T"], shape["D"], tuple(shape["hidden"]), shape.get("C"),
                shape.get("min_len", 1), shape.get("activation", "sigmoid"),
                shape.get("normalization", "none"))

    def make_case(self, shape, dtype, device, seed=0):
        return make_case(B=shape["B"], T=shape["T"], D=shape["D"], hidden=tuple(shape["hidden"]),
                         activation=shape.get("activation", "sigmoid"),
                         normalization=shape.get("normalization", "none"), C=shape.get("C"),
                         min_len=shape.get("min_len", 1),
                         dtype=dtype, device=device, seed=seed, requires_grad=True)

    def shape_dict(self, c):
        s = c.shape
        return dict(B=s["B"], T=s["T"], D=s["D"], H=s["H"], C=s["C"])

    def shape_str(self, c):
        s = c.shape
        cand = "" if s["C"] is None else f" C={s['C']}"
        full = " full" if s["T"] > 1 and bool((c.lengths == s["T"]).all()) else ""  # every history T long
        return f"B={s['B']}{cand} T={s['T']}{full} D={s['D']} H={s['H']}"

    def inputs(self, c):
        return c.params()

    def reference_group(self, mode):
        return "train"  # the output does not depend on the mode

    def reference(self, c, mode):
        ref = dataclasses.replace(
            c, query=upcast(c.query), keys=upcast(c.keys), weights=[upcast(w) for w in c.weights],
            biases=[upcast(b) for b in c.biases])
        if mode != "fwd+bwd":
            with torch.no_grad():
                return reference(ref), None
        out = reference(ref)
        grads = torch.autograd.grad(out, ref.params(), c.grad_out.to(out.dtype))
        return out.detach(), [g.detach() for g in grads]

    def flops(self, c, mode):
        return flops(c, mode)

    def bytes_moved(self, c, mode):
        return bytes_moved(c, mode)


BENCH = AttentionBench()
