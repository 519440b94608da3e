"""Tiny synthetic "faces" with UTKFace file names, for tests and the demo (no data licence needed),
and video scenes of faces moving before a camera, for the tracking tests and benchmark.

The drawings carry learnable signal on purpose: hair grows longer for ``female``, the face gets
paler and gains wrinkle lines with age, so a model can overfit them in a test.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def draw_face(age: int, gender: int, race: int, size: int = 64, seed: int = 0) -> Image.Image:
    """A cartoon face whose look depends on ``age``, ``gender`` and ``race`` (RGB, size x size)."""
    rng = np.random.default_rng(seed)
    s = size
    bg = tuple(int(v) for v in rng.integers(40, 200, 3))
    img = Image.new("RGB", (s, s), bg)
    d = ImageDraw.Draw(img)
    skin_base = (np.array([235, 200, 170]) - race * np.array([30, 32, 30])).clip(40, 255)
    skin = tuple(int(v) for v in (skin_base + min(age, 90) * 0.4).clip(0, 255))
    hair = tuple(int(v) for v in np.full(3, 30 + min(age, 90) * 2.3).clip(0, 230))
    jitter = rng.integers(-s // 32 - 1, s // 32 + 2, 2)
    cx, cy = s // 2 + jitter[0], s // 2 + jitter[1]
    fw, fh = int(s * 0.28), int(s * 0.36)
    if gender == 1:  # long hair behind the face
        d.rectangle([cx - fw - s // 10, cy - fh, cx + fw + s // 10, cy + fh + s // 8], fill=hair)
    d.ellipse([cx - fw, cy - fh, cx + fw, cy + fh], fill=skin)
    d.chord([cx - fw, cy - fh - 2, cx + fw, cy], 180, 360, fill=hair)
    eye = max(1, s // 32)
    for ex in (cx - fw // 2, cx + fw // 2):
        d.ellipse([ex - eye, cy - eye, ex + eye, cy + eye], fill=(20, 20, 20))
    d.line([cx - fw // 3, cy + fh // 2, cx + fw // 3, cy + fh // 2], fill=(120, 40, 40), width=eye)
    for k in range(min(age // 15, 5)):  # wrinkles
        y = cy - fh // 2 + k * max(1, s // 40)
        d.line([cx - fw // 2, y, cx + fw // 2, y], fill=(90, 70, 60), width=1)
    return img


def make_dataset(
    out_dir: str | os.PathLike, n: int = 64, size: int = 64, seed: int = 0
) -> list[Path]:
    """Write ``n`` synthetic faces named ``age_gender_race_datetime.jpg.chip.jpg`` into ``out_dir``.

    >>> import tempfile
    >>> paths = make_dataset(tempfile.mkdtemp(), n=3)
    >>> len(paths), paths[0].name.endswith(".jpg.chip.jpg")
    (3, True)
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        age = int(rng.integers(1, 91))
        gender = int(rng.integers(0, 2))
        race = int(rng.integers(0, 5))
        path = out / f"{age}_{gender}_{race}_2017011{seed % 10}{i:010d}.jpg.chip.jpg"
        draw_face(age, gender, race, size, seed=seed * 100_003 + i).save(path, quality=90)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- video scenes

#: where a face is at time t in [0, 1] of a clip: (centre x, centre y, side) on the scene's
#: canvas, or None while it is out of the picture
Path2D = Callable[[float], "tuple[float, float, float] | None"]
#: the camera's window on the canvas at time t: (x0, y0, width, height)
Camera = Callable[[float], "tuple[float, float, float, float]"]


