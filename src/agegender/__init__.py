"""agegender: multi-task age and gender estimation from face images, trained on UTKFace."""

from agegender.data import Cache, open_cache, parse_name, prepare
from agegender.errors import AgeGenderError, ConfigError, DataError

__version__ = "0.1.0"

__all__ = [
    "AgeGenderError",
    "Cache",
    "ConfigError",
    "DataError",
    "__version__",
    "open_cache",
    "parse_name",
    "prepare",
]
