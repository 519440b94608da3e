"""Exception types. The CLI turns an :class:`AgeGenderError` into a one-line message and exit 2."""

from __future__ import annotations


class AgeGenderError(Exception):
    """Base class for errors a user can fix (bad path, bad option, bad data)."""


class DataError(AgeGenderError):
    """The data given is missing, empty or not what was expected."""


class ConfigError(AgeGenderError):
    """A recipe or a ``key=value`` override is invalid."""


class TrainingError(AgeGenderError):
    """A training run that cannot go on (a loss that is not a number)."""
