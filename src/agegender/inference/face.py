"""What a prediction is: one :class:`Face` per face found."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from agegender.inference.runtime import age_interval


@dataclass(frozen=True)
class Face:
    """One face found in an image.

    Attributes:
        box: ``(x0, y0, x1, y1)`` in pixels of the (EXIF-upright) image.
        score: detector confidence in [0, 1] (1.0 for ``aligned`` input).
        age: estimated (apparent) age in years.
        age_interval: ``(low, high)`` 90 % interval, for heads that give a spread (dldl).
        gender: ``"male"`` or ``"female"``.
        p_female: probability that the face is female, in [0, 1].
    """

    box: tuple[float, float, float, float]
    score: float
    age: float
    age_interval: tuple[float, float] | None
    gender: str
    p_female: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["box"] = [round(v, 1) for v in self.box]
        d["score"] = round(self.score, 4)
        d["age"] = round(self.age, 2)
        if self.age_interval is not None:
            d["age_interval"] = [round(v, 1) for v in self.age_interval]
        else:
            del d["age_interval"]
        d["p_female"] = round(self.p_female, 4)
        return d

    def label(self) -> str:
        """``"F 34 (29-40)"``: what the annotated images and the web page show."""
        text = f"{'F' if self.gender == 'female' else 'M'} {self.age:.0f}"
        if self.age_interval is not None:
            text += f" ({self.age_interval[0]:.0f}-{self.age_interval[1]:.0f})"
        return text


def faces_from(
    out: dict[str, np.ndarray], boxes: Sequence[Sequence[float]], scores: Sequence[float]
) -> list[Face]:
    """The :class:`Face` of each row of a backend's outputs, with its box and detector score."""
    faces = []
    for i, (box, score) in enumerate(zip(boxes, scores)):
        age = float(out["age"][i])
        interval = age_interval(age, float(out["age_std"][i])) if "age_std" in out else None
        p = float(out["p_female"][i])
        gender = "female" if p >= 0.5 else "male"
        faces.append(Face(tuple(float(v) for v in box), float(score), age, interval, gender, p))
    return faces
