"""Losses for the multi-task age and gender models of :mod:`agegender.training.models`.

Functional first: :func:`gender_loss` and :func:`age_loss` return 0-dim tensors;
:func:`multitask_loss` combines them and returns a dict with ``loss`` (what to backpropagate),
``loss_age`` and ``loss_gender`` (the unweighted task losses, comparable across weightings),
``mae`` (detached mean absolute age error in years, for logging) and ``weight_age`` /
``weight_gender`` (the effective, detached weights applied to each task loss).

Age heads (``head``), matching ``age_head`` of the model:

- ``"regression"``: L1 between the predicted and the true age.
- ``"dldl"``: DLDL-v2 (Gao et al. 2018): KL divergence from a Gaussian label distribution
  ``N(age, sigma)`` over the K ages ``0..K-1`` to ``softmax(age_logits)``, plus the L1 error of
  the distribution's expectation (weight 1, as in the paper), which ties the training
  objective to the MAE it is evaluated on.
- ``"coral"``: CORAL (Cao, Mirjalili & Raschka 2020): binary cross-entropy of the K - 1 logits
  against the levels ``age > k``, summed over levels and averaged over the batch.

A label may be an age range (FairFace's "20-29", Adience's "(25, 32)"): ``age`` is then
``(B, 2)``, each row ``(low, high)``, a whole-years label a row with ``low == high`` (a ``(B,)``
tensor of ages is the same as all rows so). ``regression`` and the DLDL L1 term count the
distance to the range, 0 inside it; ``dldl`` targets the range's ages evenly, blurred by
``sigma`` (a whole age: ``N(age, sigma)`` as above); ``coral`` trains the levels the range
decides (``k < low`` is 1, ``k >= high`` is 0) and leaves those inside it out. A gender of -1
is not known: that face trains the age only.

All losses are computed in float32, whatever the dtype of the outputs (autocast).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from agegender.core.errors import ConfigError
from agegender.training.models import AGE_HEADS

__all__ = [
    "AGE_HEADS",
    "UncertaintyWeights",
    "age_loss",
    "coral_levels",
    "distillation_loss",
    "gaussian_label_distribution",
    "gender_loss",
    "multitask_loss",
    "range_error",
    "range_label_distribution",
]


def _check_head(head: str) -> None:
    if head not in AGE_HEADS:
        raise ConfigError(f"unknown age head {head!r}; valid: {', '.join(AGE_HEADS)}")


def age_bounds(age: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(low, high)`` float32 ``(B,)`` of ``(B,)`` ages or ``(B, 2)`` ranges."""
    if isinstance(age, torch.Tensor) and age.ndim == 2 and age.shape[1] == 2:
        age = age.float()
        return age[:, 0], age[:, 1]
    _check_vector("age", age)
    age = age.float()
    return age, age


