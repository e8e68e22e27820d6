"""Triton kernels, one module per op; importing this package registers them for CUDA tensors."""
from . import attention_pooling  # noqa: F401
from . import dice  # noqa: F401
from . import mba  # noqa: F401
from . import embedding_attention_pooling  # noqa: F401
