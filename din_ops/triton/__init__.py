from . import dice  # noqa: F401
from . import mba  # noqa: F401
