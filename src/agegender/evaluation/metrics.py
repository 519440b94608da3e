"""Metrics of one set of predictions: gender accuracy and confusion, age error by band and
decade, a per-race table, calibration and the age interval's coverage. Pure NumPy.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from agegender.data.utkface import AGE_BANDS, GENDERS, RACES, age_band, band_name
from agegender.inference.runtime import INTERVAL_LEVEL, INTERVAL_Z

DECADES = (*((lo, lo + 9) for lo in range(0, 90, 10)), (90, 200))
ECE_BINS = 10
MIN_GROUP = 30  #: a group of fewer images is too noisy to be named the worst


def _mean(x: np.ndarray) -> float | None:
    # None (JSON null) rather than NaN for empty groups: NaN is not valid JSON
    return float(x.mean()) if len(x) else None


def _range_name(lo: int, hi: int, last: bool) -> str:
    return f"{lo}+" if last else f"{lo}-{hi}"


def compute_metrics(
    age_true: Any,
    gender_true: Any,
    race: Any,
    age_pred: Any,
    p_female: Any,
    age_std: Any | None = None,
    groups: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Gender, age, fairness, calibration and uncertainty metrics of one set of predictions.

    ``age_true`` is ``(N,)`` ages or ``(N, 2)`` ranges ``(low, high)``: a range's error is the
    distance to it (0 inside), which ``age_mae`` averages with the others, and ``age_range``
    says how many estimates fell inside their range (bands go by a range's middle). A
    ``gender_true`` or ``race`` of -1 is not known: left out of what needs it. ``groups``:
    ``{column: (N,) values}``, a table each in ``by_group`` (``n``, gender accuracy, MAE).

    A face is predicted female when ``p_female > 0.5``. Calibration uses the confidence
    ``max(p, 1 - p)`` (always in [0.5, 1]) in :data:`ECE_BINS` equal-width bins over [0.5, 1];
    the expected calibration error is the image-weighted mean of |accuracy - confidence| over
    the bins. With ``age_std`` the 90 % interval ``age_pred +- INTERVAL_Z * age_std`` is checked
    against the true ages. Groups without images get ``None`` for their averages.

    >>> m = compute_metrics(
    ...     age_true=[5, 25, 45, 70], gender_true=[0, 1, 0, 1], race=[0, 0, 1, 2],
    ...     age_pred=[7, 22, 45, 60], p_female=[0.2, 0.9, 0.6, 0.7], age_std=[1, 2, 1, 5])
    >>> m["n"], m["gender_accuracy"], m["gender_accuracy_by_gender"]
    (4, 0.75, {'male': 0.5, 'female': 1.0})
    >>> m["confusion"]  # rows: true male, female; columns: predicted male, female
    [[1, 1], [0, 2]]
    >>> m["age_mae"], round(m["age_abs_error_std"], 4)  # errors 2, 3, 0, 10
    (3.75, 3.7666)
    >>> {band: v["mae"] for band, v in m["age_mae_by_band"].items()}
    {'0-9': 2.0, '10-19': None, '20-39': 3.0, '40-59': 0.0, '60+': 10.0}
    >>> m["by_race"]["White"]
    {'n': 2, 'gender_accuracy': 1.0, 'age_mae': 2.5}
    >>> round(m["calibration"]["ece"], 6)  # one face per bin: (0.2 + 0.1 + 0.6 + 0.3) / 4
    0.3
    >>> m["age_interval"]["coverage"], round(m["age_interval"]["mean_width"], 4)
    (0.5, 7.4018)
    """
    return _metrics(_scored(age_true, gender_true, race, age_pred, p_female), age_std, groups)


