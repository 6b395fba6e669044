"""Relational knowledge distillation (RKD), distance and angle losses.

Park, Kim, Lu, Cho, "Relational Knowledge Distillation", CVPR 2019. On pooled embeddings
``s = pool(student)``, ``t = pool(teacher taps)``: distance loss = Huber between pairwise distances
each divided by their mean; angle loss = Huber between the cosines of the angles ∠(e_i, e_j, e_k).
``L = CE + λ_d L_dist + λ_a L_angle`` (paper: λ_d = 25, λ_a = 50). Works across label spaces.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from prockd.classification.methods.base import METHODS, Distiller, MethodParams


class RKDParams(MethodParams):
    """RKD weights."""

    lambda_dist: float = Field(25.0, ge=0)
    lambda_angle: float = Field(50.0, ge=0)


def rkd_distance(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Huber loss between pairwise distances of ``s`` and ``t`` (B x D each), each divided by its mean
    over distinct pairs; averaged over all ``B²`` pairs (the zero diagonal included), as the authors' code."""
    def norm_dist(e):
        d = torch.cdist(e, e)
        off = ~torch.eye(len(e), dtype=torch.bool, device=e.device)
        return d / d[off].mean().clamp_min(1e-12)

    return F.smooth_l1_loss(norm_dist(s), norm_dist(t))


def rkd_angle(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Huber loss between ``cos ∠(e_i, e_j, e_k) = <(e_i-e_j)/|.|, (e_k-e_j)/|.|>`` over all triplets."""
    def cosines(e):
        diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), dim=-1)  # [j, i] = (e_i - e_j) normalised
        return torch.einsum("jid,jkd->jik", diff, diff)

    return F.smooth_l1_loss(cosines(s), cosines(t))


@METHODS.register("rkd")
class RKD(Distiller):
    """RKD on the student's pre-logits features and the teacher's pooled taps."""
    main_weights = ("lambda_dist", "lambda_angle")

    Params = RKDParams

    def forward(self, images, targets, teacher_feats=None):
        """(z_s, {"ce", "rkd_dist", "rkd_angle"})."""
        z_s, s, t = self.pooled_features(images, teacher_feats)
        p = self.params
        return z_s, {"ce": self.ce(z_s, targets), "rkd_dist": p.lambda_dist * rkd_distance(s, t),
                     "rkd_angle": p.lambda_angle * rkd_angle(s, t)}
