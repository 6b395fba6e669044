"""Logit distillation (KD).

Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", NIPS DL workshop 2015:
``L = α_ce CE(z_s, y) + α_kd T² KL(softmax(z_t/T) ‖ softmax(z_s/T))``. Needs a shared label space:
a cross-task config is refused.
"""
from __future__ import annotations

from pydantic import Field

from prockd.classification.methods.base import METHODS, Distiller, MethodParams
from prockd.losses import kl_div


class KDParams(MethodParams):
    """KD weights; ``shared_label_space`` must be set: teacher class i is student class i."""

    temperature: float = Field(4.0, gt=0)
    alpha_ce: float = Field(1.0, ge=0)
    alpha_kd: float = Field(1.0, ge=0)
    shared_label_space: bool = False


@METHODS.register("kd")
class KD(Distiller):
    """Hinton KD on logits (same label space only)."""
    main_weights = ("alpha_kd",)

    Params = KDParams
    needs_shared_label_space = True
    teacher_keys = ("logits",)

    def forward(self, images, targets, teacher_feats=None):
        """(z_s, {"ce", "kd"})."""
        z_s = self.student(images)
        z_t = self.teacher_features(images, teacher_feats)["logits"]
        p = self.params
        return z_s, {"ce": p.alpha_ce * self.ce(z_s, targets),
                     "kd": p.alpha_kd * kl_div(z_t.to(z_s.dtype), z_s, p.temperature)}
