"""CWD: channel-wise knowledge distillation.

Shu, Liu, Gao, Yan, Shen, "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021.
Each channel is turned into a distribution over positions, ``φ(y_c) = softmax(y_c / τ)``, and
``L = τ² / (B·C) Σ_{b,c} KL(φ(T_{b,c}) ‖ φ(S_{b,c}))``. 1x1-conv connector.
"""
from __future__ import annotations

from pydantic import Field

from prockd.classification.methods.base import METHODS, FeatureDistiller, MethodParams
from prockd.losses import cwd_loss


class CWDParams(MethodParams):
    """CWD weight and temperature."""

    weight: float = Field(1.0, ge=0)
    temperature: float = Field(4.0, gt=0)


@METHODS.register("cwd")
class CWD(FeatureDistiller):
    """Channel-wise distillation."""

    Params = CWDParams
    loss_name = "cwd"

    def feature_loss(self, s, t):
        """CWD loss."""
        return cwd_loss(s, t, self.params.temperature)
