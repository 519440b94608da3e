"""agegender: multi-task age and gender estimation from face images, trained on UTKFace."""

__version__ = "0.1.0"

from agegender.data import Cache, open_cache, parse_name, prepare
from agegender.errors import AgeGenderError, ConfigError, DataError
from agegender.predict import Face, Predictor

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
