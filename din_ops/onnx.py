"""ONNX export of models that use din_ops: each op translated to standard ONNX operators.

``torch.onnx.export(model, args, dynamo=True)`` works on a model that calls din_ops (a din_ops
DIN, or a DeepCTR-Torch / torch-rechub model after ``din_ops.compat`` conversion): din_ops
registers these translations with onnxscript's torch library when onnxscript is imported (which
``torch.onnx.export`` does), so nothing else is needed. They are also available explicitly for
``torch.onnx.export(..., custom_translation_table=din_ops.onnx.translation_table())``.

What is translated (inference graphs, opset 18):

- ``din_ops::attention_pooling`` (SPEC section 1): every activation (Dice with its running
  statistics, as in eval mode), both normalizations, C candidates, padded keys with
  ``lengths`` (or none) and jagged keys with ``offsets``. The ONNX graph is the reference
  formulation: it builds the ``[B, C, T, 4D]`` concatenation the fused kernels avoid, so it is
  exact but not fast; padding is masked before it is read (NaN there stays out, as in the
  kernels); jagged rows are gathered and pooled with ``ScatterND`` additions.
- ``din_ops::embedding_attention_pooling`` (SPEC section 4): ``Gather`` per table,
  ``Concat``, then the graph above.
- ``din_ops::dice`` in eval mode (running statistics).

Training-only ops (Dice batch statistics, ``attention_pooling_stats``, the MBA update) have no
translation: export a model in eval mode.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import torch

__all__ = ["translation_table", "register"]


def translation_table():
    """``{torch.ops.din_ops.<op>.default: onnx function}`` for ``torch.onnx.export``'s
    ``custom_translation_table`` (din_ops/_onnx_ops.py)."""
    from ._onnx_ops import TRANSLATIONS

    return {getattr(torch.ops.din_ops, name).default: fn for name, fn in TRANSLATIONS.items()}


_registered = False


def register() -> None:
    """Adds the translations to onnxscript's torch library, which ``torch.onnx.export``
    (dynamo) consults for every export. Runs once, when onnxscript is first imported."""
    global _registered
    if _registered:
        return
    from onnxscript.function_libs.torch_lib.registration import torch_op

    from ._onnx_ops import TRANSLATIONS

    for name, fn in TRANSLATIONS.items():
        torch_op(f"din_ops::{name}", trace_only=True)(fn)
    _registered = True


class _OnImport(importlib.abc.MetaPathFinder):
    """Calls :func:`register` right after onnxscript's own import (so importing din_ops does not
    import onnxscript, which takes about a second)."""

    def find_spec(self, name, path, target=None):
        if name != "onnxscript":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            try:
                register()
            except Exception as e:  # never break onnxscript's import
                import warnings

                warnings.warn(f"din_ops could not register its ONNX translations: {e}")

        spec.loader.exec_module = exec_and_register
        return spec


def _install() -> None:
    if "onnxscript" in sys.modules:
        try:
            register()
        except ImportError:  # an onnxscript without the torch library
            pass
    elif not any(isinstance(f, _OnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _OnImport())
