"""One training step's forward: normalise, augment, run the model, score it.

:class:`TrainForward` is one module with tensors in and out, so that ``train.cuda_graphs`` can
capture all of it, and its backward, as CUDA graphs (:func:`graph_train_forward`).
"""

from __future__ import annotations

import torch
from torch import nn

from agegender.augment import augment
from agegender.checkpoint import unwrap
from agegender.config import Config
from agegender.losses import UncertaintyWeights, multitask_loss
from agegender.models import normalize


class TrainForward(nn.Module):
    """What a training step computes before ``backward``: a uint8 batch is normalised,
    augmented (with ``draws``, see :func:`agegender.augment.augment`; ignored when
    ``train.augment`` is off), put through the model (bf16 autocast when ``amp``) and scored by
    the recipe's loss.

    ``forward(x, draws, age, gender)`` returns ``(loss, mae, correct)``: the loss to
    backpropagate, the batch's mean absolute age error and its number of right genders.
    One module with tensors in and out, so that ``train.cuda_graphs`` can capture the whole of
    it, and its backward, as CUDA graphs (see :func:`graph_train_forward`).
    """

    def __init__(
        self, cfg: Config, model: nn.Module, weights: UncertaintyWeights | None, amp: bool
    ) -> None:
        super().__init__()
        self.cfg, self.model, self.weights, self.amp = cfg, model, weights, amp
        plain = unwrap(model)
        self.head = plain.config.get("age_head", "regression")
        self.data_config = plain.data_config

    def forward(
        self, x: torch.Tensor, draws: torch.Tensor, age: torch.Tensor, gender: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = self.cfg.train
        x = normalize(x, self.data_config)
        if t.augment:
            x = augment(x, self.cfg.aug, draws=draws)
        if t.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # no cast cache: CUDA graph capture needs it off, and each weight is cast once anyway
        with torch.autocast(x.device.type, torch.bfloat16, enabled=self.amp, cache_enabled=False):
            out = self.model(x)
        losses = recipe_loss(self.cfg, self.head, out, age, gender, self.weights)
        correct = ((out["gender"].detach().float() > 0) == (gender > 0.5)).float().sum()
        return losses["loss"], losses["mae"], correct


def graph_train_forward(forward: TrainForward, sample: tuple[torch.Tensor, ...]) -> nn.Module:
    """``forward`` with its forward and backward passes captured as CUDA graphs and replayed
    at each call (``torch.cuda.make_graphed_callables``): a step then launches a few kernels
    instead of hundreds, which is what bounds small batches on a GPU. No compilation.

    ``sample``: ``(x, draws, age, gender)`` of the shape every call will have (the recipe's
    batch). Capturing runs a few warm-up steps; the BatchNorm statistics they move are put
    back. The graphs serve training mode only; in eval mode the module runs as usual.
    """
    # Each call copies its inputs into these tensors, which the graphs read: copies, never
    # views of the training set, or every step would overwrite its first batch
    sample = tuple(v.clone() for v in sample)
    buffers = {k: v.clone() for k, v in forward.named_buffers()}
    graphed = torch.cuda.make_graphed_callables(forward, sample, allow_unused_input=True)
    with torch.no_grad():
        for k, v in forward.named_buffers():
            v.copy_(buffers[k])
    return graphed


def recipe_loss(cfg: Config, head: str, out, age, gender, weights: UncertaintyWeights | None):
    out = {k: v.float() for k, v in out.items()}
    if weights is not None:
        return weights(out, age, gender, head=head, sigma=cfg.loss.sigma)
    return multitask_loss(
        out,
        age,
        gender,
        head=head,
        w_age=cfg.loss.w_age,
        w_gender=cfg.loss.w_gender,
        sigma=cfg.loss.sigma,
    )
