from . import mba  # noqa: F401
