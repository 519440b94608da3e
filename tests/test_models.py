"""Model registry, shapes, gradients, parameter counts, rebuild from config, summary."""

from __future__ import annotations

import json

import pytest
import torch

from agegender.core.errors import ConfigError
from agegender.training.models import (
    AGE_HEADS,
    count_parameters,
    create_model,
    list_models,
    normalize,
    summary,
)

torch.set_num_threads(1)

SEED_CNN_PARAMS = 5_107_458


def _size(name: str) -> int:
    # seed-cnn-5conv needs >= 94 px; everything else is exercised at 64 px to stay fast.
    return 128 if name == "seed-cnn-5conv" else 64


def _first_conv(model: torch.nn.Module) -> torch.nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def _cases() -> list[tuple[str, str | None]]:
    cases: list[tuple[str, str | None]] = []
    for name in list_models():
        if name == "ensemble":  # built from trained members: test_ensemble_averages_its_members
            continue
        heads = AGE_HEADS if name.startswith("resnet-mt") else (None,)
        cases += [(name, head) for head in heads]
    return cases


@pytest.mark.parametrize(("name", "head"), _cases())
def test_forward_backward(name: str, head: str | None) -> None:
    torch.manual_seed(0)
    size = _size(name)
    model = create_model(name, img_size=size, age_head=head)
    out = model(torch.randn(2, 1, size, size))

    assert out["gender"].shape == (2,)
    assert out["age"].shape == (2,)
    assert out["age"].dtype == torch.float32
    if head == "dldl":
        assert out["age_logits"].shape == (2, 117)
        assert out["age_std"].shape == (2,)
        assert bool((out["age_std"] > 0).all())
        assert bool(((out["age"] >= 0) & (out["age"] <= 116)).all())
    elif head == "coral":
        assert out["age_logits"].shape == (2, 116)
        assert bool(((out["age"] >= 0) & (out["age"] <= 116)).all())
    for value in out.values():
        assert torch.isfinite(value).all()

    (out["gender"].sum() + out["age"].sum()).backward()
    grad = _first_conv(model).weight.grad
    assert grad is not None
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0


def test_seed_cnn_parameter_count_and_summary() -> None:
    model = create_model("seed-cnn")
    assert count_parameters(model) == SEED_CNN_PARAMS
    assert count_parameters(model, trainable_only=True) == SEED_CNN_PARAMS
    text = summary(model, (1, 128, 128))
    lines = text.splitlines()
    assert "Total params: 5,107,458" in lines
    assert lines[-3:] == [
        "Total params: 5,107,458",
        "Trainable params: 5,107,458",
        "Non-trainable params: 0",
    ]
    assert "(-1, 32, 126, 126)" in text
    assert "(-1, 9216)" in text


def test_seed_cnn_bn_option() -> None:
    model = create_model("seed-cnn", bn=True, img_size=64)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 4
    assert model(torch.randn(2, 1, 64, 64))["age"].shape == (2,)


def test_seed_cnn_too_small_image() -> None:
    with pytest.raises(ConfigError, match="smallest that works is 94"):
        create_model("seed-cnn-5conv", img_size=64)


def test_resnet_parameter_counts() -> None:
    for head in AGE_HEADS:
        n = count_parameters(create_model("resnet-mt", age_head=head))
        assert 2_500_000 <= n <= 3_500_000, (head, n)
    small = count_parameters(create_model("resnet-mt-small"))
    assert 500_000 <= small <= 900_000


def test_resnet_summary_counts_coral_biases() -> None:
    model = create_model("resnet-mt-small", age_head="coral")
    text = summary(model, (1, 64, 64))
    assert f"Total params: {count_parameters(model):,}" in text
    assert "(CoralHead)" in text


@pytest.mark.parametrize("size", [64, 160])
def test_resnet_image_sizes(size: int) -> None:
    model = create_model("resnet-mt-small", img_size=size)
    assert model.data_config["input_size"] == (1, size, size)
    assert model(torch.randn(2, 1, size, size))["age"].shape == (2,)


