"""Providers for benchmarking dice: Dice over x [B, T, C] with lengths, four ways.

- ``eager``: DeepCTR-Torch's Dice (``BatchNorm1d`` on the transposed padded tensor, sigmoid,
  alpha mix). Its statistics include the padded positions: that is how it is run in practice,
  so it computes a different (padding-polluted) function; it is here for speed only.
- ``eager_masked``: the reference's formulation (statistics over valid positions only) in plain
  PyTorch, with the running update done on the device (no host synchronization).
- ``compile``: ``torch.compile`` of ``eager_masked``.
- ``din_ops``: the fused op.

Every provider takes the same :class:`Case`, updates its running statistics in place and returns
``y [B, T, C]``.
"""
from __future__ import annotations

import dataclasses
from typing import List

import torch
import torch.nn.functional as F

import din_ops


@dataclasses.dataclass
class Case:
    x: torch.Tensor              # [B, T, C]
    lengths: torch.Tensor        # [B]
    alpha: torch.Tensor          # [C]
    gamma: torch.Tensor          # [C]
    beta: torch.Tensor           # [C]
    running_mean: torch.Tensor   # [C]
    running_var: torch.Tensor    # [C]
    grad_y: torch.Tensor         # [B, T, C], the upstream gradient for fwd+bwd
    momentum: float = 0.1
    eps: float = 1e-8

    @property
    def shape(self):
        B, T, C = self.x.shape
        return dict(B=B, T=T, C=C, dtype=str(self.x.dtype).replace("torch.", ""))

    def params(self) -> List[torch.Tensor]:
        return [self.x, self.alpha, self.gamma, self.beta]


def make_case(B=2048, T=100, C=80, dtype=torch.float32, device="cpu", min_len=1, seed=0,
              requires_grad=False) -> Case:
    """Random pre-activations (C = 80: the first hidden width of DIN's attention unit);
    lengths uniform in [min_len, T]; DeepCTR-Torch's initial parameters except a nonzero alpha."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape, s=1.0, m=0.0):
        return (torch.randn(*shape, generator=g) * s + m).to(device=device, dtype=dtype)

    return Case(
        x=t(B, T, C, s=2.0, m=0.5).requires_grad_(requires_grad),
        lengths=torch.randint(min_len, T + 1, (B,), generator=g).to(device),
        alpha=t(C, s=0.25).requires_grad_(requires_grad),
        gamma=torch.ones(C, device=device, dtype=dtype).requires_grad_(requires_grad),
        beta=torch.zeros(C, device=device, dtype=dtype).requires_grad_(requires_grad),
        running_mean=torch.zeros(C, device=device, dtype=torch.float32),
        running_var=torch.ones(C, device=device, dtype=torch.float32),
        grad_y=t(B, T, C),
    )


def eager(c: Case) -> torch.Tensor:
    """DeepCTR-Torch's ``Dice(dim=3)``: BatchNorm1d over [B, C, T], padding included."""
    x = c.x.transpose(1, 2)
    x_p = torch.sigmoid(F.batch_norm(x, c.running_mean, c.running_var, c.gamma, c.beta, True, c.momentum, c.eps))
    out = c.alpha[:, None] * (1 - x_p) * x + x_p * x
    return out.transpose(1, 2)


def _eager_masked(x, lengths, alpha, gamma, beta, running_mean, running_var, momentum: float, eps: float):
    B, T, C = x.shape
    mask = (torch.arange(T, device=x.device)[None, :] < lengths[:, None]).to(x.dtype)[..., None]
    n = mask.sum()
    denom = n.clamp_min(1)
    mean = (x * mask).sum((0, 1)) / denom
    var = (((x - mean) ** 2) * mask).sum((0, 1)) / denom
    with torch.no_grad():
        unbiased = var * torch.where(n > 1, n / (n - 1).clamp_min(1), torch.ones_like(n))
        running_mean.copy_(torch.where(n > 0, running_mean + momentum * (mean - running_mean), running_mean))
        running_var.copy_(torch.where(n > 0, running_var + momentum * (unbiased - running_var), running_var))
    p = torch.sigmoid((x - mean) / torch.sqrt(var + eps) * gamma + beta)
    return p * x + (1 - p) * alpha * x


def eager_masked(c: Case) -> torch.Tensor:
    """The reference's masked statistics (``masked_moments`` + ``dice_pointwise``) in plain PyTorch."""
    return _eager_masked(c.x, c.lengths, c.alpha, c.gamma, c.beta, c.running_mean, c.running_var,
                         c.momentum, c.eps)


_compiled = None


def compiled(c: Case) -> torch.Tensor:
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_eager_masked)
    return _compiled(c.x, c.lengths, c.alpha, c.gamma, c.beta, c.running_mean, c.running_var,
                     c.momentum, c.eps)


def fused(c: Case) -> torch.Tensor:
    return din_ops.dice(c.x, c.alpha, c.running_mean, c.running_var, lengths=c.lengths, gamma=c.gamma,
                        beta=c.beta, training=True, momentum=c.momentum, eps=c.eps)


PROVIDERS = {"eager": eager, "eager_masked": eager_masked, "compile": compiled, "din_ops": fused}
