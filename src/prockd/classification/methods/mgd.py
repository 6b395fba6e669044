"""MGD: masked generative distillation.

Yang, Li, Zeng, Yuan, Li, "Masked Generative Distillation", ECCV 2022. Random positions of the
(connected) student map are zeroed with probability ``mask_ratio``; a generator
``G = Conv3x3 -> ReLU -> Conv3x3`` must regenerate the teacher's full map from what is left:
``L = mean((G(S ⊙ M) - T)²)`` (the paper sums, with α = 7e-5 for classification).
"""
from __future__ import annotations

import torch.nn as nn
from pydantic import Field

from prockd.classification.methods.base import METHODS, FeatureDistiller, MethodParams
from prockd.losses import mgd_loss, mgd_mask


class MGDParams(MethodParams):
    """MGD weight and mask ratio."""

    weight: float = Field(1.0, ge=0)
    mask_ratio: float = Field(0.5, ge=0, lt=1)


@METHODS.register("mgd")
class MGD(FeatureDistiller):
    """Masked generative distillation (1x1-conv connector, then the 3x3 generator)."""

    Params = MGDParams
    loss_name = "mgd"

    def __init__(self, student, teacher, params, num_classes):
        super().__init__(student, teacher, params, num_classes)
        c = self.t_width
        self.generator = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))

    def feature_loss(self, s, t):
        """Generate the teacher map from the masked student map."""
        return mgd_loss(self.generator(s * mgd_mask(s, self.params.mask_ratio)), t)
