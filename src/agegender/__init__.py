"""agegender: multi-task age and gender estimation from face images, trained on UTKFace."""

__version__ = "0.1.0"

from agegender.core.errors import AgeGenderError, ConfigError, DataError
from agegender.data.cache import Cache, open_cache
from agegender.data.prepare import prepare
from agegender.data.utkface import parse_name
from agegender.inference.predictor import Face, Predictor

__all__ = [
    "AgeGenderError",
    "Cache",
    "ConfigError",
    "DataError",
    "Face",
    "Predictor",
    "__version__",
    "open_cache",
    "parse_name",
    "prepare",
]
