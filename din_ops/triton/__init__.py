from . import dice  # noqa: F401
