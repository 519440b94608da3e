"""Batch augmentation on the training device: one affine warp and one colour pass per batch.

Random rotation, flip, zoom and shift are one ``grid_sample`` call for the whole batch, and
brightness/contrast one pass over its pixels, so augmenting never waits on a Python loop or a
data loader, on a CPU or a GPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from agegender.core.config import AugConfig

#: uniform numbers drawn per image: angle, zoom, flip, dx, dy, contrast, brightness
DRAWS = 7


def augment(
    x: torch.Tensor,
    aug: AugConfig,
    gen: torch.Generator | None = None,
    draws: torch.Tensor | None = None,
) -> torch.Tensor:
    """Random rotation, flip, zoom, shift (one affine warp) and brightness/contrast, per image.

    ``x``: normalised float ``(B, C, H, W)`` in [-1, 1] on any device; the whole batch is
    warped by one ``grid_sample`` call instead of image by image in Python. The randomness is
    ``draws``, ``(B, DRAWS)`` uniform in [0, 1), drawn here from ``gen`` when not given.
    """
    b = x.shape[0]
    if draws is None:
        # One draw for every parameter of every image: on a GPU each op here is a kernel
        # launch, and small batches are bound by launches, not arithmetic
        draws = torch.rand(b, DRAWS, device=x.device, generator=gen)
    r = draws * 2 - 1  # uniform in [-1, 1]
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
    return torch.addcmul(offset, x, contrast).clamp_(-1, 1)
