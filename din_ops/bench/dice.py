"""Providers for benchmarking dice (SPEC section 2): Dice over ``x [B, T, C]`` with ``lengths``
(C = 80: the first hidden width of DIN's attention unit), four ways.

- ``eager``: DeepCTR-Torch's ``Dice(dim=3)`` (``BatchNorm1d`` on the transposed padded tensor,
  sigmoid, alpha mix). Its training statistics include the padded positions: that is how it is
  run in practice, so in training it computes a different (padding-polluted) function. Its
  correctness check is against the reference with every position valid, i.e. its own semantics.
- ``eager_masked``: the reference's formulation (statistics over valid positions only) in plain
  PyTorch, with the running update done on the device (no host synchronization).
- ``compile``: ``torch.compile`` of ``eager_masked`` (the same function as din_ops).
- ``din_ops``: the fused op.

Modes: ``inference`` is Dice in eval mode (running statistics, pointwise) without autograd;
``fwd`` (training forward, autograd graph recorded) and ``fwd+bwd`` (plus the gradients of x,
alpha, gamma and beta for a fixed random upstream gradient) are training mode, where every
provider updates its running statistics in place. Eval mode reads separate running statistics
that nothing updates, so every provider sees the same ones.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch
import torch.nn.functional as F

import din_ops
from din_ops import reference as R

from .common import OpBench, compile_fn, upcast


@dataclasses.dataclass
class Case:
    x: torch.Tensor              # [B, T, C]
    lengths: torch.Tensor        # [B]
    alpha: torch.Tensor          # [C]
    gamma: torch.Tensor          # [C]
    beta: torch.Tensor           # [C]
    running_mean: torch.Tensor   # [C] updated by training-mode calls
    running_var: torch.Tensor    # [C]
    grad_y: torch.Tensor         # [B, T, C], the upstream gradient for fwd+bwd
    eval_mean: Optional[torch.Tensor] = None  # [C] read (never updated) in eval mode
    eval_var: Optional[torch.Tensor] = None
    momentum: float = 0.1
    eps: float = 1e-8
    training: bool = True

    @property
    def dtype(self):
        return self.x.dtype

    @property
    def grad_out(self):
        return self.grad_y

    @property
    def shape(self):
        B, T, C = self.x.shape
        return dict(B=B, T=T, C=C, dtype=str(self.x.dtype).replace("torch.", ""))

    def params(self) -> List[torch.Tensor]:
        return [self.x, self.alpha, self.gamma, self.beta]

    def stats(self):
        """The running statistics the current mode reads (and, in training, updates)."""
        if self.training or self.eval_mean is None:
            return self.running_mean, self.running_var
        return self.eval_mean, self.eval_var


def make_case(B=2048, T=100, C=80, dtype=torch.float32, device="cpu", min_len=1, seed=0,
              requires_grad=False) -> Case:
    """Random pre-activations; lengths uniform in [min_len, T]; DeepCTR-Torch's initial
    parameters except a nonzero alpha; eval-mode statistics near the batch's."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape, s=1.0, m=0.0):
        return (torch.randn(*shape, generator=g) * s + m).to(device=device, dtype=dtype)

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return Case(
        x=t(B, T, C, s=2.0, m=0.5).requires_grad_(requires_grad),
        lengths=torch.randint(min_len, T + 1, (B,), generator=g).to(device),
        alpha=t(C, s=0.25).requires_grad_(requires_grad),
        gamma=torch.ones(C, device=device, dtype=dtype).requires_grad_(requires_grad),
        beta=torch.zeros(C, device=device, dtype=dtype).requires_grad_(requires_grad),
        running_mean=torch.zeros(C, device=device, dtype=acc),
        running_var=torch.ones(C, device=device, dtype=acc),
        grad_y=t(B, T, C),
        eval_mean=(0.5 + 0.1 * torch.randn(C, generator=g)).to(device=device, dtype=acc),
        eval_var=(4.0 + torch.rand(C, generator=g)).to(device=device, dtype=acc),
    )


def _bn_buffers(c: Case):
    """BatchNorm's buffers: a model cast with ``.to(dtype)`` holds them in x's dtype (batch_norm
    takes float32 buffers with half-precision input only if its weight is float32 too)."""
    rm, rv = c.stats()
    if rm.dtype == c.x.dtype:
        return rm, rv
    key = "_bn_train" if c.training else "_bn_eval"
    if key not in c.__dict__:
        c.__dict__[key] = (rm.to(c.x.dtype), rv.to(c.x.dtype))
    return c.__dict__[key]


