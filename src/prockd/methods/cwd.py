"""CWD: channel-wise knowledge distillation.

Shu, Liu, Gao, Yan, Shen, "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021.
Each channel is turned into a distribution over positions, ``φ(y_c) = softmax(y_c / τ)``, and
``L = τ² / (B·C) Σ_{b,c} KL(φ(T_{b,c}) ‖ φ(S_{b,c}))``. 1x1-conv connector.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from prockd.methods.base import METHODS, FeatureDistiller


class CWDParams(BaseModel):
    """CWD weight and temperature."""

    model_config = ConfigDict(extra="forbid")
    weight: float = Field(1.0, ge=0)
    temperature: float = Field(4.0, gt=0)


def cwd_loss(s: torch.Tensor, t: torch.Tensor, tau: float) -> torch.Tensor:
    """Channel-wise spatial-distribution KL, ``τ²``-scaled, mean over batch and channels."""
    ls = F.log_softmax(s.flatten(2) / tau, dim=-1)
    lt = F.log_softmax(t.flatten(2) / tau, dim=-1)
    return (lt.exp() * (lt - ls)).sum(-1).mean() * tau * tau


@METHODS.register("cwd")
class CWD(FeatureDistiller):
    """Channel-wise distillation."""

    Params = CWDParams
    loss_name = "cwd"

    def feature_loss(self, s, t):
        """CWD loss."""
        return cwd_loss(s, t, self.params.temperature)
