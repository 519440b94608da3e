"""UTKFace's labels: the file-name schema ``age_gender_race_datetime.jpg``, its codes, the age
bands the metrics report by and the names of the splits."""

from __future__ import annotations

import os
import re
from typing import NamedTuple

import numpy as np

GENDERS = ("male", "female")  # UTKFace: 0 = male, 1 = female
RACES = ("White", "Black", "Asian", "Indian", "Others")  # UTKFace race codes 0..4
AGE_RANGE = (1, 120)
AGE_BANDS = ((0, 9), (10, 19), (20, 39), (40, 59), (60, 200))
SPLITS = ("train", "val", "test")

# age_gender_race_datetime, then the extension as it really occurs: ".jpg.chip.jpg",
# " .jpg.chip.jpg", "jpg.chip.jpg" (no dot), upper case, or a plain ".jpg"/".jpeg"/".png".
_NAME = re.compile(r"^(?P<stem>.+?)\s*\.?(?:jpe?g|png)(?:\.chip\.jpe?g)?$", re.IGNORECASE)


class Labels(NamedTuple):
    """Labels parsed from a UTKFace file name."""

    age: int
    gender: int  # 0 male, 1 female
    race: int  # 0..4, see RACES


def parse_name(name: str) -> Labels:
    """Parse ``age_gender_race_datetime.jpg.chip.jpg`` into :class:`Labels`.

    Raises ``ValueError`` whose message says why the name was rejected.

    >>> parse_name("26_1_2_20170116174525125.jpg.chip.jpg")
    Labels(age=26, gender=1, race=2)
    >>> parse_name("24_0_1_20170116220224657 .jpg.chip.jpg")
    Labels(age=24, gender=0, race=1)
    >>> parse_name("39_1_20170116174525125.jpg.chip.jpg")
    Traceback (most recent call last):
    ValueError: missing field: expected age_gender_race_datetime, got 3 fields
    """
    base = os.path.basename(name)
    match = _NAME.match(base)
    if match is None:
        raise ValueError("not an image name ending in .jpg, .jpeg or .png")
    fields = match["stem"].split("_")
    if len(fields) < 4:
        raise ValueError(
            f"missing field: expected age_gender_race_datetime, got {len(fields)} fields"
        )
    if len(fields) > 4:
        raise ValueError(f"expected age_gender_race_datetime, got {len(fields)} fields")
    if not all(f.isdigit() for f in fields):
        raise ValueError("fields must be whole numbers")
    age, gender, race = (int(f) for f in fields[:3])
    if not AGE_RANGE[0] <= age <= AGE_RANGE[1]:
        raise ValueError(f"age {age} outside {AGE_RANGE[0]}..{AGE_RANGE[1]}")
    if gender not in (0, 1):
        raise ValueError(f"gender {gender} is not 0 (male) or 1 (female)")
    if not 0 <= race < len(RACES):
        raise ValueError(f"race {race} outside 0..{len(RACES) - 1}")
    return Labels(age, gender, race)


def age_band(age: int | np.ndarray) -> int | np.ndarray:
    """Index of the age band in :data:`AGE_BANDS` (0-9, 10-19, 20-39, 40-59, 60+).

    >>> age_band(np.array([5, 19, 20, 75])).tolist()
    [0, 1, 2, 4]
    """
    edges = np.array([lo for lo, _ in AGE_BANDS[1:]])
    band = np.searchsorted(edges, age, side="right")
    return int(band) if np.ndim(band) == 0 else band


def band_name(band: int) -> str:
    """How an age band is written in reports.

    >>> band_name(1), band_name(4)
    ('10-19', '60+')
    """
    lo, hi = AGE_BANDS[band]
    return f"{lo}+" if band == len(AGE_BANDS) - 1 else f"{lo}-{hi}"
