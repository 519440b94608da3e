"""Training recipes: frozen dataclasses, loaded from TOML and overridden by ``key=value``.

Every key has a default and a comment. An unknown key, or a value of the wrong type, is an
error that lists the valid keys.

>>> cfg = load_config(None, ["train.epochs=3", "model.name=seed-cnn"])
>>> cfg.train.epochs, cfg.model.name
(3, 'seed-cnn')
>>> load_config(None, ["train.epoch=3"])
Traceback (most recent call last):
agegender.core.errors.ConfigError: unknown key 'train.epoch' (did you mean train.epochs?); ...
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from agegender.core.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


#: the seed of prepare's train/val/test split: the bundled models were trained on its split
SPLIT_SEED = 1
MAX_EPOCHS = 100_000  #: far beyond any recipe, short of running forever


@dataclass(frozen=True)
class DataConfig:
    cache: str = ""  # a cache written by `agegender prepare` (or where data.root is prepared to)
    root: str = ""  # image folder(s), comma-separated, prepared on the fly into data.cache
    size: int = 128  # image side in pixels (when preparing from data.root)
    color: str = "gray"  # gray | rgb (when preparing from data.root)
    split_seed: int = SPLIT_SEED  # seed of the train/val/test split (when preparing data.root)
    limit: int = 0  # use at most N training images (0 = all)
    train_splits: str = "train"  # splits to train on: "train", or "train,val" for a final model
    # none | race | race_age: draw training images so that smaller groups are seen more often
    balance: str = "none"
    balance_power: float = 0.5  # weight per image = group size ** -power (1: every group alike)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet-mt"  # a registered model (agegender.training.models.list_models())
    age_head: str = ""  # regression | dldl | coral; "" = the model's default
    bn: bool = False  # batch norm after each conv (seed-cnn family only)
    dropout: float = -1.0  # dropout rate; < 0 = the model's default
    # start from these weights (default, accurate, a run folder or a checkpoint): fine-tuning.
    # The model is then the one they belong to, whatever name, age_head and dropout say
    init: str = ""


@dataclass(frozen=True)
class LossConfig:
    w_age: float = 1.0  # weight of the age loss
    w_gender: float = 1.0  # weight of the gender loss (equal weights: the study's best)
    uncertainty: bool = False  # learn the task weights (Kendall et al. 2018) instead
    sigma: float = 2.0  # std (years) of the Gaussian label distribution of the dldl head
    # gender targets 1 - s/2 and s/2 instead of 1 and 0: a wrong label (UTKFace has them)
    # costs a bounded loss, and the model is not pushed to certainty
    gender_smoothing: float = 0.0


@dataclass(frozen=True)
class DistillConfig:
    # a model to learn from as well (accurate, a run folder, a checkpoint); several,
    # comma-separated, are an ensemble whose outputs are averaged
    teacher: str = ""
    weight: float = 0.5  # share of the loss from the teacher's outputs (the rest: the labels)
    tta: bool = True  # the teacher's outputs averaged with the mirrored face's


@dataclass(frozen=True)
class AugConfig:
    rotate: float = 15.0  # max rotation, degrees
    flip: bool = True  # random horizontal flip
    brightness: float = 0.2  # max brightness change, fraction of the range
    contrast: float = 0.2  # max contrast change, fraction
    scale: float = 0.1  # max zoom in/out, fraction
    shift: float = 0.05  # max translation, fraction of the side
    erase: float = 0.0  # share of faces given one mid-grey rectangle (random erasing)
    mixup: float = 0.0  # share of batches blended with themselves shifted by one face (mixup)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 40  # passes over the training set
    batch_size: int = 64  # images per step, over all processes under torchrun (each takes 1/N)
    lr: float = 2e-3  # (peak) learning rate
    optimizer: str = "adamw"  # sgd | rmsprop | adam | adamw
    momentum: float = 0.9  # for sgd and rmsprop
    weight_decay: float = 0.05  # decoupled for adamw, L2 for the others
    scheduler: str = "onecycle"  # none | plateau | onecycle | cosine
    plateau_factor: float = 0.5  # plateau: multiply the lr by this ...
    plateau_patience: int = 3  # ... after this many epochs without val-loss improvement
    warmup: float = 0.15  # onecycle: fraction of steps spent warming up
    early_stopping: int = 0  # stop after N epochs without val-loss improvement (0 = off)
    augment: bool = True  # batch augmentation on the device (see [aug])
    tta: bool = True  # evaluate with horizontal-flip test-time augmentation
    seed: int = 0  # seed of initialisation, shuffling and augmentation
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    amp: str = "auto"  # auto | bf16 | off: bf16 autocast (auto: on where it is fast)
    channels_last: bool = True  # NHWC memory layout (faster convs on GPUs and AMX CPUs)
    compile: bool = False  # torch.compile the model
    # default | reduce-overhead (CUDA graphs for small batches on a GPU) | max-autotune |
    # max-autotune-no-cudagraphs
    compile_mode: str = "default"
    # capture each step's forward and backward as CUDA graphs (one GPU, no compile)
    cuda_graphs: bool = False
    threads: int = 0  # torch CPU threads per process (0 = the cores / processes per machine)
    grad_clip: float = 0.0  # clip the gradient norm (0 = off)
    # parameters left as they are, by name prefix, comma-separated: "stem", "stem,stages.0"
    # (fine-tuning a small set: the early layers' general features stay put)
    freeze: str = ""
    eval_batch_size: int = 256  # images per step and process when evaluating


@dataclass(frozen=True)
class RunConfig:
    out: str = ""  # run folder; "" = runs/train/<name>, numbered if it exists
    name: str = "exp"  # run name used for the default folder


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)


CHOICES = {
    "data.color": ("gray", "rgb"),
    "data.balance": ("none", "race", "race_age"),
    "model.age_head": ("", "regression", "dldl", "coral"),
    "train.optimizer": ("sgd", "rmsprop", "adam", "adamw"),
    "train.scheduler": ("none", "plateau", "onecycle", "cosine"),
    "train.amp": ("auto", "bf16", "off"),
    # torch.compile's modes; reduce-overhead replays each step as CUDA graphs, which removes the
    # per-kernel launch cost that bounds small batches on a GPU (on the CPU it compiles as default)
    "train.compile_mode": (
        "default",
        "reduce-overhead",
        "max-autotune",
        "max-autotune-no-cudagraphs",
    ),
}


def valid_keys(cfg: Config | None = None) -> list[str]:
    """Every ``section.key`` a recipe or an override may set."""
    cfg = cfg or Config()
    return [f"{s.name}.{f.name}" for s in fields(cfg) for f in fields(getattr(cfg, s.name))]


def _coerce(key: str, value: Any, default: Any) -> Any:
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not kind:
        raise ConfigError(f"{key} must be {kind.__name__}, got {value!r} ({type(value).__name__})")
    if kind is float and not math.isfinite(value):  # nan trains to NaN, inf never ends
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    choices = CHOICES.get(key)
    if choices and value not in choices:
        shown = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"{key} must be one of {shown}, got {value!r}")
    return value


def _parse_value(text: str) -> Any:
    """TOML syntax for a value (``3``, ``1e-3``, ``true``, ``"x"``); a bare word is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _unknown(key: str, section: str | None) -> ConfigError:
    keys = valid_keys()
    near = difflib.get_close_matches(key, keys, n=1)
    hint = f" (did you mean {near[0]}?)" if near else ""
    if section:
        listed = [k for k in keys if k.startswith(section + ".")]
        where = f"valid keys in [{section}]"
    else:
        listed, where = keys, "valid keys"
    return ConfigError(f"unknown key {key!r}{hint}; {where}: {', '.join(listed)}")


