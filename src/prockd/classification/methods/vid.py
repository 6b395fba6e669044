"""VID: variational information distillation.

Ahn, Hu, Damianou, Lawrence, Dai, "Variational Information Distillation for Knowledge Transfer",
CVPR 2019. A regressor ``μ(S)`` (three 1x1 convs with ReLUs) and a learned per-channel variance
``σ_c² = softplus(α_c) + ε`` give a Gaussian ``q(t | s)``; the loss is its negative log-likelihood
``½ mean(log σ² + (T - μ(S))² / σ²)`` (constant dropped). Nothing in it needs the teacher's labels:
it runs across label spaces too (the paper's Table 4 uses it in the same-task protocol).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from prockd.classification.methods.base import METHODS, FeatureDistiller, MethodParams


class VIDParams(MethodParams):
    """VID weight, initial variance and minimum variance."""

    weight: float = Field(1.0, ge=0)
    init_var: float = Field(5.0, gt=0)
    eps: float = Field(1e-5, gt=0)


def vid_nll(mean: torch.Tensor, var: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``½ mean(log σ² + (t - μ)² / σ²)`` with ``var`` broadcast per channel (``C`` -> ``1 x C x 1 x 1``)."""
    v = var.view(1, -1, 1, 1)
    return (0.5 * ((t - mean).pow(2) / v + v.log())).mean()


@METHODS.register("vid")
class VID(FeatureDistiller):
    """Variational information distillation on the student's last map."""

    Params = VIDParams
    loss_name = "vid"

    def __init__(self, student, teacher, params: VIDParams, num_classes):
        super().__init__(student, teacher, params, num_classes)
        c_s, c_t = student.width, self.t_width
        mid = max(c_s, c_t)
        self.connector = nn.Sequential(nn.Conv2d(c_s, mid, 1), nn.ReLU(), nn.Conv2d(mid, mid, 1), nn.ReLU(),
                                       nn.Conv2d(mid, c_t, 1))
        # softplus(alpha) + eps = init_var at the start
        alpha = math.log(math.expm1(max(params.init_var - params.eps, 1e-6)))
        self.log_scale = nn.Parameter(torch.full((c_t,), alpha))

    def variance(self) -> torch.Tensor:
        """Per-channel variance ``softplus(α) + ε``."""
        return F.softplus(self.log_scale) + self.params.eps

    def feature_loss(self, s, t):
        """Gaussian negative log-likelihood of the teacher map."""
        return vid_nll(s, self.variance().to(s.dtype), t)
