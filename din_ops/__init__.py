"""din_ops: fused PyTorch operators for the Deep Interest Network (Zhou et al., KDD 2018).

- :func:`attention_pooling`: the local activation unit + weighted sum pooling (padded or jagged).
- :func:`dice`: Dice with statistics over valid positions only.
- :func:`mba_sparse_update_`, :func:`mba_penalty`, :func:`count_frequencies`: mini-batch aware
  regularization of embedding tables.
"""
from ._library import backend, get_backend, set_backend
from .ops.attention_pooling import attention_pooling
from .ops.dice import dice
from . import nn  # noqa: E402  (din_ops.nn.AttentionPooling, ...)
from .ops.mba import FrequencyCounter, count_frequencies, mba_penalty, mba_sparse_update_
from . import optim  # noqa: F401,E402  (din_ops.optim.MBASGD / MBAAdagrad)
from . import models  # noqa: F401,E402  (din_ops.models.DIN, BaseModel)

__version__ = "0.1.0"

__all__ = [
    "FrequencyCounter",
    "attention_pooling",
    "count_frequencies",
    "mba_penalty",
    "mba_sparse_update_",
    "backend",
    "dice",
    "get_backend",
    "set_backend",
]
