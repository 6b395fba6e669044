"""ReFilled: distilling cross-task knowledge via relationship matching (two stages).

Ye, Lu, Zhan, "Distilling Cross-Task Knowledge via Relationship Matching", CVPR 2020.

- Stage 1 (the first ``stage1_fraction`` of the epochs): the student's embedding learns the
  teacher's comparisons between instances: for every anchor ``i`` the distribution over the other
  instances of the batch ``p(j | i) = softmax_{j≠i}(-‖ê_i - ê_j‖² / τ)`` (L2-normalised embeddings),
  ``L₁ = λ_rel KL(p_t ‖ p_s)`` (+ ``ce_stage1`` CE).
- Stage 2: the teacher's embedding becomes a classifier *for the student's classes* (nearest class
  centre of the batch, ``q(c | i) = softmax_c(-‖t̂_i - μ_c‖² / τ_c)`` over the classes present), and
  the student is trained with ``CE + λ_kd T² KL(q ‖ softmax(z_s / T))`` on those classes.

Works across label spaces (it never uses the teacher's classifier). The paper's instance-wise
temperature is not included.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from prockd.classification.data import IGNORE
from prockd.classification.methods.base import METHODS, Distiller, MethodParams


class ReFilledParams(MethodParams):
    """ReFilled stages and weights."""

    stage1_fraction: float = Field(0.3, ge=0, le=1)
    lambda_rel: float = Field(1.0, ge=0)
    tau_rel: float = Field(0.1, gt=0)
    ce_stage1: float = Field(0.0, ge=0)
    lambda_kd: float = Field(1.0, ge=0)
    tau_centre: float = Field(0.1, gt=0)
    temperature: float = Field(1.0, gt=0)


def neighbour_log_probs(e: torch.Tensor, tau: float) -> torch.Tensor:
    """``B x B`` log ``p(j | i)`` over the other instances (diagonal -inf) of L2-normalised ``e``."""
    e = F.normalize(e, dim=-1)
    d = torch.cdist(e, e).pow(2)
    eye = torch.eye(len(e), dtype=torch.bool, device=e.device)
    return F.log_softmax((-d / tau).masked_fill(eye, float("-inf")), dim=-1)


def relation_kl(s: torch.Tensor, t: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean over anchors of ``KL(p_t(· | i) ‖ p_s(· | i))``."""
    ls, lt = neighbour_log_probs(s, tau), neighbour_log_probs(t, tau)
    eye = torch.eye(len(s), dtype=torch.bool, device=s.device)
    term = torch.where(eye, torch.zeros_like(lt), lt.exp() * (lt - ls))
    return term.sum(-1).mean()


def centre_soft_labels(t: torch.Tensor, y: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(classes present in the batch, ``B x K_present`` teacher soft labels from nearest class centres).

    The centres come from the labelled images (unlabelled ones, target :data:`~prockd.classification.data.IGNORE`, have none);
    every image of the batch gets soft labels."""
    t = F.normalize(t, dim=-1)
    classes = torch.unique(y[y != IGNORE])
    onehot = (y.unsqueeze(1) == classes.unsqueeze(0)).to(t.dtype)
    centres = (onehot.t() @ t) / onehot.sum(0).unsqueeze(1)
    return classes, F.softmax(-torch.cdist(t, centres).pow(2) / tau, dim=-1)


@METHODS.register("refilled")
class ReFilled(Distiller):
    """Two-stage relationship-matching distillation."""
    main_weights = ("lambda_rel", "lambda_kd")

    Params = ReFilledParams

    @property
    def stage(self) -> int:
        """Current stage (1 or 2)."""
        return 1 if self.epoch < round(self.params.stage1_fraction * self.total_epochs) else 2

    def forward(self, images, targets, teacher_feats=None):
        """Stage 1: (z_s, {"ce", "relation"}); stage 2: (z_s, {"ce", "refilled_kd"})."""
        z_s, s, t = self.pooled_features(images, teacher_feats)
        p = self.params
        ce = self.ce(z_s, targets)
        if self.stage == 1:
            return z_s, {"ce": p.ce_stage1 * ce, "relation": p.lambda_rel * relation_kl(s, t, p.tau_rel)}
        classes, q = centre_soft_labels(t, targets, p.tau_centre)
        ls = F.log_softmax(z_s[:, classes].float() / p.temperature, dim=-1)
        kd = (q * (q.clamp_min(1e-12).log() - ls)).sum(-1).mean() * p.temperature ** 2
        return z_s, {"ce": ce, "refilled_kd": p.lambda_kd * kd}
