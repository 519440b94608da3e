"""Multi-task age and gender networks, built by name from a timm-style registry.

Every model maps a normalised float batch ``(B, C, H, W)`` (see :func:`normalize`) to a dict:

- ``"gender"``: ``(B,)`` gender logit; ``torch.sigmoid`` of it is P(female) (0 = male, 1 = female);
- ``"age"``: ``(B,)`` predicted age in years (float);
- head-specific raw outputs: ``"age_logits"`` ``(B, K)`` for ``dldl``, ``(B, K - 1)`` for
  ``coral``; ``"age_std"`` ``(B,)`` for ``dldl``.

Each model also carries:

- ``model.config``: its constructor arguments plus ``"name"``, JSON-serialisable, so that
  ``create_model(cfg["name"], **{k: v for k, v in cfg.items() if k != "name"})`` rebuilds it;
- ``model.data_config``: the input contract (size, colour, mean/std, interpolation) that
  :func:`normalize` applies to uint8 images.

>>> model = create_model("seed-cnn")
>>> count_parameters(model)
5107458
>>> sorted(model(torch.zeros(2, 1, 128, 128)))
['age', 'gender']
"""

from __future__ import annotations

import functools
import inspect
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from agegender.core.config import ModelConfig
from agegender.core.errors import ConfigError

__all__ = [
    "AGE_HEADS",
    "ResNetMT",
    "SeedCNN",
    "count_macs",
    "count_parameters",
    "create_model",
    "from_config",
    "list_models",
    "normalize",
    "register_model",
    "summary",
    "to_channels_last",
]

AGE_HEADS = ("regression", "dldl", "coral")

# Inputs are uint8 / 255 in [0, 1], then (x - 0.5) / 0.5, i.e. [-1, 1]: no dataset statistics to
# compute or ship, and gray and RGB models share one convention.
_MEAN = 0.5
_STD = 0.5

# Initial bias of the regression age output: about the UTKFace median age. With an L1 loss the
# gradient on the bias has magnitude 1 whatever the error, so starting at 0 would spend the first
# thousands of steps just walking the output up to typical ages.
_AGE_PRIOR = 30.0

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a builder under its function name with ``_`` turned into ``-``.

    ``def seed_cnn_3conv(**kwargs)`` is registered as ``"seed-cnn-3conv"``.
    """
    name = fn.__name__.replace("_", "-")
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = fn
    return fn


def list_models() -> list[str]:
    """Names of the registered models, sorted.

    >>> list_models()
    ['ensemble', 'resnet-mt', 'resnet-mt-fast', 'resnet-mt-fast-wide', 'resnet-mt-small',
     'seed-cnn', 'seed-cnn-3conv', 'seed-cnn-5conv']
    """
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model by name.

    Keyword arguments whose value is ``None`` are dropped, so an unset option (a CLI flag left
    out, a recipe key set to null) never overrides the model's default.

    Raises :class:`~agegender.core.errors.ConfigError` for an unknown name or an argument the model
    does not take.

    >>> create_model("resnet-mt-small", in_chans=3, age_head=None).data_config["color"]
    'rgb'
    """
    builder = _REGISTRY.get(name)
    if builder is None:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return builder(**{k: v for k, v in kwargs.items() if v is not None})


#: argument names older checkpoints recorded, and what they are called now
LEGACY_ARGS = {"drop": "drop_rate", "dropout": "drop_rate"}


def from_config(cfg: ModelConfig, size: int, color: str) -> nn.Module:
    """The model a recipe's ``[model]`` section describes, for ``size`` px ``color`` faces.

    Options left at their "model's default" value are not passed, so each model keeps its own;
    one it does not take (``bn`` for resnet-mt, ``age_head=dldl`` for seed-cnn) is a
    :class:`~agegender.core.errors.ConfigError` from the model itself.
    """
    return create_model(
        cfg.name,
        in_chans=1 if color == "gray" else 3,
        img_size=size,
        age_head=cfg.age_head or None,
        bn=cfg.bn or None,
        drop_rate=cfg.dropout if cfg.dropout >= 0 else None,
    )


