from . import attention_pooling  # noqa: F401
