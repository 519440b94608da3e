"""Losses against hand-computed values, and their input checks."""

from __future__ import annotations

import math

import pytest
import torch

from agegender.core.errors import ConfigError
from agegender.training.losses import (
    UncertaintyWeights,
    age_loss,
    coral_levels,
    gaussian_label_distribution,
    gender_loss,
    multitask_loss,
)

torch.set_num_threads(1)


def _bce(logit: float, y: int) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def test_gender_loss_matches_hand_computed_bce() -> None:
    logits = torch.tensor([0.0, 2.0, -1.0, 3.0])
    target = torch.tensor([0, 1, 1, 0])
    expected = sum(_bce(z, y) for z, y in zip(logits.tolist(), target.tolist(), strict=True)) / 4
    assert torch.allclose(gender_loss(logits, target), torch.tensor(expected))
    # float targets and half-precision logits give the same float32 result
    got = gender_loss(logits.half(), target.float())
    assert got.dtype == torch.float32
    assert torch.allclose(got, torch.tensor(expected), atol=1e-3)


def test_regression_age_loss_is_l1() -> None:
    out = {"age": torch.tensor([30.0, 40.0, 5.0])}
    loss = age_loss(out, torch.tensor([32, 37, 5]), "regression")
    assert torch.allclose(loss, torch.tensor(5.0 / 3))


def test_gaussian_label_distribution() -> None:
    ages = torch.tensor([0, 25, 60.5, 116, 130])
    dist = gaussian_label_distribution(ages, num_ages=117, sigma=2.0)
    assert dist.shape == (5, 117)
    assert torch.allclose(dist.sum(dim=1), torch.ones(5))
    assert dist.argmax(dim=1).tolist() == [0, 25, 60, 116, 116]
    # symmetric around an integer age, and exp(-1/2) between the peak and one sigma away
    row = dist[1]
    assert torch.allclose(row[23], row[27])
    assert torch.allclose(row[27] / row[25], torch.tensor(math.exp(-0.5)))
    # a half-integer age splits its peak evenly
    assert torch.allclose(dist[2, 60], dist[2, 61])


def test_dldl_loss_is_kl_plus_l1() -> None:
    label = gaussian_label_distribution(torch.tensor([40.0, 10.0]), sigma=2.0)
    # logits equal to the log of the target distribution: KL is 0, only L1 remains (the clamp
    # keeps the logits finite where the far tail underflows to 0)
    out = {"age": torch.tensor([41.0, 7.0]), "age_logits": label.clamp_min(1e-30).log()}
    loss = age_loss(out, torch.tensor([40, 10]), "dldl", sigma=2.0)
    assert torch.allclose(loss, torch.tensor(2.0), atol=1e-5)

    # uniform prediction: KL = sum q log q + log K
    logits = torch.zeros(1, 117)
    out = {"age": torch.tensor([58.0]), "age_logits": logits}
    q = gaussian_label_distribution(torch.tensor([20]), sigma=2.0)[0]
    kl = float(torch.xlogy(q, q).sum()) + math.log(117)
    loss = age_loss(out, torch.tensor([20]), "dldl", sigma=2.0)
    assert torch.allclose(loss, torch.tensor(kl + 38.0), atol=1e-4)


def test_coral_levels_and_loss() -> None:
    levels = coral_levels(torch.tensor([0, 1, 3, 116]), num_levels=116)
    assert levels.shape == (4, 116)
    assert levels.sum(dim=1).tolist() == [0, 1, 3, 116]
    assert levels[2, :4].tolist() == [1, 1, 1, 0]

    logits = torch.tensor([[2.0, -1.0, 0.5]])
    out = {"age": torch.sigmoid(logits).sum(dim=1), "age_logits": logits}
    # age 1: level 0 is 1, levels 1 and 2 are 0; summed over levels
    expected = _bce(2.0, 1) + _bce(-1.0, 0) + _bce(0.5, 0)
    loss = age_loss(out, torch.tensor([1]), "coral")
    assert torch.allclose(loss, torch.tensor(expected))


def _outputs() -> dict[str, torch.Tensor]:
    return {"gender": torch.tensor([0.0, 2.0]), "age": torch.tensor([30.0, 40.0])}


