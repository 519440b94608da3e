"""One training step's forward: normalise, augment, run the model, score it.

:class:`TrainForward` is one module with tensors in and out, so that ``train.cuda_graphs`` can
capture all of it, and its backward, as CUDA graphs (:func:`graph_train_forward`).
"""

from __future__ import annotations

import torch
from torch import nn

from agegender.core.config import Config
from agegender.core.errors import ConfigError
from agegender.data.near_dups import SeenRecord
from agegender.inference.model_files import read_seen, resolve_checkpoint
from agegender.training.augment import augment, mixup
from agegender.training.checkpoint import load_checkpoint, unwrap
from agegender.training.losses import UncertaintyWeights, distillation_loss, multitask_loss
from agegender.training.models import normalize


class TrainForward(nn.Module):
    """What a training step computes before ``backward``: a uint8 batch is normalised,
    augmented (with ``draws``, see :func:`agegender.training.augment.augment`; ignored when
    ``train.augment`` is off), put through the model (bf16 autocast when ``amp``) and scored by
    the recipe's loss.

    ``forward(x, draws, age, gender[, soft_gender, soft_age])`` returns ``(loss, mae,
    correct)``: the loss to backpropagate, the batch's mean absolute age error (the distance to
    a range label) and its number of right genders (of those known). With ``distill``
    (``distill.weight`` of the loss), ``soft_gender`` and ``soft_age`` are a teacher's
    P(female) ``(B,)`` and age distribution ``(B, K)`` for the batch (see
    :func:`teacher_targets`; ``soft_age`` empty when only the gender is distilled).
    One module with tensors in and out, so that ``train.cuda_graphs`` can capture the whole of
    it, and its backward, as CUDA graphs (see :func:`graph_train_forward`).
    """

    def __init__(
        self,
        cfg: Config,
        model: nn.Module,
        weights: UncertaintyWeights | None,
        amp: bool,
        distill: bool = False,
    ) -> None:
        super().__init__()
        self.cfg, self.model, self.weights, self.amp = cfg, model, weights, amp
        self.distill = distill
        plain = unwrap(model)
        self.head = plain.config.get("age_head", "regression")
        self.data_config = plain.data_config

    def _loss(
        self,
        out: dict[str, torch.Tensor],
        age: torch.Tensor,
        gender: torch.Tensor,
        soft_gender: torch.Tensor | None,
        soft_age: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """The recipe's loss of ``out`` against these labels (and the teacher's outputs)."""
        losses = recipe_loss(self.cfg, self.head, out, age, gender, self.weights)
        if self.distill:
            c = self.cfg.loss
            kd = distillation_loss(out, soft_gender, soft_age, w_age=c.w_age, w_gender=c.w_gender)
            w = self.cfg.distill.weight
            losses["loss"] = (1 - w) * losses["loss"] + w * kd
        return losses

    def forward(
        self,
        x: torch.Tensor,
        draws: torch.Tensor,
        age: torch.Tensor,
        gender: torch.Tensor,
        soft_gender: torch.Tensor | None = None,
        soft_age: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = self.cfg.train
        x = normalize(x, self.data_config)
        lam = None
        if t.augment:
            x = augment(x, self.cfg.aug, draws=draws)
            if self.cfg.aug.mixup > 0:
                x, lam = mixup(x, self.cfg.aug, draws)
        if t.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # no cast cache: CUDA graph capture needs it off, and each weight is cast once anyway
        with torch.autocast(x.device.type, torch.bfloat16, enabled=self.amp, cache_enabled=False):
            out = self.model(x)
        soft_age = soft_age if soft_age is not None and soft_age.numel() else None
        losses = self._loss(out, age, gender, soft_gender, soft_age)
        loss = losses["loss"]
        if lam is not None:  # the blend's other face: the batch's labels shifted by one
            rolled = [v.roll(1, dims=0) if v is not None else None
                      for v in (age, gender, soft_gender, soft_age)]  # fmt: skip
            loss = lam * loss + (1 - lam) * self._loss(out, *rolled)["loss"]
        right = (out["gender"].detach().float() > 0) == (gender > 0.5)
        correct = (right & (gender >= 0)).float().sum()  # of the faces whose gender is known
        return loss, losses["mae"], correct


@torch.no_grad()
def teacher_targets(
    teacher: nn.Module, x: torch.Tensor, student_head: str, tta: bool, amp: bool, batch: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """A teacher's outputs on uint8 faces ``(N, C, H, W)``: P(female) ``(N,)`` and, when
    teacher and student both have a ``dldl`` head over the same ages, the age distribution
    ``(N, K)`` (else an empty tensor). With ``tta`` each is the mean over the face and its
    mirror, which is how test-time augmentation folds into the student: one pass learns the
    average of two."""
    teacher.eval()
    k = getattr(teacher, "num_ages", 0)
    dist = teacher.config.get("age_head") == "dldl" and student_head == "dldl"
    p_female, ages = [], []
    for s in range(0, len(x), batch):
        xb = normalize(x[s : s + batch], teacher.data_config)
        views = [xb, torch.flip(xb, dims=[3])] if tta else [xb]
        with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
            outs = [teacher(v) for v in views]
        p_female.append(sum(torch.sigmoid(o["gender"].float()) for o in outs) / len(outs))
        if dist:
            ages.append(sum(o["age_logits"].float().softmax(-1) for o in outs) / len(outs))
    soft_age = torch.cat(ages) if dist else torch.zeros(0, k, device=x.device)
    return torch.cat(p_female), soft_age


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
    if cfg.loss.gender_smoothing > 0:  # known genders only: -1 (not known) stays -1
        s = cfg.loss.gender_smoothing
        gender = torch.where(gender >= 0, gender.float() * (1 - s) + s / 2, gender.float())
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


def distill_targets(
    cfg: Config, x: torch.Tensor, student: nn.Module, amp: bool
) -> tuple[torch.Tensor, torch.Tensor, SeenRecord | None]:
    """The outputs of ``distill.teacher`` on the training faces ``x`` (:func:`teacher_targets`)
    and its record of the images it saw. Several teachers, comma-separated, are an ensemble:
    their P(female) and age distributions are averaged, and the record holds what any saw."""
    names = [n.strip() for n in cfg.distill.teacher.split(",") if n.strip()]
    head = student.config.get("age_head", "regression")
    genders, ages, seen = [], [], None
    for name in names:
        path = resolve_checkpoint(name)
        teacher, meta = load_checkpoint(path, x.device)
        if meta["data_config"]["input_size"] != list(student.data_config["input_size"]):
            raise ConfigError(
                f"distill.teacher {name} takes {meta['data_config']['input_size']} faces, the "
                f"student {list(student.data_config['input_size'])}: give teachers of the same "
                "size and colour"
            )
        g, a = teacher_targets(teacher, x, head, cfg.distill.tta, amp, cfg.train.eval_batch_size)
        genders.append(g)
        ages.append(a)
        record = read_seen(path)
        seen = record if seen is None else (seen + record if record is not None else seen)
    if len({a.shape[0] for a in ages}) > 1:  # some teacher gave no age distribution
        ages = [a[:0] for a in ages]
    return torch.stack(genders).mean(0), torch.stack(ages).mean(0), seen
