"""AFT: adaptive feature transfer through a kernel regulariser with learned feature weights.

Qiu, Gruver, Wang, Wilson, "Transferring knowledge from large foundation models to small downstream models",
ICML 2024. Over a batch, the student's pre-logits features ``s`` and the frozen teacher's features ``t``
weighted per dimension by ``ρ = sigmoid(r)`` (``r`` learned with the student, from 0) are centred over the
batch and L2-normalised per image; their linear kernels ``K_s = ŝ ŝᵀ`` and ``K_t = t̂ t̂ᵀ`` are compared:
``L = CE + β · sqrt(mean((K_s − K_t)²))``. The learned weights let the student ignore teacher features that
do not help its task. Here ``t`` is the average of the teacher's taps over the grid.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from pydantic import Field

from prockd.classification.methods.base import METHODS, Distiller, MethodParams


class AFTParams(MethodParams):
    """AFT weight β (not fixed by the paper: a per-dataset hyper-parameter) and whether ρ is learned."""

    weight: float = Field(10.0, ge=0)
    learn_weights: bool = True


def normalised_kernel(x: torch.Tensor) -> torch.Tensor:
    """Linear kernel of the batch-centred, per-row L2-normalised features ``B x D`` (``B x B``)."""
    x = x - x.mean(0, keepdim=True)
    x = x / (x.norm(dim=1, keepdim=True) + 1e-8)
    return x @ x.t()


def aft_loss(s: torch.Tensor, t: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """``sqrt(mean((K(s) − K(t ⊙ ρ))²) + 1e-8)``."""
    dk = normalised_kernel(s) - normalised_kernel(t * rho)
    return ((dk * dk).mean() + 1e-8).sqrt()


@METHODS.register("aft")
class AFT(Distiller):
    """Kernel regulariser between the student's features and the learned-weighted teacher features."""

    Params = AFTParams
    teacher_keys = ("taps",)

    def __init__(self, student, teacher, params, num_classes):
        super().__init__(student, teacher, params, num_classes)
        self.feature_logits = nn.Parameter(torch.zeros(sum(teacher.tap_widths)),
                                           requires_grad=params.learn_weights)
        self.feature_logits._no_decay = True

    def forward(self, images, targets, teacher_feats=None):
        """(z_s, {"ce", "aft"})."""
        z_s, s, t = self.pooled_features(images, teacher_feats)
        loss = aft_loss(s, t, torch.sigmoid(self.feature_logits).float())
        return z_s, {"ce": self.ce(z_s, targets), "aft": self.params.weight * loss}

    def epoch_stats(self) -> dict[str, float]:
        """Mean and spread of the learned feature weights ρ."""
        rho = torch.sigmoid(self.feature_logits.detach().float())
        return {"aft_rho_mean": float(rho.mean()), "aft_rho_std": float(rho.std())}
