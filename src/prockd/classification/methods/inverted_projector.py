"""The inverted projector: projector distillation with the projection on the teacher's side.

Auty, Miles, Kolbeinsson, Mikolajczyk, "Learning to project for cross-task knowledge distillation",
arXiv:2403.14494 (BMVC 2024). Instead of projecting the student's features into the teacher's space, a learned
linear map ``P`` projects the teacher's features into the student's space, so it can learn to drop the
teacher's task-specific directions: ``L = CE + λ · mean ||s − P(BN(t))||²`` on pooled features (``BN``:
batch whitening without affine parameters, as in PKD-projector, Miles & Mikolajczyk 2024). With both sides
learned the L2 distance is the paper's: it splits into a knowledge-transfer term and a spectral regulariser
of the student's features (a low-rank ``P`` shrinks the directions the teacher does not support). The
projector paper's ``log Σ |·|^α`` distance is not used here: with both sides learned it has no lower bound
(``s`` and ``P`` shrinking together drive it to −∞; measured: validation 8 % on the glyph suite).
"""
from __future__ import annotations

import torch
from pydantic import Field

from prockd.classification.methods.base import METHODS, Distiller, MethodParams
from prockd.classification.methods.pkd_projector import batch_whiten
from prockd.connectors import VectorConnector


class InvertedProjectorParams(MethodParams):
    """Weight of the projected-feature distance."""

    weight: float = Field(1.0, ge=0)


def inverted_projector_loss(s: torch.Tensor, pt: torch.Tensor) -> torch.Tensor:
    """``mean_b ||s_b − pt_b||² / D`` (``pt``: the projected teacher features, ``B x D``)."""
    return (s - pt).pow(2).mean()


@METHODS.register("inverted_projector")
class InvertedProjector(Distiller):
    """Teacher -> student projector distillation on pooled features."""

    Params = InvertedProjectorParams
    teacher_keys = ("taps",)

    def __init__(self, student, teacher, params, num_classes):
        super().__init__(student, teacher, params, num_classes)
        self.projector = VectorConnector(sum(teacher.tap_widths), student.head_width)

    def forward(self, images, targets, teacher_feats=None):
        """(z_s, {"ce", "proj"})."""
        z_s, s, t = self.pooled_features(images, teacher_feats)
        loss = inverted_projector_loss(s, self.projector(batch_whiten(t)).float())
        return z_s, {"ce": self.ce(z_s, targets), "proj": self.params.weight * loss}
