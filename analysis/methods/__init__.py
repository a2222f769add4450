"""Token-reduction methods and their registry. Importing this package registers every method."""
from .base import (  # noqa: F401
    KIND_CODE,
    KINDS,
    METHODS,
    Method,
    ParamSpec,
    ReduceContext,
    TokenAssignment,
    apply_assignment,
    get_method,
    kept_count,
    register,
)
from . import evit  # noqa: F401  (registers)
from . import tps  # noqa: F401  (registers etps, dtps, dynamicvit)
from . import bat  # noqa: F401  (registers bat, dpc)
from . import tome  # noqa: F401  (registers tome)