def _metrics(s: _Scored, age_std: Any | None, groups: dict[str, Any] | None) -> dict[str, Any]:
    """:func:`compute_metrics` of labels and predictions already scored."""
    metrics: dict[str, Any] = {
        "n": s.n,
        "gender_known": int(s.known.sum()),
        "gender_accuracy": _accuracy(s, np.ones(s.n, bool)),
        "gender_accuracy_by_gender": {
            name: _accuracy(s, s.gender_true == g) for g, name in enumerate(GENDERS)
        },
        "confusion": _confusion(s),
        "age_mae": float(s.abs_err.mean()),
        "age_abs_error_std": float(s.abs_err.std()),
        "age_mae_by_band": _by_band(s),
        "age_mae_by_decade": _by_decade(s.age_true, s.abs_err),
        "by_race": {name: _row(s, s.race == r) for r, name in enumerate(RACES)},
        "calibration": _calibration(s.p_female, s.correct, s.known),
        "age_interval": None,
        "age_range": None,
        "by_group": _by_group(s, groups or {}),
    }
    ranged = s.low != s.high
    if ranged.any():
        metrics["age_range"] = _range_accuracy(s.age_pred, s.low, s.high, s.abs_err)
    metrics["worst_groups"] = worst_groups(metrics)
    if age_std is not None:
        metrics["age_interval"] = _interval(s.age_pred, s.age_true, age_std, ranged)
    return metrics


class _Scored(NamedTuple):
    """One set of labels and predictions as arrays, and what each face got right or wrong."""

    n: int
    low: np.ndarray  # (N,) the true age, or the low end of its range
    high: np.ndarray  # (N,) the high end (= low for an exact age)
    age_true: np.ndarray  # (N,) a range's middle, for bands and decades
    gender_true: np.ndarray  # (N,) -1: not known
    race: np.ndarray  # (N,) -1: not known
    age_pred: np.ndarray
    p_female: np.ndarray
    known: np.ndarray  # (N,) bool: the true gender is known
    correct: np.ndarray  # (N,) bool: the predicted gender is right (read only where known)
    abs_err: np.ndarray  # (N,) years between the estimate and the age or range (0 inside)


def _scored(age_true: Any, gender_true: Any, race: Any, age_pred: Any, p_female: Any) -> _Scored:
    bounds = np.asarray(age_true, dtype=np.float64)
    if bounds.ndim == 1:
        bounds = np.stack([bounds, bounds], axis=1)
    low, high = bounds[:, 0], bounds[:, 1]
    middle = np.floor((low + high) / 2)
    gender_true = np.asarray(gender_true, dtype=np.int64)
    race = np.asarray(race, dtype=np.int64)
    age_pred = np.asarray(age_pred, dtype=np.float64)
    p_female = np.asarray(p_female, dtype=np.float64)
    n = len(middle)
    if not n == len(gender_true) == len(race) == len(age_pred) == len(p_female):
        raise ValueError("age_true, gender_true, race, age_pred and p_female differ in length")
    if n == 0:
        raise ValueError("no predictions to evaluate")
    correct = (p_female > 0.5).astype(np.int64) == gender_true
    abs_err = np.maximum(low - age_pred, 0) + np.maximum(age_pred - high, 0)
    known = gender_true >= 0
    return _Scored(
        n, low, high, middle, gender_true, race, age_pred, p_female, known, correct, abs_err
    )


def _accuracy(s: _Scored, sel: np.ndarray) -> float | None:
    """Gender accuracy of the faces ``sel`` whose gender is known."""
    return _mean(s.correct[sel & s.known].astype(np.float64))


def _row(s: _Scored, sel: np.ndarray) -> dict[str, Any]:
    return {
        "n": int(sel.sum()),
        "gender_accuracy": _accuracy(s, sel),
        "age_mae": _mean(s.abs_err[sel]),
    }


def _confusion(s: _Scored) -> list[list[int]]:
    """Rows: true male, female; columns: predicted male, female (known genders only)."""
    confusion = np.zeros((2, 2), dtype=np.int64)
    gender_pred = (s.p_female > 0.5).astype(np.int64)
    np.add.at(confusion, (s.gender_true[s.known], gender_pred[s.known]), 1)
    return confusion.tolist()


def _by_band(s: _Scored) -> dict[str, dict[str, Any]]:
    # Bands by data.age_band, so that the bands match the split's stratification exactly.
    bands = np.asarray(age_band(s.age_true.astype(np.int64)))
    confidence = np.maximum(s.p_female, 1 - s.p_female)
    return {
        band_name(b): {
            "n": int((bands == b).sum()),
            "mae": _mean(s.abs_err[bands == b]),
            "gender_accuracy": _accuracy(s, bands == b),
            # how sure the model sounds beside how often it is right: far apart for children
            "gender_confidence": _mean(confidence[(bands == b) & s.known]),
            "gender_ece": _calibration(s.p_female, s.correct, s.known & (bands == b))["ece"],
        }
        for b in range(len(AGE_BANDS))
    }