def _create(cls: type[nn.Module], name: str, kwargs: dict[str, Any], **defaults: Any) -> nn.Module:
    """Instantiate ``cls`` with ``defaults`` overridden by ``kwargs``; record ``name`` in config."""
    params = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(kwargs) - set(params) - {"self"})
    if unknown:
        valid = ", ".join(p for p in params if p != "self")
        raise ConfigError(f"model {name!r} takes no argument {', '.join(unknown)}; valid: {valid}")
    model = cls(**{**defaults, **kwargs})
    model.config = {"name": name, **{k: v for k, v in model.config.items() if k != "name"}}
    return model


def _data_config(in_chans: int, img_size: int) -> dict[str, Any]:
    if in_chans not in (1, 3):
        raise ConfigError(f"in_chans must be 1 (gray) or 3 (RGB), got {in_chans}")
    return {
        "input_size": (in_chans, img_size, img_size),
        "color": "gray" if in_chans == 1 else "rgb",
        "mean": (_MEAN,) * in_chans,
        "std": (_STD,) * in_chans,
        "interpolation": "bilinear",
    }


def normalize(x: torch.Tensor, data_config: dict[str, Any]) -> torch.Tensor:
    """Turn a uint8 batch ``(B, C, H, W)`` into the float input a model expects.

    Computes ``(x / 255 - mean) / std`` per channel, in float32. The memory format (e.g.
    ``channels_last``) and device are kept. Resizing is the caller's job: ``H, W`` should
    already be ``data_config["input_size"][1:]``.

    >>> cfg = create_model("seed-cnn").data_config
    >>> normalize(torch.tensor([0, 255, 51], dtype=torch.uint8).reshape(1, 1, 1, 3), cfg)
    tensor([[[[-1.0000,  1.0000, -0.6000]]]])
    """
    if x.dtype != torch.uint8:
        raise ValueError(f"normalize expects a uint8 tensor, got {x.dtype}")
    chans = data_config["input_size"][0]
    if x.ndim != 4 or x.shape[1] != chans:
        raise ValueError(
            f"normalize expects (B, {chans}, H, W) for a {data_config['color']} model, "
            f"got {tuple(x.shape)}"
        )
    mean, std = tuple(data_config["mean"]), tuple(data_config["std"])
    # Folding /255 into the affine map touches each pixel once.
    if len(set(mean)) == 1 and len(set(std)) == 1:
        # Python scalars: a tensor made from host numbers is a host-to-device copy, which on
        # CUDA waits for the whole queue, and this runs at every training step
        return x.float() * (1.0 / (255.0 * std[0])) - mean[0] / std[0]
    scale, shift = _channel_affine(mean, std, x.device)
    return x.float() * scale - shift