def background(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A textured RGB canvas (gradients and soft blobs): something for a detector to ignore."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([60 + 80 * x / width, 90 + 60 * y / height, 140 - 50 * x / width], -1)
    for _ in range(12):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(30, 160)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None]
        img += blob * rng.uniform(-50, 50, 3)
    return img.clip(0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Scene:
    """Faces moving over a canvas, filmed by a camera that may pan and zoom.

    Face ``k`` (an RGB crop) is drawn where ``paths[k]`` puts it (later faces over earlier
    ones, as a face crossing in front), then the camera's window is cut out and resized to
    ``size`` (width, height). Identities, positions and ages are known, which is what tracking
    tests and benchmarks need (with real faces: YuNet does not take cartoons for faces).

    >>> f = np.zeros((100, 100, 3), np.uint8)
    >>> scene = Scene([f], [lambda t: (320, 180, 100)], frames=3)
    >>> clip = list(scene.render())
    >>> len(clip), clip[0].shape, scene.boxes(0)
    (3, (360, 640, 3), [(270.0, 130.0, 370.0, 230.0)])
    """

    faces: Sequence[np.ndarray]
    paths: Sequence[Path2D]
    frames: int
    size: tuple[int, int] = (640, 360)
    canvas: np.ndarray | None = None
    camera: Camera | None = None

    def _t(self, i: int) -> float:
        return i / max(self.frames - 1, 1)

    def _base(self) -> np.ndarray:
        return background(*self.size) if self.canvas is None else self.canvas

    def _window(self, t: float, base_shape: tuple[int, ...]) -> tuple[float, ...]:
        if self.camera is None:
            return 0.0, 0.0, float(base_shape[1]), float(base_shape[0])
        return self.camera(t)

    def boxes(self, i: int) -> list[tuple[float, float, float, float] | None]:
        """Each face's box (x0, y0, x1, y1) in frame ``i``'s pixels, None where it is not in
        the picture (out of the canvas or of the camera's window)."""
        t, base = self._t(i), self._base()
        x, y, w, h = self._window(t, base.shape)
        sx, sy = self.size[0] / round(w), self.size[1] / round(h)
        out: list[tuple[float, float, float, float] | None] = []
        for path in self.paths:
            where = path(t)
            if where is None:
                out.append(None)
                continue
            cx, cy, side = where
            s = max(round(side), 8)
            x0, y0 = round(cx - s / 2), round(cy - s / 2)
            box = ((x0 - round(x)) * sx, (y0 - round(y)) * sy,
                   (x0 + s - round(x)) * sx, (y0 + s - round(y)) * sy)  # fmt: skip
            inside = box[2] > 0 and box[3] > 0 and box[0] < self.size[0] and box[1] < self.size[1]
            out.append(box if inside else None)
        return out

    def render(self) -> Iterator[np.ndarray]:
        """The RGB frames, one after another."""
        import cv2

        base = self._base()
        for i in range(self.frames):
            t = self._t(i)
            img = base.copy()
            for face, path in zip(self.faces, self.paths):
                where = path(t)
                if where is None:
                    continue
                cx, cy, side = where
                s = max(round(side), 8)
                x0, y0 = round(cx - s / 2), round(cy - s / 2)
                sprite = cv2.resize(face, (s, s), interpolation=cv2.INTER_AREA)
                # clipped to the canvas: a face may be half out of the picture
                ax, ay = max(x0, 0), max(y0, 0)
                bx, by = min(x0 + s, img.shape[1]), min(y0 + s, img.shape[0])
                if bx > ax and by > ay:
                    img[ay:by, ax:bx] = sprite[ay - y0 : by - y0, ax - x0 : bx - x0]
            x, y, w, h = (round(v) for v in self._window(t, base.shape))
            view = img[y : y + h, x : x + w]
            yield cv2.resize(view, self.size, interpolation=cv2.INTER_AREA)


def group_pan(faces: Sequence[np.ndarray], seconds: float = 10.0, fps: float = 25.0) -> Scene:
    """Up to six faces standing as in a group photo (two rows of three, ~150 px each on a
    1280x720 canvas), the camera panning across it and zooming in a little, every face in the
    picture throughout: the clip of the video benchmark and tests."""
    spots = [(440, 250), (640, 235), (840, 255), (460, 460), (650, 470), (830, 450)]
    sides = [150, 160, 145, 155, 150, 160]
    paths = [
        (lambda t, x=x, y=y, s=s: (x + 6 * math.sin(7 * t), y + 4 * math.cos(5 * t), s))
        for (x, y), s in zip(spots, sides)
    ]

    def camera(t: float) -> tuple[float, float, float, float]:
        w = 1000 - 120 * t  # zooming in
        return 240 - 200 * t + 60 * t * t, 110 + 30 * math.sin(3 * t), w, w * 9 / 16

    canvas = background(1280, 720, seed=3)
    n = round(seconds * fps)
    return Scene(list(faces)[:6], paths[: len(faces)], n, (640, 360), canvas, camera)


def write_video(frames: Iterable[np.ndarray], path: str | os.PathLike, fps: float = 25.0) -> Path:
    """Write RGB frames as an MP4 (OpenCV's ``mp4v``); returns the path."""
    import cv2

    out, writer = Path(path), None
    for rgb in frames:
        if writer is None:
            h, w = rgb.shape[:2]
            writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
        writer.write(np.ascontiguousarray(rgb[:, :, ::-1]))
    if writer is not None:
        writer.release()
    return out