def _by_group(s: _Scored, groups: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """A table per group column: each value's ``n``, gender accuracy and MAE."""
    out = {}
    for column, values in groups.items():
        values = np.asarray(values).astype(str)
        out[column] = {str(v): _row(s, values == v) for v in sorted(set(values.tolist()))}
    return out


def _by_decade(age_true: np.ndarray, abs_err: np.ndarray) -> dict[str, dict[str, Any]]:
    out = {}
    for i, (lo, hi) in enumerate(DECADES):
        sel = (age_true >= lo) & (age_true <= hi)
        out[_range_name(lo, hi, i == len(DECADES) - 1)] = {
            "n": int(sel.sum()),
            "mae": _mean(abs_err[sel]),
        }
    return out


def _calibration(p_female: np.ndarray, correct: np.ndarray, known: np.ndarray) -> dict[str, Any]:
    """Reliability bins of the confidence ``max(p, 1 - p)`` and their expected calibration error."""
    confidence = np.maximum(p_female, 1 - p_female)
    edges = np.linspace(0.5, 1.0, ECE_BINS + 1)
    which = np.clip(np.searchsorted(edges[1:-1], confidence, side="right"), 0, ECE_BINS - 1)
    bins, ece = [], 0.0
    for b in range(ECE_BINS):
        sel = (which == b) & known
        conf, acc = _mean(confidence[sel]), _mean(correct[sel].astype(np.float64))
        if conf is not None and acc is not None:
            ece += sel.sum() / max(known.sum(), 1) * abs(acc - conf)
        bins.append(
            {
                "lo": float(edges[b]),
                "hi": float(edges[b + 1]),
                "n": int(sel.sum()),
                "confidence": conf,
                "accuracy": acc,
            }
        )
    return {"ece": float(ece), "bins": bins}


def _range_accuracy(
    age_pred: np.ndarray, low: np.ndarray, high: np.ndarray, abs_err: np.ndarray
) -> dict[str, Any]:
    """How range labels fared: estimates inside their range, and years outside it."""
    ranged = low != high
    inside = (age_pred >= low) & (age_pred <= high)
    return {
        "n": int(ranged.sum()),
        "accuracy": float(inside[ranged].mean()),
        "distance": float(abs_err[ranged].mean()),  # 0 inside
        "exact_n": int((~ranged).sum()),
        "exact_mae": _mean(abs_err[~ranged]),
    }


def _interval(
    age_pred: np.ndarray, age_true: np.ndarray, age_std: Any, ranged: np.ndarray
) -> dict[str, Any]:
    """Coverage of the 90 % interval on exact ages (a range has no single age to cover)."""
    half = INTERVAL_Z * np.asarray(age_std, dtype=np.float64)
    covered = np.abs(age_pred - age_true) <= half
    return {
        "level": INTERVAL_LEVEL,
        "z": INTERVAL_Z,
        "coverage": float(covered[~ranged].mean()) if (~ranged).any() else None,
        "mean_width": float((2 * half).mean()),
    }


def worst_groups(m: dict[str, Any]) -> dict[str, dict[str, dict[str, Any] | None]]:
    """For race groups and for age bands, the one with the lowest gender accuracy and the one
    with the highest age MAE (of those with at least :data:`MIN_GROUP` images), with its gap to
    the overall figure: ``{"race": {"gender_accuracy": {"group", "n", "value", "overall",
    "gap"}, "age_mae": ...}, "age": {...}}``. Both kinds, because the worst gender accuracy by
    age is always the babies', which would hide the worst race group."""
    kinds = {"race": m["by_race"], "age": m["age_mae_by_band"]}
    out: dict[str, dict[str, dict[str, Any] | None]] = {}
    for kind, table in kinds.items():
        out[kind] = {}
        for key, pick in (("gender_accuracy", min), ("age_mae", max)):
            field = key if key in next(iter(table.values())) else "mae"
            values = {
                g: v[field]
                for g, v in table.items()
                if v["n"] >= MIN_GROUP and v[field] is not None
            }
            if not values or m[key] is None:
                out[kind][key] = None
                continue
            group = pick(values, key=values.__getitem__)
            out[kind][key] = {
                "group": group,
                "n": table[group]["n"],
                "value": values[group],
                "overall": m[key],
                "gap": values[group] - m[key],
            }
    return out