def eager(c: Case) -> torch.Tensor:
    """DeepCTR-Torch's ``Dice(dim=3)``: BatchNorm1d over [B, C, T], padding included."""
    rm, rv = _bn_buffers(c)
    x = c.x.transpose(1, 2)
    x_p = torch.sigmoid(F.batch_norm(x, rm, rv, c.gamma, c.beta, c.training, c.momentum, c.eps))
    out = c.alpha[:, None] * (1 - x_p) * x + x_p * x
    return out.transpose(1, 2)


def _eager_masked(x, lengths, alpha, gamma, beta, running_mean, running_var, momentum: float, eps: float,
                  training: bool = True):
    if training:
        B, T, C = x.shape
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf = x.to(acc)
        mask = (torch.arange(T, device=x.device)[None, :] < lengths[:, None]).to(acc)[..., None]
        n = mask.sum()
        denom = n.clamp_min(1)
        mean = (xf * mask).sum((0, 1)) / denom
        var = (((xf - mean) ** 2) * mask).sum((0, 1)) / denom
        with torch.no_grad():
            unbiased = var * torch.where(n > 1, n / (n - 1).clamp_min(1), torch.ones_like(n))
            running_mean.copy_(torch.where(n > 0, running_mean + momentum * (mean - running_mean), running_mean))
            running_var.copy_(torch.where(n > 0, running_var + momentum * (unbiased - running_var), running_var))
        mean, var = mean.to(x.dtype), var.to(x.dtype)
    else:
        mean, var = running_mean.to(x.dtype), running_var.to(x.dtype)
    p = torch.sigmoid((x - mean) / torch.sqrt(var + eps) * gamma + beta)
    return p * x + (1 - p) * alpha * x


def eager_masked(c: Case) -> torch.Tensor:
    """The reference's masked statistics (``masked_moments`` + ``dice_pointwise``) in plain PyTorch."""
    rm, rv = c.stats()
    return _eager_masked(c.x, c.lengths, c.alpha, c.gamma, c.beta, rm, rv, c.momentum, c.eps, c.training)


_compiled = None


def compiled(c: Case) -> torch.Tensor:
    global _compiled
    if _compiled is None:
        _compiled = compile_fn(_eager_masked)
    rm, rv = c.stats()
    return _compiled(c.x, c.lengths, c.alpha, c.gamma, c.beta, rm, rv, c.momentum, c.eps, c.training)


def fused(c: Case) -> torch.Tensor:
    rm, rv = c.stats()
    return din_ops.dice(c.x, c.alpha, rm, rv, lengths=c.lengths, gamma=c.gamma, beta=c.beta,
                        training=c.training, momentum=c.momentum, eps=c.eps)


PROVIDERS = {"eager": eager, "eager_masked": eager_masked, "compile": compiled, "din_ops": fused}


def reference(c: Case, padding_in_stats: bool = False) -> torch.Tensor:
    """SPEC semantics; ``padding_in_stats``: DeepCTR-Torch's (every position in the statistics)."""
    rm, rv = (t.clone() for t in c.stats())  # the reference updates them in place
    return R.dice(c.x, c.alpha, rm, rv, lengths=None if padding_in_stats else c.lengths, gamma=c.gamma,
                  beta=c.beta, training=c.training, momentum=c.momentum, eps=c.eps)


# Per element: normalize (sub, mul by rstd, gamma, beta: 4), sigmoid (~4), mix (4); training
# adds the statistics (3). Backward: about twice the forward.
_FWD_FLOPS, _STATS_FLOPS = 12, 3


def flops(c: Case, mode: str) -> float:
    n = float(c.x.numel())
    f = n * (_FWD_FLOPS + (_STATS_FLOPS if mode != "inference" else 0))
    return 3 * f if mode == "fwd+bwd" else f


def bytes_moved(c: Case, mode: str) -> float:
    """Fewest bytes: read x and write y once; fwd+bwd also reads x and the upstream gradient and
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
                         seed=seed, requires_grad=True)

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

    def reference_kind(self, provider, mode):
        return "padding_in_stats" if provider == "eager" and mode != "inference" else "spec"

    def reference(self, c, mode, kind="spec"):
        ref = dataclasses.replace(c, x=upcast(c.x), alpha=upcast(c.alpha), gamma=upcast(c.gamma),
                                  beta=upcast(c.beta), training=mode != "inference")
        if mode != "fwd+bwd":
            with torch.no_grad():
                return reference(ref, kind == "padding_in_stats"), None
        out = reference(ref, kind == "padding_in_stats")
        grads = torch.autograd.grad(out, ref.params(), c.grad_y.to(out.dtype))
        return out.detach(), [g.detach() for g in grads]

    def flops(self, c, mode):
        return flops(c, mode)

    def bytes_moved(self, c, mode):
        return bytes_moved(c, mode)


BENCH = DiceBench()
