"""din_ops: fused PyTorch operators for the Deep Interest Network (Zhou et al., KDD 2018).

- :func:`attention_pooling`: the local activation unit + weighted sum pooling (padded or jagged).
- :func:`embedding_attention_pooling`: the same over keys looked up from embedding tables (ids
  in), never storing the keys; sparse, coalesced table gradients.
- :func:`dice`: Dice with statistics over valid positions only.
- :func:`mba_sparse_update_`, :func:`mba_penalty`, :func:`count_frequencies`: mini-batch aware
  regularization of embedding tables; :mod:`din_ops.optim` holds the MBA optimizers.

Input value checks on CUDA tensors never synchronize with the host: they are device-side asserts
by default; :func:`set_cuda_value_checks` (``"async"`` | ``"off"`` | ``"sync"``) or the
environment variable ``DIN_OPS_CUDA_VALUE_CHECKS`` changes that (see ``din_ops._library``).
"""
from . import _library
from ._library import (backend, cuda_value_checks, get_backend, get_cuda_value_checks, set_backend,
                       set_cuda_value_checks)
from .ops.attention_pooling import attention_pooling
from .ops.dice import dice
from .ops.embedding_attention_pooling import embedding_attention_pooling
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
    "cuda_value_checks",
    "dice",
    "embedding_attention_pooling",
    "get_backend",
    "get_cuda_value_checks",
    "mba_penalty",
    "mba_sparse_update_",
    "set_backend",
    "set_cuda_value_checks",
]
