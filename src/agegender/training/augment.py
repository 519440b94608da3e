"""Batch augmentation on the training device: one affine warp and one colour pass per batch.

Random rotation, flip, zoom and shift are one ``grid_sample`` call for the whole batch, and
brightness/contrast one pass over its pixels, so augmenting never waits on a Python loop or a
data loader, on a CPU or a GPU. Random erasing (``aug.erase``) is one mask over the batch, and
mixup (``aug.mixup``) blends the batch with itself shifted by one image.

Every random number comes from one ``draws`` tensor made by the caller, so a step stays one
tensors-in, tensors-out module (what CUDA graphs capture).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from agegender.core.config import AugConfig

#: uniform numbers drawn per image: angle, zoom, flip, dx, dy, contrast, brightness
DRAWS = 7
#: ... then, with ``aug.erase``: whether, area, aspect, centre x, centre y
ERASE_DRAWS = 5
#: ... then, with ``aug.mixup``: whether (the batch's first row decides), blend weight
MIXUP_DRAWS = 2
#: erased rectangles cover 2-20 % of the face, width/height between 1/3 and 3 (Zhong et al.)
ERASE_AREA = (0.02, 0.2)
ERASE_ASPECT = 3.0


def draw_count(aug: AugConfig) -> int:
    """Uniform numbers per image a step of this recipe takes (the columns of ``draws``)."""
    return DRAWS + (ERASE_DRAWS if aug.erase > 0 else 0) + (MIXUP_DRAWS if aug.mixup > 0 else 0)


def augment(
    x: torch.Tensor,
    aug: AugConfig,
    gen: torch.Generator | None = None,
    draws: torch.Tensor | None = None,
) -> torch.Tensor:
    """Random rotation, flip, zoom, shift (one affine warp) and brightness/contrast, per image.

    ``x``: normalised float ``(B, C, H, W)`` in [-1, 1] on any device; the whole batch is
    warped by one ``grid_sample`` call instead of image by image in Python. The randomness is
    ``draws``, ``(B, draw_count(aug))`` uniform in [0, 1), drawn here from ``gen`` when not
    given.
    """
    b = x.shape[0]
    if draws is None:
        # One draw for every parameter of every image: on a GPU each op here is a kernel
        # launch, and small batches are bound by launches, not arithmetic
        draws = torch.rand(b, draw_count(aug), device=x.device, generator=gen)
    r = draws[:, :DRAWS] * 2 - 1  # uniform in [-1, 1]
    angle, zoom, flip, dx, dy, contrast, brightness = r.unbind(1)
    angle = angle * math.radians(aug.rotate)
    zoom = 1 + zoom * aug.scale
    flip = torch.where(flip < 0, -1.0, 1.0) if aug.flip else torch.ones_like(flip)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # affine_grid maps output to input coordinates in [-1, 1]; a shift of f of the side is 2f
    shift = 2 * aug.shift
    theta = torch.stack([cos * flip, -sin, dx * shift, sin * flip, cos, dy * shift], 1)
    grid = F.affine_grid(theta.view(b, 2, 3).to(x.dtype), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    # (x - mean) * contrast + mean + brightness, as one pass over the pixels
    contrast = (1 + contrast * aug.contrast).view(b, 1, 1, 1)
    brightness = (brightness * (aug.brightness * 2)).view(b, 1, 1, 1)  # [-1, 1] is 2 wide
    offset = x.mean(dim=(1, 2, 3), keepdim=True) * (1 - contrast) + brightness
    x = torch.addcmul(offset, x, contrast).clamp_(-1, 1)
    if aug.erase > 0:
        x = erase(x, aug.erase, draws[:, DRAWS : DRAWS + ERASE_DRAWS])
    return x


def erase(x: torch.Tensor, p: float, draws: torch.Tensor) -> torch.Tensor:
    """Random erasing (Zhong et al. 2020): with probability ``p`` an image gets one rectangle
    of mid grey (0 in [-1, 1]), so the model cannot lean on any one part of a face (an eye, a
    beard, glasses) that an occluder or a bad crop can take away. ``draws``: ``(B, 5)``.

    >>> x = torch.ones(2, 1, 8, 8)
    >>> y = erase(x, 0.5, torch.tensor([[0.0, 1.0, 0.5, 0.5, 0.5], [0.9, 1.0, 0.5, 0.5, 0.5]]))
    >>> int((y[0] == 0).sum()), int((y[1] == 0).sum())  # 20 % of 64 px, in whole pixels: 4x4
    (16, 0)
    """
    h, w = x.shape[-2:]
    apply, area, aspect, cx, cy = draws.unbind(1)
    area = ERASE_AREA[0] + area * (ERASE_AREA[1] - ERASE_AREA[0])
    aspect = torch.exp((aspect * 2 - 1) * math.log(ERASE_ASPECT))  # log-uniform
    half_w = (area * aspect).sqrt().clamp(max=1) / 2
    half_h = (area / aspect).sqrt().clamp(max=1) / 2
    # pixel centres in [0, 1]
    ys = (torch.arange(h, device=x.device, dtype=x.dtype) + 0.5) / h
    xs = (torch.arange(w, device=x.device, dtype=x.dtype) + 0.5) / w
    inside_y = (ys[None, :] - cy[:, None]).abs() < half_h[:, None]
    inside_x = (xs[None, :] - cx[:, None]).abs() < half_w[:, None]
    mask = inside_y[:, :, None] & inside_x[:, None, :] & (apply < p)[:, None, None]
    return x.masked_fill(mask[:, None], 0.0)


def mixup(
    x: torch.Tensor, aug: AugConfig, draws: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al. 2018) over the batch: with probability ``aug.mixup`` the whole batch
    becomes ``lam * x + (1 - lam) * x.roll(1)`` (the batch is shuffled, so its neighbour is a
    random face). Returns the images and ``lam``, a 0-dim tensor (1 when not mixed): the loss
    is then ``lam * L(labels) + (1 - lam) * L(labels.roll(1))``.

    ``lam`` is ``max(u, 1 - u)`` with ``u = sin(pi v / 2) ** 2``, which is Beta(1/2, 1/2)
    distributed for uniform ``v`` (mixup's usual alpha is 0.2-1): computed from ``draws`` so
    that nothing is drawn inside the step. The larger share goes to the first image, so the
    batch's own labels stay the main ones.

    >>> x = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
    >>> y, lam = mixup(x, AugConfig(mixup=1.0), torch.tensor([[0.0, 0.5], [0.9, 0.1]]))
    >>> round(lam.item(), 3), round(y[0, 0, 0, 0].item(), 3)  # 0.5 of image 0, 0.5 of image 1
    (0.5, 0.5)
    """
    whether, v = draws[0, -MIXUP_DRAWS], draws[0, -MIXUP_DRAWS + 1]
    u = torch.sin(v * (math.pi / 2)).square()
    lam = torch.where(whether < aug.mixup, torch.maximum(u, 1 - u), torch.ones_like(u))
    lam = lam.to(x.dtype)
    return lam * x + (1 - lam) * x.roll(1, dims=0), lam