def apply(cfg: Config, updates: dict[str, Any]) -> Config:
    """A copy of ``cfg`` with ``{"section.key": value}`` applied and type-checked."""
    sections: dict[str, dict[str, Any]] = {}
    for key, value in updates.items():
        section, _, name = key.partition(".")
        if not hasattr(cfg, section) or not dataclasses.is_dataclass(getattr(cfg, section)):
            raise _unknown(key, None)
        sub = getattr(cfg, section)
        if name not in {f.name for f in fields(sub)}:
            raise _unknown(key, section)
        sections.setdefault(section, {})[name] = _coerce(key, value, getattr(sub, name))
    return dataclasses.replace(
        cfg, **{s: dataclasses.replace(getattr(cfg, s), **kv) for s, kv in sections.items()}
    )


def _flatten(table: dict[str, Any], source: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, values in table.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: {section!r} must be a [section]; got a value")
        for name, value in values.items():
            flat[f"{section}.{name}"] = value
    return flat


def read_toml(path: str | os.PathLike, what: str = "recipe") -> dict[str, Any]:
    """A TOML file as a dict; a missing file or bad syntax is a :class:`ConfigError`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"no such {what}: {path}")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:  # an image or a UTF-16 file given as the recipe
        raise ConfigError(f"{path}: not a TOML {what} (TOML is UTF-8 text)") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Config:
    """Defaults <- the TOML recipe at ``path`` <- ``key=value`` overrides."""
    cfg = Config()
    if path is not None:
        cfg = apply(cfg, _flatten(read_toml(path), str(path)))
    updates = {}
    for item in overrides or []:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        updates[key.strip()] = _parse_value(text.strip())
    return apply(cfg, updates)


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (what a run folder's ``config.toml`` holds)."""
    lines = []
    for s in fields(cfg):
        lines.append(f"[{s.name}]")
        for f in fields(getattr(cfg, s.name)):
            v = getattr(getattr(cfg, s.name), f.name)
            if isinstance(v, bool):
                text = "true" if v else "false"
            elif isinstance(v, str):
                text = '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
            else:
                text = repr(v)
            lines.append(f"{f.name} = {text}")
        lines.append("")
    return "\n".join(lines)


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def check_config(cfg: Config, models: list[str] | None = None) -> None:
    """Raise a :class:`ConfigError` for values no run can use, before anything is written.

    ``models``: the registered model names ``model.name`` must be one of (the caller passes
    :func:`agegender.training.models.list_models`, which this torch-free module cannot import).
    """
    t, d, m, loss, aug = cfg.train, cfg.data, cfg.model, cfg.loss, cfg.aug
    bad = [
        (not 1 <= t.epochs <= MAX_EPOCHS, f"train.epochs must be 1-{MAX_EPOCHS:,}"),
        (not 1 <= t.batch_size <= 65536, "train.batch_size must be 1-65536"),
        (not 1 <= t.eval_batch_size <= 65536, "train.eval_batch_size must be 1-65536"),
        (not 0 < t.lr <= 10, "train.lr must be in (0, 10]"),
        (not 0 <= t.momentum < 1, "train.momentum must be in [0, 1)"),
        (not 0 < t.plateau_factor < 1, "train.plateau_factor must be in (0, 1)"),
        (t.plateau_patience < 0, "train.plateau_patience must be >= 0"),
        (not 0 <= t.threads <= 1024, "train.threads must be 0-1024 (0 = all cores)"),
        (t.seed < 0, "train.seed must be >= 0"),
        (t.grad_clip < 0, "train.grad_clip must be >= 0 (0 = off)"),
        (t.early_stopping < 0, "train.early_stopping must be >= 0 (0 = off)"),
        (not 0 <= t.warmup < 1, "train.warmup must be in [0, 1)"),
        (t.weight_decay < 0, "train.weight_decay must be >= 0"),
        (not 16 <= d.size <= 1024, "data.size must be 16-1024 pixels (as prepare --size)"),
        (d.limit < 0, "data.limit must be >= 0 (0 = all)"),
        (d.split_seed < 0, "data.split_seed must be >= 0"),
        (not 0 <= d.balance_power <= 1, "data.balance_power must be in [0, 1]"),
        (m.dropout >= 1, "model.dropout must be below 1 (< 0 = the model's default)"),
        (not 0 <= cfg.distill.weight <= 1, "distill.weight must be in [0, 1]"),
        (loss.w_age < 0 or loss.w_gender < 0, "loss.w_age and loss.w_gender must be >= 0"),
        (loss.w_age == loss.w_gender == 0, "loss.w_age and loss.w_gender cannot both be 0"),
        (not 0 < loss.sigma <= 50, "loss.sigma must be in (0, 50] years"),
        (not 0 <= loss.gender_smoothing < 1, "loss.gender_smoothing must be in [0, 1)"),
        (not 0 <= aug.rotate <= 180, "aug.rotate must be 0-180 degrees"),
        *(
            (not 0 <= getattr(aug, k) < 1, f"aug.{k} must be in [0, 1)")
            for k in ("brightness", "contrast", "scale", "shift")
        ),
        *(
            (not 0 <= getattr(aug, k) <= 1, f"aug.{k} must be in [0, 1]")
            for k in ("erase", "mixup")
        ),
        (models is not None and m.name not in models, f"unknown model.name {m.name!r}; "
         f"registered: {', '.join(models or [])}"),
    ]  # fmt: skip
    problems = [says for wrong, says in bad if wrong]
    if problems:
        raise ConfigError("; ".join(problems))
