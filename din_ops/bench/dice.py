"""Providers for benchmarking dice (SPEC section 2): Dice over a padded ``x [B, T, C]`` with
``lengths`` (the hidden activations of DIN's attention MLP: C = the first hidden width).

- ``eager``: DeepCTR-Torch's Dice (``BatchNorm1d`` -> sigmoid -> ``alpha * (1 - p) * x + p * x``)
  with the batch statistics taken over the valid positions, written the way a PyTorch user
  makes BatchNorm respect a mask: masked sums for the mean and the biased variance (in float32),
  the running statistics updated like ``BatchNorm1d`` (unbiased variance, momentum 0.1).
  DeepCTR's own layer lets padding into the statistics, which computes something else.
- ``compile``: ``torch.compile`` of ``eager``.
- ``din_ops``: ``din_ops.dice``.

Modes: ``inference`` is Dice in eval mode (running statistics, pointwise) without autograd;
``fwd`` and ``fwd+bwd`` are training mode (batch statistics, running statistics updated).
Training-mode calls update their own running buffers, so the eval-mode statistics stay fixed.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional

import torch

import din_ops
from din_ops import reference as R

from .common import OpBench, compile_fn, upcast

MOMENTUM = 0.1
EPS = 1e-8


@dataclasses.dataclass
class Case:
    x: torch.Tensor            # [B, T, C]
    lengths: torch.Tensor      # [B]
    alpha: torch.Tensor        # [C]
    gamma: torch.Tensor        # [C]
    beta: torch.Tensor         # [C]
    eval_mean: torch.Tensor    # [C] running statistics used (never updated) in eval mode
    eval_var: torch.Tensor
    train_mean: torch.Tensor   # [C] running statistics updated by training-mode calls
    train_var: torch.Tensor
    grad_out: Optional[torch.Tensor] = None
    training: bool = True

    @property
    def dtype(self):
        return self.x.dtype

    def params(self) -> List[torch.Tensor]:
        return [self.x, self.alpha, self.gamma, self.beta]

    def stats(self):
        return (self.train_mean, self.train_var) if self.training else (self.eval_mean, self.eval_var)


def make_case(B=2048, T=100, C=80, dtype=torch.float32, device="cpu", seed=0, requires_grad=True) -> Case:
    g = torch.Generator().manual_seed(seed)

    def t(*shape, s=1.0, shift=0.0, grad=requires_grad):
        x = (torch.randn(*shape, generator=g) * s + shift).to(device=device, dtype=dtype)
        return x.requires_grad_(grad)

    rm, rv = torch.randn(C, generator=g) * 0.1, torch.rand(C, generator=g) + 0.5
    case = Case(
        x=t(B, T, C, s=2.0, shift=0.5),
        lengths=torch.randint(1, T + 1, (B,), generator=g).to(device),
        alpha=t(C, s=0.25), gamma=t(C, s=0.1, shift=1.0), beta=t(C, s=0.1),
        # running statistics in float32 (like BatchNorm's buffers under autocast)
        eval_mean=rm.to(device), eval_var=rv.to(device),
        train_mean=rm.clone().to(device), train_var=rv.clone().to(device),
    )
    case.grad_out = torch.randn(B, T, C, generator=g).to(device=device, dtype=dtype)
    return case


def eager(c: Case) -> torch.Tensor:
    x = c.x
    if c.training:
        B, T, _ = x.shape
        m = (torch.arange(T, device=x.device)[None, :] < c.lengths[:, None]).unsqueeze(-1)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf, mf = x.to(acc), m.to(acc)
        n = mf.sum()
        mean = (xf * mf).sum((0, 1)) / n
        var = ((xf - mean) ** 2 * mf).sum((0, 1)) / n
        with torch.no_grad():
            c.train_mean.mul_(1 - MOMENTUM).add_(MOMENTUM * mean.to(c.train_mean.dtype))
            c.train_var.mul_(1 - MOMENTUM).add_((MOMENTUM * var * n / (n - 1)).to(c.train_var.dtype))
        mean, var = mean.to(x.dtype), var.to(x.dtype)
    else:
        mean, var = c.eval_mean.to(x.dtype), c.eval_var.to(x.dtype)
    p = torch.sigmoid((x - mean) / torch.sqrt(var + EPS) * c.gamma + c.beta)
    return c.alpha * (1 - p) * x + p * x


def fused(c: Case) -> torch.Tensor:
    rm, rv = c.stats()
    return din_ops.dice(c.x, c.alpha, rm, rv, lengths=c.lengths, gamma=c.gamma, beta=c.beta,
                        training=c.training, momentum=MOMENTUM, eps=EPS)


_compiled: Dict[str, Callable] = {}


def compiled(c: Case) -> torch.Tensor:
    if "eager" not in _compiled:
        _compiled["eager"] = compile_fn(eager)
    return _compiled["eager"](c)


PROVIDERS: Dict[str, Callable[[Case], torch.Tensor]] = {
    "eager": eager,
    "compile": compiled,
    "din_ops": fused,
}


def reference(c: Case) -> torch.Tensor:
    rm, rv = (t.clone() for t in c.stats())  # the reference updates them in place
    return R.dice(c.x, c.alpha, rm, rv, lengths=c.lengths, gamma=c.gamma, beta=c.beta,
                  training=c.training, momentum=MOMENTUM, eps=EPS)


# Per element: normalize (sub, mul by rstd, gamma, beta: 4), sigmoid (~4), mix (4); training
# adds the statistics (3). Backward: about twice the forward.
_FWD_FLOPS, _STATS_FLOPS = 12, 3


def flops(c: Case, mode: str) -> float:
    n = float(c.x.numel())
    f = n * (_FWD_FLOPS + (_STATS_FLOPS if mode != "inference" else 0))
    return 3 * f if mode == "fwd+bwd" else f


def bytes_moved(c: Case, mode: str) -> float:
    """Fewest bytes: read x and write y once; fwd+bwd also reads x and the output gradient and
    writes the input gradient."""
    n = float(c.x.numel()) * c.x.element_size()
    return 5 * n if mode == "fwd+bwd" else 2 * n


class DiceBench(OpBench):
    name = "dice"
    providers = PROVIDERS

    def case_key(self, shape):
        return (shape["B"], shape["T"], shape["hidden"][0])

    def make_case(self, shape, dtype, device, seed=0):
        return make_case(B=shape["B"], T=shape["T"], C=shape["hidden"][0], dtype=dtype, device=device,
                         seed=seed)

    def shape_dict(self, c):
        B, T, C = c.x.shape
        return dict(B=B, T=T, C=C)

    def shape_str(self, c):
        B, T, C = c.x.shape
        return f"B={B} T={T} C={C}"

    def forward(self, fn, c, mode):
        c.training = mode != "inference"
        return fn(c)

    def inputs(self, c):
        return c.params()

    def reference(self, c, mode):
        ref = dataclasses.replace(c, x=upcast(c.x), alpha=upcast(c.alpha), gamma=upcast(c.gamma),
                                  beta=upcast(c.beta), training=mode != "inference")
        if mode != "fwd+bwd":
            with torch.no_grad():
                return reference(ref), None
        out = reference(ref)
        grads = torch.autograd.grad(out, ref.params(), c.grad_out.to(out.dtype))
        return out.detach(), [g.detach() for g in grads]

    def available(self, provider, device):
        if provider == "din_ops" and not hasattr(din_ops, "dice"):
            return "din_ops.dice is not in this build"
        return None

    def flops(self, c, mode):
        return flops(c, mode)

    def bytes_moved(self, c, mode):
        return bytes_moved(c, mode)


BENCH = DiceBench()
