"""DKD: decoupled knowledge distillation.

Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022. KD split into the
target-class part ``TCKD = KL(b_t ‖ b_s)`` on the binary (target, rest) probabilities and the
non-target part ``NCKD = KL(p̂_t ‖ p̂_s)`` on the distribution over the other classes, both at
temperature T and scaled by T²: ``L = CE + α TCKD + β NCKD``. Needs a shared label space.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from prockd.classification.methods.base import METHODS, Distiller, MethodParams


class DKDParams(MethodParams):
    """DKD weights (paper: α = 1, β = 8, T = 4); ``shared_label_space`` must be set."""

    alpha: float = Field(1.0, ge=0)
    beta: float = Field(8.0, ge=0)
    temperature: float = Field(4.0, gt=0)
    shared_label_space: bool = False


def dkd_terms(z_s: torch.Tensor, z_t: torch.Tensor, y: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD), each T²-scaled and averaged over the batch."""
    gt = F.one_hot(y, z_s.shape[-1]).bool()
    p_s, p_t = F.softmax(z_s / t, -1), F.softmax(z_t / t, -1)
    b_s = torch.stack([(p_s * gt).sum(-1), (p_s * ~gt).sum(-1)], -1).clamp_min(1e-12)
    b_t = torch.stack([(p_t * gt).sum(-1), (p_t * ~gt).sum(-1)], -1).clamp_min(1e-12)
    tckd = (b_t * (b_t.log() - b_s.log())).sum(-1).mean() * t * t
    big = 1000.0
    ls = F.log_softmax(z_s / t - big * gt, -1)
    lt = F.log_softmax(z_t / t - big * gt, -1)
    nckd = (lt.exp() * (lt - ls) * ~gt).sum(-1).mean() * t * t
    return tckd, nckd


@METHODS.register("dkd")
class DKD(Distiller):
    """Decoupled KD on logits (same label space only)."""
    main_weights = ("alpha", "beta")

    Params = DKDParams
    needs_shared_label_space = True
    teacher_keys = ("logits",)

    def forward(self, images, targets, teacher_feats=None):
        """(z_s, {"ce", "tckd", "nckd"})."""
        z_s = self.student(images)
        z_t = self.teacher_features(images, teacher_feats)["logits"].to(z_s.dtype)
        tckd, nckd = dkd_terms(z_s, z_t, targets, self.params.temperature)
        return z_s, {"ce": self.ce(z_s, targets), "tckd": self.params.alpha * tckd,
                     "nckd": self.params.beta * nckd}
