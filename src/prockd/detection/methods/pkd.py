"""PKD on FPN levels (Cao et al., "PKD: General Distillation Framework for Object Detectors via Pearson
Correlation Coefficient", NeurIPS 2022), as mmrazor's ``configs/distill/mmdet/pkd`` runs it: P2-P5, each
channel standardised over (N, H, W), ``MSE / 2`` (= 1 - mean Pearson r), weight 6."""
from __future__ import annotations

from pydantic import Field

from prockd.detection.methods.base import DET_METHODS, LevelDistiller, LevelParams
from prockd.losses import pearson_loss


class DetPKDParams(LevelParams):
    """PKD weight (per level)."""

    weight: float = Field(6.0, ge=0)


@DET_METHODS.register("pkd_pearson")
class DetPKDPearson(LevelDistiller):
    """Pearson-correlation distillation on P2-P5."""

    Params = DetPKDParams
    loss_name = "pkd"

    def level_loss(self, mod, s, t, level, il, targets):
        """``weight · ½ MSE(standardise(S), standardise(T))``."""
        return self.params.weight * pearson_loss(mod(s), t)
