"""Helpers shared by the adapters: class swapping and activation recognition."""
from __future__ import annotations

import warnings
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..nn import Dice as _DinDice
from ._unit import Stats

_SWAPPED: Dict[Tuple[type, type], type] = {}


class Unsupported(ValueError):
    """A module the fused ops cannot express exactly."""


def swap_class(module: nn.Module, mixin: type) -> nn.Module:
    """Make ``module`` an instance of ``mixin`` + its own class, in place.

    Parameters, buffers, hooks and ``state_dict`` keys stay as they are (nothing is copied), and
    ``isinstance(module, OriginalClass)`` still holds.
    """
    cls = type(module)
    if isinstance(module, mixin):
        return module
    key = (mixin, cls)
    if key not in _SWAPPED:
        _SWAPPED[key] = type(f"DinOps{cls.__name__}", (mixin, cls), {"__module__": mixin.__module__})
    module.__class__ = _SWAPPED[key]
    return module


def handle(strict: bool, err: Exception, where: str) -> None:
    if strict:
        raise Unsupported(f"{where}: {err}") from None
    warnings.warn(f"din_ops.compat: {where} left unconverted: {err}", stacklevel=3)


def din_ops_dice_stats(d: _DinDice) -> Stats:
    return Stats(d.running_mean, d.running_var, d.gamma, d.beta, d.eps, d.momentum, batch=d.training)


def plain_activation(mod: Optional[nn.Module], like: torch.Tensor):
    """``(name, alpha)`` for activations shared by the libraries, or ``None`` (``like``: dtype, device)."""
    if mod is None or isinstance(mod, nn.Identity) or type(mod).__name__ == "Identity":
        return "identity", None
    if isinstance(mod, nn.Sigmoid):
        return "sigmoid", None
    if isinstance(mod, nn.ReLU):
        return "relu", None
    if isinstance(mod, nn.PReLU):
        return "prelu", mod.weight
    if isinstance(mod, nn.LeakyReLU):
        # a PReLU whose slope is a constant: exact, and no gradient is asked for it
        return "prelu", torch.full((1,), float(mod.negative_slope), dtype=like.dtype, device=like.device)
    return None


def dropout_active(mods) -> bool:
    return any(isinstance(m, nn.Dropout) and m.p > 0 and m.training for m in mods)