@functools.lru_cache(maxsize=16)
def _channel_affine(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(scale, shift)`` of :func:`normalize`, made once per device."""
    m = torch.tensor(mean, dtype=torch.float64)
    s = torch.tensor(std, dtype=torch.float64)
    scale, shift = (1.0 / (255.0 * s)), m / s
    return tuple(v.float().reshape(1, -1, 1, 1).to(device) for v in (scale, shift))


# --------------------------------------------------------------------------------------------
# Seed CNN: port of the study's Keras network and its two variants
# --------------------------------------------------------------------------------------------


def _mlp(in_features: int, widths: Sequence[int], dropout: float) -> tuple[nn.Sequential, int]:
    """Dense(relu) -> Dropout per width, as the Keras model stacks them."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i, width in enumerate(widths, 1):
        layers[f"fc{i}"] = nn.Linear(in_features, width)
        layers[f"act{i}"] = nn.ReLU()
        layers[f"drop{i}"] = nn.Dropout(dropout)
        in_features = width
    return nn.Sequential(layers), in_features


def _seed_side(img_size: int, blocks: int) -> int:
    """The side of the last feature map of ``blocks`` conv blocks, or a ConfigError naming the
    smallest input that leaves it at least 1."""
    side = img_size
    for _ in range(blocks):
        side = (side - 2) // 2  # valid 3x3 conv, then floor-mode 2x2 pool
    if side < 1:
        need = 1
        for _ in range(blocks):
            need = 2 * need + 2
        raise ConfigError(
            f"img_size {img_size} is too small for {blocks} conv blocks; "
            f"the smallest that works is {need}"
        )
    return side


def _seed_features(in_chans: int, widths: list[int], bn: bool) -> nn.Sequential:
    """The study's conv blocks: valid 3x3 conv, [BatchNorm,] ReLU, 2x2 max pool."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    chans = in_chans
    for i, width in enumerate(widths, 1):
        layers[f"conv{i}"] = nn.Conv2d(chans, width, 3, bias=not bn)
        if bn:
            layers[f"bn{i}"] = nn.BatchNorm2d(width)
        layers[f"act{i}"] = nn.ReLU()
        layers[f"pool{i}"] = nn.MaxPool2d(2)
        chans = width
    return nn.Sequential(layers)


class SeedCNN(nn.Module):
    """Plain conv/max-pool stack with a gender and an age output, ported from the study's Keras.

    Per width: Conv2D 3x3 'valid' (+ BatchNorm if ``bn``) -> ReLU -> MaxPool 2x2 (floor, like
    Keras). Then Flatten, an optional shared Dense stack (``shared_dense``), and two branches
    of Dense(relu) -> Dropout (``branch_dense``) ending in Dense(1): a gender logit and an age
    followed by ReLU. Weights are Glorot-uniform with zero biases, the Keras defaults.

    Args:
        widths: filters of each conv block.
        shared_dense: Dense widths shared by both tasks, after Flatten.
        branch_dense: Dense widths of each task branch, after the shared stack.
        in_chans: 1 (gray) or 3 (RGB).
        img_size: square input side; must leave every feature map at least 1x1.
        bn: BatchNorm after each conv (not in the original; the conv bias is dropped then, as
            BatchNorm's shift replaces it).
        drop_rate: dropout rate after every hidden Dense layer.
        age_head: only ``"regression"``: the study's network regresses ages (L1).
    """

    def __init__(
        self,
        widths: Sequence[int] = (32, 64, 128, 256),
        shared_dense: Sequence[int] = (),
        branch_dense: Sequence[int] = (256,),
        in_chans: int = 1,
        img_size: int = 128,
        bn: bool = False,
        drop_rate: float = 0.4,
        age_head: str = "regression",
    ) -> None:
        super().__init__()
        widths, shared_dense, branch_dense = list(widths), list(shared_dense), list(branch_dense)
        if not widths:
            raise ConfigError("SeedCNN needs at least one conv width")
        if age_head != "regression":
            raise ConfigError(
                f"age_head {age_head!r}: the seed-cnn family regresses ages (regression only)"
            )
        self.data_config = _data_config(in_chans, img_size)
        self.config: dict[str, Any] = {
            "name": None,
            "widths": widths,
            "shared_dense": shared_dense,
            "branch_dense": branch_dense,
            "in_chans": in_chans,
            "img_size": img_size,
            "bn": bn,
            "drop_rate": drop_rate,
        }

        side = _seed_side(img_size, len(widths))
        self.features = _seed_features(in_chans, widths, bn)
        chans = widths[-1]
        # Keras flattens NHWC, we flatten NCHW: the Dense weights see the features in another
        # order. That only matters when importing Keras weights, which we never do.
        self.flatten = nn.Flatten()
        self.num_features = chans * side * side

        self.shared, shared_out = _mlp(self.num_features, shared_dense, drop_rate)
        gender, branch_out = _mlp(shared_out, branch_dense, drop_rate)
        gender.add_module("out", nn.Linear(branch_out, 1))
        age, _ = _mlp(shared_out, branch_dense, drop_rate)
        age.add_module("out", nn.Linear(branch_out, 1))
        age.add_module("out_act", nn.ReLU())  # ages are non-negative, as in the Keras model
        self.head_gender, self.head_age = gender, age
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> last feature map ``(B, widths[-1], h, w)``."""
        return self.features(x)

    def forward_head(
        self, feats: torch.Tensor, pre_logits: bool = False
    ) -> dict[str, torch.Tensor] | torch.Tensor:
        """Feature map -> output dict; with ``pre_logits`` the shared embedding ``(B, F)``."""
        z = self.shared(self.flatten(feats))
        if pre_logits:
            return z
        return {"gender": self.head_gender(z)[:, 0], "age": self.head_age(z)[:, 0]}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, C, H, W)`` normalised input -> ``{"gender": (B,), "age": (B,)}``."""
        return self.forward_head(self.forward_features(x))


# --------------------------------------------------------------------------------------------
# ResNet-MT: small residual network with a choice of age heads
# --------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_chans: int, out_chans: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, out_chans, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chans)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chans, out_chans, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chans)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_chans != out_chans:
            self.shortcut = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(in_chans, out_chans, 1, stride, bias=False),
                    bn=nn.BatchNorm2d(out_chans),
                )
            )
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return self.act2(out + shortcut)


class CoralHead(nn.Module):
    """CORAL ordinal head (Cao, Mirjalili & Raschka 2020): one shared weight, K - 1 biases.

    Sharing the weight vector makes the K - 1 binary tasks differ only by their threshold,
    which guarantees rank-consistent (non-increasing) probabilities P(age > k).
    """

    def __init__(self, in_features: int, num_ages: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, 1, bias=False)
        # Descending start as in coral-pytorch, so the initial P(age > k) already decreases in k.
        self.bias = nn.Parameter(torch.arange(num_ages - 1, 0, -1).float() / (num_ages - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.bias


#: where a face's estimated age starts to count as a child's for ``child_temperature`` (years)
CHILD_AGE = 10.0
#: how gradually: the softening is half at CHILD_AGE, 95 % at 4 years, 5 % at 16 (years)
CHILD_AGE_WIDTH = 2.0


def child_softening(gender_logit: torch.Tensor, age: torch.Tensor, temperature: float):
    """The gender logit divided by a temperature that is ``temperature`` for a face whose
    estimated age is well under :data:`CHILD_AGE` and 1 for an adult's, so that a child's
    P(female) says how often such a guess is right rather than sounding sure (a network is
    about as confident on a baby as on an adult, and right much less often).

    >>> logit, age = torch.tensor([2.0, 2.0]), torch.tensor([1.0, 40.0])
    >>> [round(v, 3) for v in child_softening(logit, age, 2.0).tolist()]
    [1.006, 2.0]
    """
    share = torch.sigmoid((CHILD_AGE - age.detach().float()) / CHILD_AGE_WIDTH)
    return gender_logit / (1 + (temperature - 1) * share)


def _check_resnet(
    img_size: int, age_head: str, widths: list[int], depths: list[int], num_ages: int, stride: int
) -> None:
    if age_head not in AGE_HEADS:
        raise ConfigError(f"unknown age_head {age_head!r}; valid: {', '.join(AGE_HEADS)}")
    if not widths or len(widths) != len(depths):
        raise ConfigError(f"widths {widths} and depths {depths} must be non-empty and match")
    if img_size < 64:
        raise ConfigError(f"img_size must be at least 64, got {img_size}")
    if num_ages < 2:
        raise ConfigError(f"num_ages must be at least 2, got {num_ages}")
    if stride not in (2, 4):
        raise ConfigError(f"stem_stride must be 2 or 4, got {stride}")


def _resnet_stem(in_chans: int, width: int, stride: int) -> nn.Sequential:
    """Stride-2 3x3 conv, BatchNorm, ReLU (twice for ``stride`` 4), ending at ``width``."""
    layers = OrderedDict(
        conv=nn.Conv2d(in_chans, width // (stride // 2), 3, 2, 1, bias=False),
        bn=nn.BatchNorm2d(width // (stride // 2)),
        act=nn.ReLU(inplace=True),
    )
    if stride == 4:  # a second stride-2 conv: the stages run at a quarter of the side
        layers.update(
            conv2=nn.Conv2d(width // 2, width, 3, 2, 1, bias=False),
            bn2=nn.BatchNorm2d(width),
            act2=nn.ReLU(inplace=True),
        )
    return nn.Sequential(layers)


def _resnet_stages(widths: list[int], depths: list[int]) -> nn.Sequential:
    """A stage of BasicBlocks per width; every stage but the first halves the side."""
    stages = []
    chans = widths[0]
    for i, (width, depth) in enumerate(zip(widths, depths, strict=True)):
        blocks = [BasicBlock(chans, width, 1 if i == 0 else 2)]
        blocks += [BasicBlock(width, width) for _ in range(depth - 1)]
        stages.append(nn.Sequential(*blocks))
        chans = width
    return nn.Sequential(*stages)


class ResNetMT(nn.Module):
    """Small ResNet (BasicBlocks, BatchNorm) with a gender logit and a selectable age head.

    Stem: 3x3 stride-2 conv (128 px -> 64 px, so the stages run at 64/32/16/8 px), or with
    ``stem_stride=4`` two of them (the stages at 32/16/8/4 px: a quarter of the multiply-adds
    while every input pixel is still seen at full resolution); then stages of BasicBlocks
    (first stage stride 1, the others stride 2), global average pooling, dropout and the heads.
    Any ``img_size >= 64`` works since the pooling is global.

    Age heads (``age_head``):

    - ``"regression"``: Linear(1); ``age`` is its output. Train with L1.
    - ``"dldl"``: Linear(K) over ages ``0..K-1``; ``age`` is the expectation of the softmax,
      ``age_std`` its standard deviation, ``age_logits`` ``(B, K)``.
    - ``"coral"``: :class:`CoralHead`; ``age_logits`` ``(B, K - 1)`` are the logits of
      P(age > k), k = 0..K-2, and ``age`` is the sum of their sigmoids (thresholds passed).

    Args:
        in_chans: 1 (gray) or 3 (RGB).
        img_size: square input side (only recorded in ``data_config``; the net adapts).
        age_head: one of :data:`AGE_HEADS`.
        widths: channels of each stage; the stem has ``widths[0]``.
        depths: BasicBlocks per stage.
        drop_rate: dropout rate before the heads.
        num_ages: K, the number of age classes ``0..K-1`` for ``dldl`` and ``coral``.
        stem_stride: 2 or 4, how much the stem shrinks the input.
        child_temperature: in eval mode, children's gender logits are divided by this (see
            :func:`child_softening`); fitted after training on faces the model never saw.
    """

    def __init__(
        self,
        in_chans: int = 1,
        img_size: int = 128,
        age_head: str = "dldl",
        widths: Sequence[int] = (32, 64, 128, 256),
        depths: Sequence[int] = (2, 2, 2, 2),
        drop_rate: float = 0.2,
        num_ages: int = 117,
        stem_stride: int = 2,
        child_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        widths, depths = list(widths), list(depths)
        _check_resnet(img_size, age_head, widths, depths, num_ages, stem_stride)
        # a checkpoint's metadata sets it: a value outside this range is not a calibration
        if not (isinstance(child_temperature, (int, float)) and 0.25 <= child_temperature <= 20):
            raise ConfigError(f"child_temperature must be in [0.25, 20], got {child_temperature!r}")
        self.child_temperature = float(child_temperature)
        self.data_config = _data_config(in_chans, img_size)
        self.config: dict[str, Any] = {
            "name": None,
            "in_chans": in_chans,
            "img_size": img_size,
            "age_head": age_head,
            "widths": widths,
            "depths": depths,
            "drop_rate": drop_rate,
            "num_ages": num_ages,
            "stem_stride": stem_stride,
            "child_temperature": float(child_temperature),
        }
        self.age_head_kind = age_head
        self.num_ages = num_ages

        self.stem = _resnet_stem(in_chans, widths[0], stem_stride)
        self.stages = _resnet_stages(widths, depths)
        chans = self.num_features = widths[-1]
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.drop = nn.Dropout(drop_rate)
        self.head_gender = nn.Linear(chans, 1)
        if age_head == "regression":
            self.head_age: nn.Module = nn.Linear(chans, 1)
        elif age_head == "dldl":
            self.head_age = nn.Linear(chans, num_ages)
        else:
            self.head_age = CoralHead(chans, num_ages)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero gamma on each block's last BN: every block starts as the identity, so the deep
        # net trains like a shallow one at first (Goyal et al. 2017).
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)
        if self.age_head_kind == "regression":
            nn.init.constant_(self.head_age.bias, _AGE_PRIOR)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> last feature map ``(B, widths[-1], H / 16, W / 16)``."""
        return self.stages(self.stem(x))

    def forward_head(
        self, feats: torch.Tensor, pre_logits: bool = False
    ) -> dict[str, torch.Tensor] | torch.Tensor:
        """Feature map -> output dict; with ``pre_logits`` the pooled embedding ``(B, F)``."""
        z = self.drop(self.flatten(self.pool(feats)))
        if pre_logits:
            return z
        out = {"gender": self.head_gender(z)[:, 0]}
        raw = self.head_age(z)
        if self.age_head_kind == "regression":
            out["age"] = raw[:, 0]
        elif self.age_head_kind == "dldl":
            # float32 so the expectation stays exact under autocast: a matmul (prob @ ages)
            # would be cast back to bf16 there, rounding ages to 1/8 - 1/2 year
            prob = raw.float().softmax(dim=-1)
            ages = torch.arange(self.num_ages, device=raw.device, dtype=prob.dtype)
            mean = (prob * ages).sum(dim=-1)
            var = (prob * ages.square()).sum(dim=-1) - mean.square()
            out.update(age=mean, age_std=var.clamp_min(1e-12).sqrt(), age_logits=raw)
        else:
            out.update(age=torch.sigmoid(raw.float()).sum(dim=-1), age_logits=raw)
        if self.child_temperature != 1.0 and not self.training:  # trained on plain logits
            out["gender"] = child_softening(out["gender"], out["age"], self.child_temperature)
        return out

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, C, H, W)`` normalised input -> output dict (see the class docstring)."""
        return self.forward_head(self.forward_features(x))


class Ensemble(nn.Module):
    """Several networks on the same faces, their outputs averaged: P(female) and the DLDL age
    distribution (so ``age`` and ``age_std`` are the mixture's). Members are rebuilt from their
    configs (``members``: each a model's ``config``, its ``name`` included), so a checkpoint of
    an ensemble rebuilds it like any other; members keep their own eval-time settings
    (``child_temperature``). All take the same faces and have ``dldl`` heads over the same ages.
    """

    def __init__(
        self,
        members: Sequence[dict[str, Any]] = (),
        in_chans: int | None = None,
        img_size: int | None = None,
        age_head: str = "dldl",
    ) -> None:
        super().__init__()
        if len(members) < 2 or not all(isinstance(m, dict) and "name" in m for m in members):
            raise ConfigError("an ensemble needs two or more member configs, each with a name")
        nets = []
        for cfg in members:
            cfg = {LEGACY_ARGS.get(k, k): v for k, v in cfg.items()}
            if cfg["name"] == "ensemble":
                raise ConfigError("an ensemble cannot hold an ensemble")
            nets.append(create_model(cfg.pop("name"), **cfg))
        first = nets[0]
        for net in nets:
            if net.data_config != first.data_config:
                raise ConfigError("ensemble members must take the same faces (size and colour)")
            if net.config.get("age_head") != "dldl" or net.num_ages != first.num_ages:
                raise ConfigError("ensemble members need dldl age heads over the same ages")
        size = first.data_config["input_size"]
        said = (in_chans or size[0], img_size or size[1], age_head)
        if said != (size[0], size[1], "dldl"):  # a checkpoint's metadata beside its members
            raise ConfigError(f"ensemble members take {size} with dldl heads, not {said}")
        self.members = nn.ModuleList(nets)
        self.data_config = first.data_config
        self.num_ages = first.num_ages
        self.age_head_kind = "dldl"
        self.config: dict[str, Any] = {
            "name": None,
            "members": [dict(net.config) for net in nets],
            "age_head": "dldl",
            "in_chans": first.data_config["input_size"][0],
            "img_size": first.data_config["input_size"][1],
        }

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised ``(B, C, H, W)`` -> the members' mean, as one model's output dict."""
        outs = [net(x) for net in self.members]
        p_female = torch.stack([torch.sigmoid(o["gender"].float()) for o in outs]).mean(0)
        probs = torch.stack([o["age_logits"].float().softmax(-1) for o in outs]).mean(0)
        ages = torch.arange(self.num_ages, device=x.device, dtype=probs.dtype)
        mean = (probs * ages).sum(-1)
        var = (probs * ages.square()).sum(-1) - mean.square()
        p = p_female.clamp(1e-7, 1 - 1e-7)
        return {
            "gender": torch.log(p) - torch.log1p(-p),
            "age": mean,
            "age_std": var.clamp_min(1e-12).sqrt(),
            "age_logits": probs.clamp_min(1e-12).log(),  # its softmax is the mean distribution
        }


# --------------------------------------------------------------------------------------------
# Registered builders
# --------------------------------------------------------------------------------------------


@register_model
def seed_cnn(**kwargs: Any) -> nn.Module:
    """The study's network: 4 convs 32/64/128/256, two Dense(256) branches; 5,107,458 params."""
    return _create(SeedCNN, "seed-cnn", kwargs, widths=(32, 64, 128, 256))


@register_model
def seed_cnn_3conv(**kwargs: Any) -> nn.Module:
    """The study's first try: 3 convs 32/64/128, shared Dense(256) -> Dense(128), two outputs."""
    return _create(
        SeedCNN,
        "seed-cnn-3conv",
        kwargs,
        widths=(32, 64, 128),
        shared_dense=(256, 128),
        branch_dense=(),
    )


@register_model
def seed_cnn_5conv(**kwargs: Any) -> nn.Module:
    """seed-cnn with a fifth conv of 512 filters (needs img_size >= 94)."""
    return _create(SeedCNN, "seed-cnn-5conv", kwargs, widths=(32, 64, 128, 256, 512))


@register_model
def resnet_mt(**kwargs: Any) -> nn.Module:
    """Default model: ResNet 32/64/128/256 x (2, 2, 2, 2), DLDL age head; about 2.8 M params."""
    return _create(ResNetMT, "resnet-mt", kwargs, widths=(32, 64, 128, 256), depths=(2, 2, 2, 2))


@register_model
def resnet_mt_fast(**kwargs: Any) -> nn.Module:
    """resnet-mt with a stride-4 stem: 143 M multiply-adds at 128 px (resnet-mt: 555 M)."""
    return _create(
        ResNetMT,
        "resnet-mt-fast",
        kwargs,
        widths=(32, 64, 128, 256),
        depths=(2, 2, 2, 2),
        stem_stride=4,
    )


@register_model
def resnet_mt_fast_wide(**kwargs: Any) -> nn.Module:
    """resnet-mt-fast at 1.5x the width, 48/96/192/384: 2.2x the multiply-adds, 6.3 M params."""
    return _create(
        ResNetMT,
        "resnet-mt-fast-wide",
        kwargs,
        widths=(48, 96, 192, 384),
        depths=(2, 2, 2, 2),
        stem_stride=4,
    )


@register_model
def ensemble(**kwargs: Any) -> nn.Module:
    """Several trained networks averaged (``members``: their configs); see :class:`Ensemble`."""
    return _create(Ensemble, "ensemble", kwargs)


@register_model
def resnet_mt_small(**kwargs: Any) -> nn.Module:
    """Narrow ResNet 16/32/64/128 x (2, 2, 2, 2) for quick CPU runs; about 0.7 M params."""
    return _create(
        ResNetMT, "resnet-mt-small", kwargs, widths=(16, 32, 64, 128), depths=(2, 2, 2, 2)
    )


# --------------------------------------------------------------------------------------------
# Inspection
# --------------------------------------------------------------------------------------------


def to_channels_last(model: nn.Module) -> nn.Module:
    """``model`` with NHWC conv weights, except those with one input channel (a gray stem).

    For those both layouts are valid and autograd hands back a contiguous gradient, which DDP
    would copy into a differently strided bucket at every step (it warns about it).
    """
    model = model.to(memory_format=torch.channels_last)
    for p in model.parameters():
        if p.ndim == 4 and p.shape[1] == 1:
            p.data = p.data.contiguous()
    return model


# --------------------------------------------------------------------------- one run


def count_macs(model: nn.Module, input_size: Sequence[int] | None = None) -> int:
    """Multiply-adds of one forward pass of one image, convolutions and linear layers.

    >>> count_macs(create_model("resnet-mt"))
    554857984
    """
    input_size = input_size or model.data_config["input_size"]
    total = 0

    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_out = module.in_channels // module.groups * module.kernel_size[0]
            total += out[0].numel() * per_out * module.kernel_size[1]
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    layers = (nn.Conv2d, nn.Linear)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, layers)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_size))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _shape(out: Any) -> str:
    if isinstance(out, torch.Tensor):
        return str((-1, *out.shape[1:]))
    if isinstance(out, (list, tuple)):
        return ", ".join(_shape(o) for o in out)
    if isinstance(out, dict):
        return ", ".join(f"{k}: {_shape(v)}" for k, v in out.items())
    return type(out).__name__


