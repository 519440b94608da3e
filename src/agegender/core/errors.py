"""Exception types. The CLI turns an :class:`AgeGenderError` into a one-line message and exit 2."""

from __future__ import annotations


class AgeGenderError(Exception):
    """Base class for errors a user can fix (bad path, bad option, bad data)."""


class DataError(AgeGenderError):
    """The data given is missing, empty or not what was expected."""


class ConfigError(AgeGenderError):
    """A recipe or a ``key=value`` override is invalid."""


def first_line(e: BaseException) -> str:
    """What a one-line report says of ``e``: its message's first line, or its type's name when
    it has no message."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


class TrainingError(AgeGenderError):
    """A training run that cannot go on (a loss that is not a number)."""
