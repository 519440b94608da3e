"""Near-duplicate faces: copies of one photograph that are not byte-identical (re-encoded,
re-cropped by a pixel or two, re-toned, blurred, watermarked), and the record of what a model
was trained on.

A face's **signature** is its gray 128 px crop reduced to two grids of box averages over the
central 96 px (the borders move most when a photo is re-cropped): a coarse 8x8 to search with
and a fine 12x12 to decide with. Each grid is standardised (mean 0, std 1: brightness and
contrast cancel out) and stored, the coarse at 4 bits a cell, the fine at 8: 176 bytes a face.

Two faces are **the same photograph** when, at the best of 25 relative shifts of up to
``SHIFT`` px each way (computed on the query's pixels), the median absolute difference of their
fine grids is below ``MATCH_MAX``. The median ignores what touches a few cells only (a
watermark, a logo, a corner filled in by rotation). Candidates for that comparison come from a
nearest-neighbour search on the coarse grids, unshifted and then at their best shift.

How the thresholds were measured, with pictures of the pairs just inside and just outside:
``benchmarks/near_duplicates.py`` and ``reports/near-duplicates/``. The same comparison serves
``prepare`` (faces against faces) and evaluation (faces against a model's :class:`SeenRecord`,
which holds no pixels), so both decide alike.

>>> faces = np.random.default_rng(0).integers(0, 256, (3, 128, 128), dtype=np.uint8)
>>> faces[2] = np.clip(faces[0] * 1.05, 0, 255)  # a brighter copy of the first
>>> [(i, j) for i, j, _ in find_pairs(faces)]
[(0, 2)]
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image

WORK = 128  #: side of the gray face signatures are computed at
MARGIN = 16  #: pixels left out on each side
GRID = 12  #: the fine grid, GRID x GRID box averages: what decides
COARSE = 8  #: the coarse grid: what the search looks for candidates with
SHIFT = 2  #: relative shifts searched, in WORK pixels, each way
STEP = 0.32  #: the coarse grid's 4-bit cells: round(z / STEP) in -7..8, z in std units
FINE_STEP = 0.02  #: the fine grid's int8 cells: round(z / FINE_STEP) in -127..127 (+-2.54 std)
MATCH_MAX = 0.1  #: median |difference| (std units) under which two faces are one photo
#: unshifted coarse distance within which pairs are searched with shifts: a copy shifted 2 px
#: both ways moved by 0.50 at most on 500 UTKFace faces (about 40 candidates per face)
CANDIDATE_MAX = 0.55
#: coarse distance at the best shift within which pairs are compared cell by cell: every pair
#: of UTKFace faces found the same photo by its pixels (at 32 px) was within 0.30
COARSE_MAX = 0.35
SIGNATURE_VERSION = 2  # 2: int8 fine grid, MATCH_MAX 0.1
BYTES = COARSE * COARSE // 2 + GRID * GRID  #: storage per face: 32 + 144 bytes


def work_faces(images: np.ndarray) -> np.ndarray:
    """``(N, H, W, C)`` or ``(N, H, W)`` uint8 faces -> ``(N, WORK, WORK)`` gray uint8."""
    if images.ndim == 4:
        if images.shape[3] == 1:
            images = images[..., 0]
        else:  # ITU-R 601 luma, as Pillow's convert("L") and JPEG's Y
            luma = np.array([0.299, 0.587, 0.114], np.float32)
            images = (images @ luma).round().astype(np.uint8)
    if images.shape[1:] == (WORK, WORK):
        return np.ascontiguousarray(images)
    out = np.empty((len(images), WORK, WORK), np.uint8)
    for i, img in enumerate(images):
        out[i] = np.asarray(Image.fromarray(img).resize((WORK, WORK), Image.Resampling.BOX))
    return out


@functools.cache
def _windows(grid: int, shifted: bool) -> np.ndarray:
    """``(S * grid, WORK)`` 0/1 rows: which pixels each cell sums, for each shift."""
    cell = (WORK - 2 * MARGIN) // grid
    shifts = range(-SHIFT, SHIFT + 1) if shifted else (0,)
    m = np.zeros((len(shifts), grid, WORK), np.float32)
    for a, d in enumerate(shifts):
        for g in range(grid):
            m[a, g, MARGIN + g * cell + d : MARGIN + (g + 1) * cell + d] = 1
    return m.reshape(-1, WORK)


def grids(
    faces: np.ndarray, grid: int = GRID, shifts: bool = False, chunk: int = 1024
) -> np.ndarray:
    """Standardised ``grid`` x ``grid`` box averages of ``faces`` (any layout
    :func:`work_faces` takes): ``(N, grid**2)`` float32, or with ``shifts``
    ``(N, 25, grid**2)``, one per relative shift of the window (the unshifted in the middle).

    A cell's sum at shift ``(dy, dx)`` is ``rows(dy) @ face @ cols(dx).T``: two small matrix
    products give every shift at once.
    """
    m = _windows(grid, shifts)
    s = len(m) // grid
    out = np.empty((len(faces), s * s, grid * grid), np.float32)
    for start in range(0, len(faces), chunk):
        # a chunk at a time: a cache may be a memory map larger than memory
        f = work_faces(np.asarray(faces[start : start + chunk])).astype(np.float32)
        n = len(f)
        # two large matrix products rather than a small one per face: columns, then rows
        cols = (f.reshape(n * WORK, WORK) @ m.T).reshape(n, WORK, -1)  # (n, y, S*grid)
        rows = m @ cols.transpose(1, 0, 2).reshape(WORK, -1)  # (S*grid, n * S*grid)
        boxes = rows.reshape(s, grid, n, s, grid).transpose(2, 0, 3, 1, 4)
        boxes = boxes.reshape(n, s * s, grid * grid)
        boxes -= boxes.mean(axis=-1, keepdims=True)
        out[start : start + len(f)] = boxes / np.maximum(boxes.std(axis=-1, keepdims=True), 1e-6)
    return out if shifts else out[:, 0]  # sums stay exact in float32


def signatures(faces: np.ndarray) -> np.ndarray:
    """The packed signatures of ``faces``: ``(N, BYTES)`` uint8, the coarse grid at 4 bits a
    cell, the fine one at 8 (its rounding, 0.01 std at most, stays far below ``MATCH_MAX``)."""
    fine = np.clip(np.round(grids(faces, GRID) / FINE_STEP), -127, 127).astype(np.int8)
    return np.concatenate([pack(grids(faces, COARSE)), fine.view(np.uint8)], axis=1)


def _unpack_fine(packed: np.ndarray) -> np.ndarray:
    return packed.view(np.int8).astype(np.float32) * FINE_STEP


def pack(grid: np.ndarray) -> np.ndarray:
    """``(N, K)`` float grids -> ``(N, K / 2)`` uint8, two 4-bit cells a byte."""
    codes = (np.clip(np.round(grid / STEP), -7, 8) + 7).astype(np.uint8)  # 0..15
    return (codes[:, 0::2] << 4) | codes[:, 1::2]


def unpack(packed: np.ndarray) -> np.ndarray:
    """:func:`pack`'s bytes -> ``(N, K)`` float32 grids (each cell to 0.16 std)."""
    codes = np.empty((len(packed), 2 * packed.shape[1]), np.int16)
    codes[:, 0::2], codes[:, 1::2] = packed >> 4, packed & 15
    return (codes - 7).astype(np.float32) * STEP


