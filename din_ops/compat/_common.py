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
    ``isinstance(module, OriginalClass)`` still holds. The module pickles (``torch.save``,
    ``copy.deepcopy``) by the names of ``mixin`` and its original class, so it loads in any
    process that can import both.
    """
    if isinstance(module, mixin):
        return module
    module.__class__ = _swapped_class(mixin, type(module))
    return module


def _swapped_class(mixin: type, cls: type) -> type:
    key = (mixin, cls)
    if key not in _SWAPPED:
        # what the class joins, the original class last (it may itself be a swapped class)
        parts = (mixin,) + cls.__dict__.get("_din_ops_parts", (cls,))
        _SWAPPED[key] = type(f"DinOps{cls.__name__}", (mixin, cls), {
            "__module__": mixin.__module__, "_din_ops_parts": parts, "__reduce_ex__": _reduce_ex})
    return _SWAPPED[key]


def _reduce_ex(self, protocol):
    # the class is made at run time, so pickle cannot find it by name: rebuild it from its parts,
    # which any process can import (torch.save, pickle, copy.deepcopy all come here)
    parts = type(self).__dict__.get("_din_ops_parts")
    if parts is None:  # a subclass with a name of its own
        return object.__reduce_ex__(self, protocol)
    return _rebuild, parts, self.__getstate__()


def _rebuild(*parts: type) -> nn.Module:
    """An empty instance of the swapped class made of ``parts``; unpickling then sets its state."""
    cls = parts[-1]
    for mixin in reversed(parts[:-1]):
        cls = _swapped_class(mixin, cls)
    return cls.__new__(cls)


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