def test_resnet_rejects_small_image_and_bad_head() -> None:
    with pytest.raises(ConfigError, match="at least 64"):
        create_model("resnet-mt", img_size=32)
    with pytest.raises(ConfigError, match="regression, dldl, coral"):
        create_model("resnet-mt", age_head="softmax")


@pytest.mark.parametrize("name", ["seed-cnn", "resnet-mt-small"])
def test_rgb(name: str) -> None:
    model = create_model(name, in_chans=3, img_size=64)
    assert model.data_config["color"] == "rgb"
    assert model.data_config["mean"] == (0.5, 0.5, 0.5)
    assert _first_conv(model).in_channels == 3
    assert model(torch.randn(2, 3, 64, 64))["gender"].shape == (2,)


def test_bad_in_chans() -> None:
    with pytest.raises(ConfigError, match="in_chans"):
        create_model("seed-cnn", in_chans=2)


def test_channels_last() -> None:
    torch.manual_seed(0)
    model = create_model("resnet-mt-small", img_size=64).eval()
    x = torch.randn(2, 1, 64, 64)
    ref = model(x)
    model = model.to(memory_format=torch.channels_last)
    out = model(x.to(memory_format=torch.channels_last))
    for key in ref:
        assert torch.allclose(ref[key], out[key], atol=1e-4), key
    out["age"].sum().backward()


def test_unknown_model() -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'vgg'; known models: .*seed-cnn"):
        create_model("vgg")


def test_unknown_argument() -> None:
    with pytest.raises(ConfigError, match="age_head"):
        create_model("seed-cnn", age_head="dldl")


def test_none_kwargs_are_dropped() -> None:
    model = create_model("resnet-mt", age_head=None, in_chans=None, drop=None)
    assert model.config["age_head"] == "dldl"
    assert model.config["in_chans"] == 1
    assert model.config["drop_rate"] == 0.2


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("seed-cnn", {}),
        ("seed-cnn-3conv", {"in_chans": 3}),
        ("seed-cnn-5conv", {"bn": True}),
        ("resnet-mt", {"age_head": "coral", "img_size": 96}),
        ("resnet-mt-small", {"age_head": "regression", "num_ages": 101}),
    ],
)
def test_rebuild_from_config(name: str, kwargs: dict) -> None:
    model = create_model(name, **kwargs)
    # Through JSON, as a checkpoint stores it: tuples come back as lists.
    cfg = json.loads(json.dumps(model.config))
    assert cfg == model.config
    assert cfg["name"] == name
    rebuilt = create_model(cfg["name"], **{k: v for k, v in cfg.items() if k != "name"})
    assert rebuilt.config == model.config
    assert rebuilt.data_config == model.data_config
    assert count_parameters(rebuilt) == count_parameters(model)
    ref = model.state_dict()
    new = rebuilt.state_dict()
    assert list(new) == list(ref)
    assert all(new[k].shape == ref[k].shape for k in ref)
    rebuilt.load_state_dict(ref)


def test_normalize() -> None:
    cfg = create_model("resnet-mt-small", in_chans=3).data_config
    x = torch.tensor([0, 255, 51], dtype=torch.uint8).reshape(1, 3, 1, 1).expand(2, 3, 2, 2)
    y = normalize(x, cfg)
    assert y.dtype == torch.float32
    assert torch.allclose(y[0, :, 0, 0], torch.tensor([-1.0, 1.0, -0.6]))
    x_cl = torch.zeros(2, 3, 4, 4, dtype=torch.uint8).to(memory_format=torch.channels_last)
    assert normalize(x_cl, cfg).is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="uint8"):
        normalize(x.float(), cfg)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        normalize(x[:, :1], cfg)


