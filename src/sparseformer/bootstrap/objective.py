"""What a bootstrapping run trains: which parameters, and towards what.

The student's inherited blocks are frozen except the first ``K`` of them, and so are its final
norm and head (the teacher's); the new focusing part trains. The loss aligns the student's
final representation with the teacher's on the same (augmented) image: the pooled token after
the final LayerNorm, before the head's dropout and the head (the teacher's
``forward_head(pre_logits=True)`` in eval mode, where the dropout is off).

The default loss is the cosine distance ``1 - cos(s, t)``. Both features leave the same
inherited LayerNorm, whose input is a zero-mean, unit-variance vector: its direction decides
it, so the cosine asks for the same representation without weighting by the teacher's feature
scale (which differs between ViTs by an order of magnitude and would retune the learning rate
for each). ``smooth_l1`` (on the features divided by their RMS) is the alternative, closer to
the regression losses of feature distillation.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from sparseformer.bootstrap.teacher import freeze

__all__ = [
    "LOSSES",
    "AlignmentObjective",
    "alignment_loss",
    "check_finetune",
    "freeze_for_bootstrap",
]

logger = logging.getLogger(__name__)

LOSSES = ("cosine", "smooth_l1")


def check_finetune(config, finetune: int) -> None:
    """Raises ValueError where ``finetune`` is outside ``0 ..`` the blocks ``config``
    inherits."""
    from sparseformer.bootstrap.derive import inherited_units

    units = inherited_units(config)
    if not 0 <= finetune <= len(units):
        raise ValueError(f"--finetune {finetune}: the student inherits {len(units)} blocks; "
                         f"pick 0 to {len(units)}")  # fmt: skip


def freeze_for_bootstrap(student: nn.Module, finetune: int) -> tuple[int, int]:
    """Freeze the inherited blocks except the first ``finetune``, the final norm and the head.

    Returns:
        ``(frozen, trainable)`` parameter counts.

    Raises:
        ValueError: ``finetune`` outside ``0 .. inherited blocks``.
    """
    from sparseformer.bootstrap.derive import inherited_units

    check_finetune(student.config, finetune)
    frozen = (*inherited_units(student.config)[finetune:], "fc_norm.", "head.")
    counts = [0, 0]  # frozen, trained
    for name, p in student.named_parameters():
        train = not name.startswith(frozen)
        p.requires_grad_(train)
        counts[train] += p.numel()
    logger.info("bootstrap: %s parameters frozen, %s trained", f"{counts[0]:,}", f"{counts[1]:,}")
    return counts[0], counts[1]


class AlignmentObjective:
    """The loss of a bootstrapping step: ``objective(student, images, targets)``.

    The teacher runs frozen, in eval mode and without gradients, on the very images the
    student gets. The student runs through the model it is given (a DDP wrapper too, so that
    gradients are reduced); its pre-logit features are taken at its final norm by a forward
    hook held for that call only (a lasting hook would be copied into the EMA model). Targets
    are not used (labels only serve to report accuracy).
    """

    def __init__(self, teacher: nn.Module, loss: str = "cosine") -> None:
        if loss not in LOSSES:
            raise ValueError(f"unknown alignment loss {loss!r}; use one of {LOSSES}")
        self.teacher, self.loss = freeze(teacher), loss

    def teacher_features(self, images: Tensor) -> Tensor:
        """The teacher's pre-logit features ``(B, D)``, without gradients."""
        teacher = self.teacher
        if next(teacher.parameters()).device != images.device:
            teacher.to(images.device)
        teacher.eval()
        with torch.no_grad():
            return teacher.forward_head(teacher.forward_features(images), pre_logits=True)

    def student_features(self, student: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
        """The student's pre-logit features ``(B, D)`` (the pooled token after its final
        norm) and its outputs ``(B, K)``, from one forward pass."""
        kept: list[Tensor] = []
        norm = getattr(student, "module", student).fc_norm  # under DDP: the wrapped model's
        hook = norm.register_forward_hook(lambda _m, _i, out: kept.append(out))
        try:
            outputs = student(images)
        finally:
            hook.remove()
        return kept[-1], outputs

    def __call__(self, student: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        target = self.teacher_features(images).float()
        features = self.student_features(student, images)[0].float()  # (B, D)
        return alignment_loss(features, target, self.loss)


def alignment_loss(student: Tensor, teacher: Tensor, kind: str = "cosine") -> Tensor:
    """Mean alignment loss of ``(B, D)`` features (see the module's docstring)."""
    if kind == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    rms = teacher.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp(min=1e-6)
    return F.smooth_l1_loss(student / rms, teacher / rms)
