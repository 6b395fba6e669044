"""PKD (Pearson): feature distillation with the Pearson correlation coefficient.

Cao, Zhang, Xia, Zhou, Wang, Zhang, Xie, Wu, "PKD: General Distillation Framework for Object
Detectors via Pearson Correlation Coefficient", NeurIPS 2022. Each channel of student and teacher
maps is standardised over batch and positions; ``L = ½ mean((Ŝ - T̂)²) = 1 - mean_c r_c`` (Pearson
correlation per channel), so the loss ignores each channel's scale and shift. 1x1-conv connector.
"""
from __future__ import annotations

from pydantic import Field

from prockd.classification.methods.base import METHODS, FeatureDistiller, MethodParams
from prockd.losses import pearson_loss


class PKDPearsonParams(MethodParams):
    """PKD weight."""

    weight: float = Field(1.0, ge=0)


@METHODS.register("pkd_pearson")
class PKDPearson(FeatureDistiller):
    """Pearson-correlation feature distillation."""

    Params = PKDPearsonParams
    loss_name = "pkd"

    def feature_loss(self, s, t):
        """Pearson loss."""
        return pearson_loss(s, t)