def range_error(pred: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
    """``(B,)`` distance in years from each estimate to its label (0 inside a range).

    >>> range_error(torch.tensor([30.0, 30.0, 30.0]), torch.tensor([[20, 29], [25, 35], [31, 31]]))
    tensor([1., 0., 1.])
    """
    low, high = age_bounds(age)
    pred = pred.float()
    return torch.relu(low - pred) + torch.relu(pred - high)


def _check_vector(name: str, t: torch.Tensor, batch: int | None = None) -> None:
    if not isinstance(t, torch.Tensor) or t.ndim != 1:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a 1-d tensor (B,), got {shape}")
    if batch is not None and t.shape[0] != batch:
        raise ValueError(f"{name} has batch size {t.shape[0]}, expected {batch}")


def _get(outputs: dict[str, torch.Tensor], key: str, head: str) -> torch.Tensor:
    if key not in outputs:
        raise ConfigError(
            f"age head {head!r} needs outputs[{key!r}], the model gave {sorted(outputs)}; "
            "does the loss head match the model's age_head?"
        )
    return outputs[key]


def gender_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits, averaged over the faces whose gender is known.

    Args:
        logits: ``(B,)`` gender logits (``outputs["gender"]``).
        target: ``(B,)`` 0 = male, 1 = female (any numeric dtype; soft labels in [0, 1] work),
            -1 = not known (left out; a batch of none known gives 0).

    >>> round(gender_loss(torch.tensor([0.0, 2.0]), torch.tensor([0, 1])).item(), 4)
    0.41
    >>> round(gender_loss(torch.tensor([0.0, 2.0, 5.0]), torch.tensor([0, 1, -1])).item(), 4)
    0.41
    """
    _check_vector("gender logits", logits)
    _check_vector("gender target", target, logits.shape[0])
    target = target.float()
    known = target >= 0
    per_face = F.binary_cross_entropy_with_logits(
        logits.float(), target.clamp(min=0), reduction="none"
    )
    # a mean over the known faces (for a batch of all known, the plain mean)
    return (per_face * known).sum() / known.sum().clamp(min=1)


def gaussian_label_distribution(
    age: torch.Tensor, num_ages: int = 117, sigma: float = 2.0
) -> torch.Tensor:
    """Discretised Gaussian ``N(age, sigma)`` over ages ``0..num_ages-1``, rows summing to 1.

    Args:
        age: ``(B,)`` true ages (int or float). An age beyond the last class gets the
            truncated, renormalised tail, which peaks at the last class.
        num_ages: K, the number of age classes.
        sigma: standard deviation in years.

    Returns:
        ``(B, K)`` float32.

    >>> d = gaussian_label_distribution(torch.tensor([2]), num_ages=5, sigma=1.0)
    >>> [round(v, 3) for v in d[0].tolist()]
    [0.054, 0.244, 0.403, 0.244, 0.054]
    """
    _check_vector("age", age)
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    ages = torch.arange(num_ages, device=age.device, dtype=torch.float32)
    # softmax of the log-density normalises without underflowing to an all-zero row
    # when the age lies far outside 0..K-1.
    log_density = -0.5 * ((ages[None, :] - age.float()[:, None]) / sigma).square()
    return log_density.softmax(dim=-1)


def range_label_distribution(
    age: torch.Tensor, num_ages: int = 117, sigma: float = 2.0
) -> torch.Tensor:
    """The DLDL target of ``(B,)`` ages or ``(B, 2)`` ranges: for a whole age the Gaussian of
    :func:`gaussian_label_distribution`, for a range ``[low, high]`` the range's ages evenly,
    blurred by ``sigma`` (the uniform distribution convolved with ``N(0, sigma)``).

    >>> d = range_label_distribution(torch.tensor([[1, 3]]), num_ages=5, sigma=0.5)
    >>> [round(v, 3) for v in d[0].tolist()]
    [0.053, 0.281, 0.333, 0.281, 0.053]
    """
    low, high = age_bounds(age)
    exact = gaussian_label_distribution(low, num_ages, sigma)
    if bool((low == high).all()):
        return exact
    ages = torch.arange(num_ages, device=low.device, dtype=torch.float32)[None, :]
    # the mass of N(a, sigma) falling in [low - 0.5, high + 0.5]: the range, whole years
    cdf = lambda x: 0.5 * (1 + torch.erf(x / (sigma * 2**0.5)))  # noqa: E731
    mass = cdf(high[:, None] + 0.5 - ages) - cdf(low[:, None] - 0.5 - ages)
    ranged = mass / mass.sum(dim=-1, keepdim=True).clamp(min=1e-12)
    return torch.where((low == high)[:, None], exact, ranged)


def coral_levels(age: torch.Tensor, num_levels: int = 116) -> torch.Tensor:
    """CORAL binary targets: level ``k`` is 1 if ``age > k``, for ``k = 0..num_levels-1``.

    >>> coral_levels(torch.tensor([0, 2, 9]), num_levels=4)
    tensor([[0., 0., 0., 0.],
            [1., 1., 0., 0.],
            [1., 1., 1., 1.]])
    """
    _check_vector("age", age)
    ks = torch.arange(num_levels, device=age.device, dtype=torch.float32)
    return (age.float()[:, None] > ks[None, :]).float()


def age_loss(
    outputs: dict[str, torch.Tensor], age: torch.Tensor, head: str, sigma: float = 2.0
) -> torch.Tensor:
    """Age loss for the given head (see the module docstring), averaged over the batch.

    Args:
        outputs: model outputs; ``"age"`` ``(B,)`` always, ``"age_logits"`` ``(B, K)`` for
            ``dldl`` and ``(B, K - 1)`` for ``coral``.
        age: ``(B,)`` true ages in years (int or float), or ``(B, 2)`` ranges (see the module).
        head: ``"regression"``, ``"dldl"`` or ``"coral"``.
        sigma: label-distribution width in years (``dldl`` only).

    >>> out = {"age": torch.tensor([30.0, 40.0])}
    >>> age_loss(out, torch.tensor([32, 37]), "regression").item()
    2.5
    >>> out = {"age": torch.tensor([2.0]), "age_logits": torch.tensor([[-9.0, 0.0, 9.0, 0.0]])}
    >>> round(age_loss(out, torch.tensor([2]), "dldl", sigma=1.0).item(), 4)  # KL; L1 is 0
    4.4592
    >>> out = {"age": torch.tensor([1.0]), "age_logits": torch.tensor([[0.0, 0.0]])}
    >>> round(age_loss(out, torch.tensor([1]), "coral").item(), 4)  # 2 * log(2)
    1.3863
    """
    _check_head(head)
    pred = _get(outputs, "age", head)
    low, high = age_bounds(age)
    _check_vector('outputs["age"]', pred, age.shape[0])
    if head == "regression":
        return range_error(pred, age).mean()

    logits = _get(outputs, "age_logits", head)
    if logits.ndim != 2 or logits.shape[0] != age.shape[0]:
        raise ValueError(
            f'outputs["age_logits"] must be (B={age.shape[0]}, K), got {tuple(logits.shape)}'
        )
    logits = logits.float()
    if head == "dldl":
        label = range_label_distribution(age, logits.shape[1], sigma)
        # KL(label || p) = sum label * (log label - log p); xlogy makes 0 * log 0 = 0.
        kl = (torch.xlogy(label, label) - label * logits.log_softmax(dim=-1)).sum(dim=-1)
        return kl.mean() + range_error(pred, age).mean()

    levels = coral_levels(high, logits.shape[1])  # level k is 1 where even the range's top > k
    # ... and a level inside a range (low <= k < high) is not known: left out
    ks = torch.arange(logits.shape[1], device=logits.device, dtype=torch.float32)[None, :]
    decided = ((ks < low[:, None]) | (ks >= high[:, None])).float()
    # Summed over levels (not averaged) as in the CORAL paper and coral-pytorch.
    per_level = F.binary_cross_entropy_with_logits(logits, levels, reduction="none")
    return (per_level * decided).sum(dim=-1).mean()


def multitask_loss(
    outputs: dict[str, torch.Tensor],
    age: torch.Tensor,
    gender: torch.Tensor,
    head: str = "regression",
    w_age: float = 1.0,
    w_gender: float = 1.0,
    log_vars: torch.Tensor | None = None,
    sigma: float = 2.0,
) -> dict[str, torch.Tensor]:
    """Combine the age and gender losses.

    Without ``log_vars``: ``loss = w_gender * L_gender + w_age * L_age``.

    With ``log_vars`` ``s = (s_age, s_gender)``, a ``(2,)`` learnable tensor (Kendall, Gal &
    Cipolla 2018, homoscedastic uncertainty weighting, in the simplified form
    ``sum_i exp(-s_i) * L_i + s_i``): ``loss = exp(-s_age) * w_age * L_age + s_age +
    exp(-s_gender) * w_gender * L_gender + s_gender``. The fixed weights still apply as priors;
    at their default of 1 this is exactly the formula above.

    Args:
        outputs: model outputs, ``"gender"`` ``(B,)``, ``"age"`` ``(B,)`` and the head's extras.
        age: ``(B,)`` true ages in years, or ``(B, 2)`` ranges.
        gender: ``(B,)`` 0 = male, 1 = female, -1 = not known.
        head: the model's age head, see :func:`age_loss`.
        w_age, w_gender: fixed task weights.
        log_vars: optional ``(2,)`` log variances, index 0 = age, 1 = gender; see
            :class:`UncertaintyWeights`.
        sigma: label-distribution width for ``dldl``.

    Returns:
        dict of 0-dim tensors: ``loss``, ``loss_age``, ``loss_gender`` (unweighted), ``mae``,
        ``weight_age``, ``weight_gender`` (the last three detached).

    >>> out = {"gender": torch.tensor([0.0, 0.0]), "age": torch.tensor([30.0, 40.0])}
    >>> res = multitask_loss(out, torch.tensor([32, 37]), torch.tensor([0, 1]))
    >>> {k: round(v.item(), 4) for k, v in res.items()}  # doctest: +NORMALIZE_WHITESPACE
    {'loss': 3.1931, 'loss_age': 2.5, 'loss_gender': 0.6931, 'mae': 2.5,
     'weight_age': 1.0, 'weight_gender': 1.0}
    """
    _check_inputs(outputs, age, gender, head)
    l_gender = gender_loss(outputs["gender"], gender)
    l_age = age_loss(outputs, age, head, sigma=sigma)
    loss, wa, wg = _weigh(l_age, l_gender, w_age, w_gender, log_vars)
    mae = range_error(outputs["age"].detach(), age).mean()
    return {
        "loss": loss,
        "loss_age": l_age,
        "loss_gender": l_gender,
        "mae": mae,
        "weight_age": wa.detach(),
        "weight_gender": wg.detach(),
    }


def _check_inputs(
    outputs: dict[str, torch.Tensor], age: torch.Tensor, gender: torch.Tensor, head: str
) -> None:
    _check_head(head)
    age_bounds(age)  # checks its shape
    _check_vector("gender target", gender, age.shape[0])
    logits = outputs.get("gender")
    if logits is None:
        raise ValueError(f'outputs has no "gender" key, only {sorted(outputs)}')
    _check_vector('outputs["gender"]', logits, age.shape[0])


def _weigh(
    l_age: torch.Tensor,
    l_gender: torch.Tensor,
    w_age: float,
    w_gender: float,
    log_vars: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, weight_age, weight_gender)``: the fixed weights, or learnt ones with
    ``log_vars`` (see :func:`multitask_loss`)."""
    if log_vars is None:
        # torch.full fills on the device; torch.tensor(x, device=cuda) would copy from the host
        # and wait for the GPU queue to drain, twice per training step
        wa = torch.full((), float(w_age), device=l_age.device)
        wg = torch.full((), float(w_gender), device=l_age.device)
        return float(w_age) * l_age + float(w_gender) * l_gender, wa, wg
    if log_vars.shape != (2,):
        raise ValueError(
            f"log_vars must have shape (2,) (age, gender), got {tuple(log_vars.shape)}"
        )
    s = log_vars.float()
    wa, wg = w_age * torch.exp(-s[0]), w_gender * torch.exp(-s[1])
    return wa * l_age + s[0] + wg * l_gender + s[1], wa, wg


class UncertaintyWeights(nn.Module):
    """Learnable task weighting (Kendall et al. 2018): holds ``log_vars`` = (s_age, s_gender).

    Add its parameters to the optimiser alongside the model's. Calling it runs
    :func:`multitask_loss` with ``log_vars=self.log_vars``.

    >>> uw = UncertaintyWeights()
    >>> out = {"gender": torch.tensor([0.0]), "age": torch.tensor([30.0])}
    >>> round(uw(out, torch.tensor([32]), torch.tensor([1]))["loss"].item(), 4)  # 2 + log 2
    2.6931
    """

    def __init__(self) -> None:
        super().__init__()
        self.log_vars = nn.Parameter(torch.zeros(2))

    def forward(
        self,
        outputs: dict[str, torch.Tensor],
        age: torch.Tensor,
        gender: torch.Tensor,
        head: str = "regression",
        sigma: float = 2.0,
    ) -> dict[str, torch.Tensor]:
        """See :func:`multitask_loss`."""
        return multitask_loss(outputs, age, gender, head=head, log_vars=self.log_vars, sigma=sigma)


def distillation_loss(
    outputs: dict[str, torch.Tensor],
    teacher_p_female: torch.Tensor,
    teacher_age_dist: torch.Tensor | None,
    w_age: float = 1.0,
    w_gender: float = 1.0,
) -> torch.Tensor:
    """How far a student's outputs are from its teacher's (Hinton et al. 2015, at T = 1).

    ``w_gender * BCE(student logit, teacher's P(female)) + w_age * KL(teacher's age
    distribution || the student's)``; the age term needs a ``dldl`` student (``age_logits``)
    and is left out when ``teacher_age_dist`` is None. Teacher outputs are soft targets: a face
    the teacher finds ambiguous teaches its ambiguity.

    >>> out = {"gender": torch.tensor([0.0]), "age_logits": torch.zeros(1, 4)}
    >>> round(distillation_loss(out, torch.tensor([0.5]), torch.full((1, 4), 0.25)).item(), 4)
    0.6931
    """
    gender = F.binary_cross_entropy_with_logits(outputs["gender"].float(), teacher_p_female.float())
    if teacher_age_dist is None:
        return w_gender * gender
    log_p = outputs["age_logits"].float().log_softmax(dim=-1)
    t = teacher_age_dist.float()
    kl = (torch.xlogy(t, t) - t * log_p).sum(dim=-1).mean()
    return w_gender * gender + w_age * kl
