"""Fitting a trained model's ``child_temperature`` (see
:func:`agegender.training.models.child_softening`) to faces it never saw.

A face's gender is much harder to tell on a child than on an adult, and a network trained on
both sounds nearly as sure on either. One temperature, applied to the gender logit only where
the estimated age is a child's, is fitted by the log-likelihood of the true genders; it moves
P(female) towards 1/2 there and changes no predicted gender (the logit keeps its sign) and no age.

:func:`cross_fitted` gives the honest view of what the fit does: each half of the faces is
scored with the temperature fitted on the other half.
"""

from __future__ import annotations

import numpy as np
import torch

from agegender.training.models import child_softening

#: temperatures tried (the fit is one number: a grid is exact enough and cannot diverge)
GRID = np.round(np.arange(0.5, 6.0001, 0.05), 2)


def _logit(p_female: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p_female, np.float64), 1e-6, 1 - 1e-6)
    return np.log(p) - np.log1p(-p)


def soften(p_female: np.ndarray, age_pred: np.ndarray, temperature: float) -> np.ndarray:
    """P(female) as a model with ``child_temperature=temperature`` would give it, from the
    same model's plain P(female) and estimated age."""
    logit = torch.from_numpy(_logit(p_female))
    age = torch.as_tensor(np.asarray(age_pred, np.float64))
    return torch.sigmoid(child_softening(logit, age, temperature)).numpy()


def _nll(p: np.ndarray, female: np.ndarray) -> float:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return float(-np.mean(np.where(female, np.log(p), np.log1p(-p))))


def fit_child_temperature(p_female: np.ndarray, age_pred: np.ndarray, gender: np.ndarray) -> float:
    """The temperature of :data:`GRID` that gives the true genders the highest likelihood.

    ``gender``: 0 male, 1 female, -1 not known (left out).

    >>> rng = np.random.default_rng(0)
    >>> age = np.r_[np.full(2000, 3.0), np.full(2000, 30.0)]
    >>> gender = rng.integers(0, 2, 4000)
    >>> # sure of itself everywhere (P 0.9 for its guess), right on 65 % of children, all adults
    >>> right = np.r_[rng.random(2000) < 0.65, np.ones(2000, bool)]
    >>> guess = np.where(right, gender, 1 - gender)
    >>> p = np.where(guess == 1, 0.9, 0.1)
    >>> t = fit_child_temperature(p, age, gender)
    >>> said = soften(p, age, t)[(guess == 1) & (age < 10)].mean()  # was 0.9, right 65 % of times
    >>> 3 < t < 4, bool(abs(said - 0.65) < 0.02)
    (True, True)
    """
    p_female, age_pred, gender = map(np.asarray, (p_female, age_pred, gender))
    known = gender >= 0
    if not known.any():
        raise ValueError("no face with a known gender to fit on")
    p, a, female = p_female[known], age_pred[known], gender[known] == 1
    losses = [_nll(soften(p, a, t), female) for t in GRID]
    return float(GRID[int(np.argmin(losses))])


def cross_fitted(
    p_female: np.ndarray, age_pred: np.ndarray, gender: np.ndarray, seed: int = 0
) -> tuple[np.ndarray, list[float]]:
    """Each face's softened P(female) with the temperature fitted on the other half of the
    faces (a seeded random halving); returns those and the two temperatures."""
    p_female, age_pred, gender = map(np.asarray, (p_female, age_pred, gender))
    half = np.random.default_rng(seed).permutation(len(p_female)) % 2 == 0
    out = np.empty(len(p_female))
    temps = []
    for part in (half, ~half):
        t = fit_child_temperature(p_female[~part], age_pred[~part], gender[~part])
        out[part] = soften(p_female[part], age_pred[part], t)
        temps.append(t)
    return out, temps