def test_child_temperature_softens_childrens_gender_in_eval_only_and_travels_with_the_weights(
    tmp_path,
):
    from agegender.core.errors import DataError
    from agegender.training.checkpoint import load_checkpoint, save_checkpoint
    from agegender.training.models import child_softening

    torch.manual_seed(0)
    plain = create_model("resnet-mt-small", img_size=64, age_head="dldl").eval()
    calibrated = create_model(
        "resnet-mt-small", img_size=64, age_head="dldl", child_temperature=3.0
    )
    calibrated.load_state_dict(plain.state_dict())
    calibrated.eval()
    x = torch.randn(8, 1, 64, 64)
    a, b = plain(x), calibrated(x)
    torch.testing.assert_close(b["age"], a["age"])  # ages untouched
    torch.testing.assert_close(b["gender"], child_softening(a["gender"], a["age"], 3.0))
    assert torch.equal(torch.sign(b["gender"]), torch.sign(a["gender"]))  # no gender flips
    calibrated.train(), plain.train()  # training sees the plain logits
    torch.manual_seed(1)
    ta = plain(x)["gender"]
    torch.manual_seed(1)
    torch.testing.assert_close(calibrated(x)["gender"], ta)

    path = save_checkpoint(tmp_path / "c.safetensors", calibrated.eval(), {"epoch": 1})
    loaded, meta = load_checkpoint(path)
    assert loaded.child_temperature == 3.0 and meta["model"]["child_temperature"] == 3.0
    # fine-tuning starts from the weights, not from a calibration fitted to them
    from pathlib import Path

    from agegender.core.config import load_config
    from agegender.training.dataset import build_model

    smoke = Path(__file__).parents[1] / "configs" / "smoke.toml"
    tuned = build_model(load_config(smoke, [f"model.init={path}"]), torch.device("cpu"))
    assert tuned.child_temperature == 1.0 and tuned.config["child_temperature"] == 1.0
    # a sidecar that claims a temperature no calibration gives is refused
    sidecar = path.with_suffix(".json")
    bad = json.loads(sidecar.read_text())
    bad["model"]["child_temperature"] = 1e9
    sidecar.write_text(json.dumps(bad))
    with pytest.raises((ConfigError, DataError), match="child_temperature"):
        load_checkpoint(path)


def test_ensemble_averages_its_members_and_rebuilds_from_its_checkpoint(tmp_path):
    from agegender.training.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    a = create_model("resnet-mt-small", img_size=64)
    b = create_model("resnet-mt-small", img_size=64, child_temperature=2.0)
    ens = create_model("ensemble", members=[a.config, b.config])
    ens.members[0].load_state_dict(a.state_dict())
    ens.members[1].load_state_dict(b.state_dict())
    a.eval(), b.eval(), ens.eval()
    x = torch.randn(4, 1, 64, 64)
    oa, ob, oe = a(x), b(x), ens(x)
    p = (torch.sigmoid(oa["gender"]) + torch.sigmoid(ob["gender"])) / 2  # b's softened by b
    torch.testing.assert_close(torch.sigmoid(oe["gender"]), p)
    probs = (oa["age_logits"].softmax(-1) + ob["age_logits"].softmax(-1)) / 2
    torch.testing.assert_close(oe["age_logits"].softmax(-1), probs)
    torch.testing.assert_close(oe["age"], (probs * torch.arange(117.0)).sum(-1))
    assert ens.config["members"][1]["child_temperature"] == 2.0

    path = save_checkpoint(tmp_path / "ens.safetensors", ens, {"epoch": 0})
    again, meta = load_checkpoint(path)
    assert meta["model"]["name"] == "ensemble" and len(again.members) == 2
    torch.testing.assert_close(again(x)["age"], oe["age"])

    for members, says in [
        ([a.config], "two or more"),
        ([a.config, create_model("resnet-mt-small", img_size=96).config], "same faces"),
        ([a.config, create_model("resnet-mt-small", img_size=64, age_head="coral").config],
         "dldl"),
        ([a.config, {"name": "ensemble", "members": [a.config, a.config]}], "an ensemble"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError, match=says):
            create_model("ensemble", members=members)
