"""FitNets hint distillation.

Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015. The student's last token map is
regressed by a per-token linear connector (1x1 conv) onto the teacher's taps (resampled to the
student's grid); ``L = CE(z_s, y) + λ_hint · MSE(r(S), T)``. Works across label spaces.
"""
from __future__ import annotations

import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from prockd.methods.base import METHODS, Distiller
from prockd.modules import EmbeddingDistill


class FitNetsParams(BaseModel):
    """FitNets weights."""

    model_config = ConfigDict(extra="forbid")
    lambda_hint: float = Field(1.0, ge=0)


@METHODS.register("fitnets")
class FitNets(Distiller):
    """Hint loss on the student's last features against the teacher's taps (explicit connector)."""

    Params = FitNetsParams

    def __init__(self, student, teacher, params: FitNetsParams, num_classes: int):
        super().__init__(student, teacher, params, num_classes)
        self.connector = EmbeddingDistill(student.width, sum(teacher.tap_widths))

    def forward(self, images, targets, teacher_feats=None):
        """(z_s, {"ce", "hint"})."""
        tok, lay, _ = self.student.features(images)
        z_s = self.student.head(tok, lay)
        tf = self.teacher_features(images, teacher_feats)
        hint = self.connector(tok, lay, tf["taps"], self.teacher.tap_layout)
        return z_s, {"ce": F.cross_entropy(z_s, targets), "hint": self.params.lambda_hint * hint}