def test_multitask_default_equal_weights() -> None:
    age, gender = torch.tensor([32, 37]), torch.tensor([0, 1])
    res = multitask_loss(_outputs(), age, gender)
    l_gender = (_bce(0.0, 0) + _bce(2.0, 1)) / 2
    assert torch.allclose(res["loss_age"], torch.tensor(2.5))
    assert torch.allclose(res["loss_gender"], torch.tensor(l_gender))
    assert torch.allclose(res["loss"], torch.tensor(2.5 + l_gender))
    assert torch.allclose(res["mae"], torch.tensor(2.5))
    for key in ("loss", "loss_age", "loss_gender", "mae", "weight_age", "weight_gender"):
        assert res[key].ndim == 0, key

    res = multitask_loss(_outputs(), age, gender, w_age=0.1, w_gender=2.0)
    assert torch.allclose(res["loss"], torch.tensor(0.25 + 2 * l_gender))
    assert torch.allclose(res["loss_age"], torch.tensor(2.5))  # unweighted


def test_multitask_uncertainty_weighting() -> None:
    age, gender = torch.tensor([32, 37]), torch.tensor([0, 1])
    log_vars = torch.tensor([0.5, -1.0], requires_grad=True)
    res = multitask_loss(_outputs(), age, gender, log_vars=log_vars)
    l_age, l_gender = 2.5, (_bce(0.0, 0) + _bce(2.0, 1)) / 2
    expected = math.exp(-0.5) * l_age + 0.5 + math.exp(1.0) * l_gender - 1.0
    assert torch.allclose(res["loss"], torch.tensor(expected))
    assert torch.allclose(res["weight_age"], torch.tensor(math.exp(-0.5)))
    res["loss"].backward()
    # d/ds (exp(-s) L + s) = 1 - exp(-s) L
    grad = torch.tensor([1 - math.exp(-0.5) * l_age, 1 - math.exp(1.0) * l_gender])
    assert torch.allclose(log_vars.grad, grad)


def test_uncertainty_weights_module() -> None:
    uw = UncertaintyWeights()
    assert uw.log_vars.shape == (2,)
    assert [p.shape for p in uw.parameters()] == [torch.Size([2])]
    age, gender = torch.tensor([32, 37]), torch.tensor([0, 1])
    res = uw(_outputs(), age, gender)
    # zero log variances: same as plain equal weights
    plain = multitask_loss(_outputs(), age, gender)
    assert torch.allclose(res["loss"], plain["loss"])
    res["loss"].backward()
    assert uw.log_vars.grad is not None


def test_multitask_with_model_heads() -> None:
    from agegender.training.models import create_model

    torch.manual_seed(0)
    x = torch.randn(2, 1, 64, 64)
    age, gender = torch.tensor([3, 70]), torch.tensor([1, 0])
    for head in ("regression", "dldl", "coral"):
        model = create_model("resnet-mt-small", img_size=64, age_head=head)
        res = multitask_loss(model(x), age, gender, head=head)
        assert torch.isfinite(res["loss"])
        res["loss"].backward()


def test_unknown_head() -> None:
    with pytest.raises(ConfigError, match="regression, dldl, coral"):
        age_loss(_outputs(), torch.tensor([1, 2]), "softmax")
    with pytest.raises(ConfigError, match="regression, dldl, coral"):
        multitask_loss(_outputs(), torch.tensor([1, 2]), torch.tensor([0, 1]), head="ordinal")


def test_head_mismatch_with_outputs() -> None:
    with pytest.raises(ConfigError, match="age_logits"):
        age_loss(_outputs(), torch.tensor([1, 2]), "dldl")


def test_shape_mismatch() -> None:
    out = _outputs()
    with pytest.raises(ValueError, match=r'outputs\["gender"\] has batch size 2, expected 3'):
        multitask_loss(out, torch.tensor([1, 2, 3]), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="gender target has batch size 3"):
        multitask_loss(out, torch.tensor([1, 2]), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match=r"1-d tensor \(B,\), got \(2, 1\)"):
        gender_loss(torch.zeros(2, 1), torch.zeros(2))
    with pytest.raises(ValueError, match="age_logits"):
        age_loss(
            {"age": torch.zeros(2), "age_logits": torch.zeros(3, 117)}, torch.tensor([1, 2]), "dldl"
        )
    with pytest.raises(ValueError, match=r"log_vars must have shape \(2,\)"):
        multitask_loss(out, torch.tensor([1, 2]), torch.tensor([0, 1]), log_vars=torch.zeros(3))
