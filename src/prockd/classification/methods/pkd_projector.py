"""PKD (projector): distillation through a linear projector onto BatchNorm-whitened teacher features.

Miles, Mikolajczyk, "Understanding the Role of the Projector in Knowledge Distillation", AAAI 2024
(torchdistill calls its loss SRD). Pooled student features go through a linear projector ``p``;
the pooled teacher features are normalised by a BatchNorm without affine parameters (batch
statistics); ``L = CE + λ log Σ |p(s) - BN(t)|^α`` (α = 4; the log makes the loss scale-free). The
paper's KL term on logits needs a shared label space and is left out in this cross-task form.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from prockd.classification.methods.base import METHODS, Distiller, MethodParams
from prockd.connectors import VectorConnector


class PKDProjectorParams(MethodParams):
    """Projector-KD weight and exponent."""

    weight: float = Field(1.0, ge=0)
    exponent: float = Field(4.0, gt=0)


def batch_whiten(t: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """BatchNorm without affine parameters, batch statistics (biased variance)."""
    return F.batch_norm(t, None, None, training=True, eps=eps)


def projector_loss(ps: torch.Tensor, t_norm: torch.Tensor, exponent: float) -> torch.Tensor:
    """``log Σ |p(s) - t|^α`` over batch and dimensions."""
    return torch.log((ps - t_norm).abs().pow(exponent).sum())


@METHODS.register("pkd_projector")
class PKDProjector(Distiller):
    """Projector distillation on pooled features."""

    Params = PKDProjectorParams

    def __init__(self, student, teacher, params, num_classes):
        super().__init__(student, teacher, params, num_classes)
        self.projector = VectorConnector(student.head_width, sum(teacher.tap_widths))

    def forward(self, images, targets, teacher_feats=None):
        """(z_s, {"ce", "proj"})."""
        z_s, s, t = self.pooled_features(images, teacher_feats)
        loss = projector_loss(self.projector(s).float(), batch_whiten(t), self.params.exponent)
        return z_s, {"ce": self.ce(z_s, targets), "proj": self.params.weight * loss}