def summary(model: nn.Module | str, input_size: Sequence[int] | None = None) -> str:
    """Keras-like table of the layers a forward pass runs through, in call order.

    ``model`` is a model or a registered name (built with its defaults).

    One row per leaf module (plus any module holding parameters of its own, such as the CORAL
    biases), with its output shape in NCHW with ``-1`` for the batch, and its parameter count.
    ``input_size`` is ``(C, H, W)``, by default ``model.data_config["input_size"]``. BatchNorm
    running statistics are buffers, not parameters, so unlike Keras they are not counted.

    >>> print(summary("seed-cnn").splitlines()[-3])
    Total params: 5,107,458
    """
    if isinstance(model, str):
        model = create_model(model)
    if input_size is None:
        input_size = model.data_config["input_size"]
    rows = _trace_layers(model, input_size)
    return _table(model, rows)


def _trace_layers(model: nn.Module, input_size: Sequence[int]) -> list[tuple[str, str, str]]:
    """``(layer (type), output shape, parameters)`` of each layer one forward pass of a
    batch of 2 zeros runs through, in call order."""
    skip = (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Identity)
    rows: list[tuple[str, str, str]] = []
    seen: set[int] = set()

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: Any, out: Any) -> None:
            n = sum(p.numel() for p in module.parameters(recurse=False))
            first = id(module) not in seen
            seen.add(id(module))
            params = f"{n:,}" if first else f"{n:,} (shared)"
            rows.append((f"{name} ({type(module).__name__})", _shape(out), params))

        return record

    handles = []
    for name, module in model.named_modules():
        if not name or isinstance(module, skip):
            continue
        has_own = any(True for _ in module.parameters(recurse=False))
        if has_own or not any(True for _ in module.children()):
            handles.append(module.register_forward_hook(hook(name)))

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(2, *input_size, device=device, dtype=dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()

    return rows


def _table(model: nn.Module, rows: list[tuple[str, str, str]]) -> str:
    """Keras' layout of the rows and the parameter totals."""
    header = ("Layer (type)", "Output Shape", "Param #")
    w0 = max(len(header[0]), *(len(r[0]) for r in rows)) + 2
    w1 = max(len(header[1]), *(len(r[1]) for r in rows)) + 2
    w2 = max(len(header[2]), *(len(r[2]) for r in rows))
    width = w0 + w1 + w2
    total = count_parameters(model)
    trainable = count_parameters(model, trainable_only=True)
    name = getattr(model, "config", {}).get("name") or type(model).__name__
    lines = [f'Model: "{name}"', "_" * width, f"{header[0]:<{w0}}{header[1]:<{w1}}{header[2]}"]
    lines.append("=" * width)
    lines += [f"{a:<{w0}}{b:<{w1}}{c}" for a, b, c in rows]
    lines.append("=" * width)
    lines += [
        f"Total params: {total:,}",
        f"Trainable params: {trainable:,}",
        f"Non-trainable params: {total - trainable:,}",
    ]
    return "\n".join(lines)