def _unit(g: np.ndarray) -> np.ndarray:
    """Standardised grids -> unit vectors (their cosine similarity is their correlation)."""
    return g / np.maximum(np.linalg.norm(g, axis=-1, keepdims=True), 1e-6)


def find_pairs(
    query_faces: np.ndarray,
    base: np.ndarray | None = None,
    max_median: float = MATCH_MAX,
    chunk: int = 2048,
) -> list[tuple[int, int, float]]:
    """``(i, j, median difference)`` for each query face ``i`` and base face ``j`` that are
    the same photograph, sorted.

    ``base``: packed signatures (``(M, BYTES)`` uint8, see :func:`signatures`); ``None``
    compares the query faces with each other, each pair once (``i < j``).
    """
    self_search = base is None
    if self_search:
        base = signatures(query_faces)
    if len(base) == 0 or len(query_faces) == 0:
        return []
    half = COARSE * COARSE // 2
    base_coarse, base_fine = _unit(unpack(base[:, :half])), _unpack_fine(base[:, half:])
    cut = 1 - CANDIDATE_MAX**2 / 2  # cosine similarity of unit vectors at that distance
    coarse_cut = 1 - COARSE_MAX**2 / 2
    found: dict[tuple[int, int], float] = {}
    for s in range(0, len(query_faces), chunk):
        part = query_faces[s : s + chunk]
        # clipped as storage clips it, or a face with an extreme cell would not match itself
        coarse = _unit(np.clip(grids(part, COARSE, shifts=True), -7 * STEP, 8 * STEP))
        sim = coarse[:, coarse.shape[1] // 2] @ base_coarse.T  # (q, M), unshifted
        if self_search:
            sim[np.arange(len(sim)), np.arange(s, s + len(sim))] = -np.inf
        qi, bj = np.nonzero(sim > cut)
        keep = np.zeros(len(qi), bool)
        for p in range(0, len(qi), 16384):  # the coarse grids at their best shift
            best = np.einsum(
                "psd,pd->ps", coarse[qi[p : p + 16384]], base_coarse[bj[p : p + 16384]]
            )
            keep[p : p + 16384] = best.max(axis=1) > coarse_cut
        qi, bj = qi[keep], bj[keep]
        if not len(qi):
            continue
        # clipped to what storage keeps: cells beyond it in both faces agree, as they should
        fine = np.clip(grids(part, GRID, shifts=True), -127 * FINE_STEP, 127 * FINE_STEP)
        for p in range(0, len(qi), 4096):
            qp, bp = qi[p : p + 4096], bj[p : p + 4096]
            diff = np.abs(fine[qp] - base_fine[bp][:, None, :])
            # median < max_median  <=>  more than half the cells differ by less: a count,
            # which needs no sort
            agree = (diff < max_median).sum(axis=2, dtype=np.int16)  # (pairs, 25)
            best = agree.argmax(axis=1)
            for k in np.flatnonzero(agree[np.arange(len(agree)), best] > GRID * GRID // 2):
                i, j = s + int(qp[k]), int(bp[k])
                key = (min(i, j), max(i, j)) if self_search else (i, j)
                med = float(np.median(diff[k, best[k]]))
                found[key] = min(med, found.get(key, np.inf))
    return [(i, j, d) for (i, j), d in sorted(found.items())]


def groups(n: int, pairs: list[tuple[int, int, float]] | list[tuple[int, int]]) -> np.ndarray:
    """Union-find over ``pairs``: ``(n,)`` the smallest member index of each face's group."""
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, *_ in pairs:
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return np.array([root(i) for i in range(n)])


# --------------------------------------------------------------------------- what a model saw


@dataclass(frozen=True)
class SeenRecord:
    """What a model was trained and validated on: the content hashes (first 8 bytes of the
    16-byte blake2b) and packed signatures of those images, 184 bytes an image."""

    hashes: np.ndarray  # (N, 8) uint8
    signatures: np.ndarray  # (N, BYTES) uint8

    @classmethod
    def of(cls, content_hashes: list[str], faces: np.ndarray) -> SeenRecord:
        """The record of images with these hex content hashes and (any-layout) faces."""
        return cls(hash_bytes(content_hashes), signatures(faces))

    @classmethod
    def empty(cls) -> SeenRecord:
        return cls(np.zeros((0, 8), np.uint8), np.zeros((0, BYTES), np.uint8))

    def __len__(self) -> int:
        return len(self.hashes)

    def __add__(self, other: SeenRecord) -> SeenRecord:
        """Both records (fine-tuning adds the new data to what the model already saw), each
        image once: two teachers or ensemble members trained on the same faces."""
        hashes = np.concatenate([self.hashes, other.hashes])
        signatures = np.concatenate([self.signatures, other.signatures])
        keep = np.sort(np.unique(hashes, axis=0, return_index=True)[1])  # a row is a hash
        return SeenRecord(hashes[keep], signatures[keep])

    def seen(self, content_hashes: list[str], faces: np.ndarray) -> np.ndarray:
        """``(N,)`` bool: which images are in the record, or near-copies of one in it."""
        known = {bytes(h) for h in self.hashes}
        out = np.array([bytes(h) in known for h in hash_bytes(content_hashes)], dtype=bool)
        if len(self) and len(faces):
            for i, _, _ in find_pairs(faces, self.signatures):
                out[i] = True
        return out


def hash_bytes(content_hashes: list[str]) -> np.ndarray:
    """Hex content hashes -> ``(N, 8)`` uint8 (their first 8 bytes)."""
    out = np.zeros((len(content_hashes), 8), np.uint8)
    for i, h in enumerate(content_hashes):
        out[i] = np.frombuffer(bytes.fromhex(h[:16].ljust(16, "0")), np.uint8)
    return out
