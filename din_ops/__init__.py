"""din_ops: fused PyTorch operators for the Deep Interest Network (Zhou et al., KDD 2018).

- :func:`attention_pooling`: the local activation unit + weighted sum pooling (padded or jagged).
- :func:`dice`: Dice with statistics over valid positions only.
- :func:`mba_sparse_update_`, :func:`mba_penalty`, :func:`count_frequencies`: mini-batch aware
  regularization of embedding tables; :mod:`din_ops.optim` holds the MBA optimizers.
"""
from . import _library
from ._library import backend, get_backend, set_backend
from .ops.attention_pooling import attention_pooling
from .ops.dice import dice
from .ops.mba import FrequencyCounter, count_frequencies, mba_penalty, mba_sparse_update_
from . import nn  # noqa: E402  (din_ops.nn.AttentionPooling, din_ops.nn.Dice)
from . import optim  # noqa: E402  (din_ops.optim.MBASGD, din_ops.optim.MBAAdagrad)
from . import models  # noqa: E402  (din_ops.models.DIN, din_ops.models.BaseModel)

from . import onnx  # noqa: E402  (ONNX translations, registered when onnxscript is imported)

# CUDA tensors run the Triton kernels: register them whenever they can run.
_library.load_triton_if_usable()
onnx._install()

__version__ = "0.1.0"

__all__ = [
    "FrequencyCounter",
    "attention_pooling",
    "backend",
    "count_frequencies",
    "dice",
    "get_backend",
    "mba_penalty",
    "mba_sparse_update_",
    "set_backend",
]
