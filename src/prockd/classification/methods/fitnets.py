"""FitNets hint distillation.

Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015. The student's last feature map is
regressed by a 1x1-conv connector onto the teacher's taps (resampled to the student's grid);
``L = CE(z_s, y) + λ · MSE(r(S), T)``. Works across label spaces.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from prockd.classification.methods.base import METHODS, FeatureDistiller, MethodParams


class FitNetsParams(MethodParams):
    """FitNets weight λ of the hint loss."""

    weight: float = Field(1.0, ge=0)


def hint_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the connected student map and the teacher map."""
    return F.mse_loss(s, t)


@METHODS.register("fitnets")
class FitNets(FeatureDistiller):
    """Hint loss on the student's last features against the teacher's taps (1x1-conv connector)."""

    Params = FitNetsParams
    connector_kind = "conv1x1"
    loss_name = "hint"

    def feature_loss(self, s, t):
        """MSE hint."""
        return hint_loss(s, t)
