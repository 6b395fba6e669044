"""CWD on FPN levels (Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021),
as mmrazor's ``configs/distill/mmdet/cwd`` runs it: P2-P6, ``τ² KL(softmax(T_c/τ) ‖ softmax(S_c/τ)) / (N·C)``
per level, τ = 1, weight 10 per level, no connector between equal widths."""
from __future__ import annotations

from pydantic import Field

from prockd.detection.methods.base import DET_METHODS, LevelDistiller, LevelParams
from prockd.losses import cwd_loss


class DetCWDParams(LevelParams):
    """CWD weight (per level) and temperature."""

    weight: float = Field(10.0, ge=0)
    temperature: float = Field(1.0, gt=0)


@DET_METHODS.register("cwd")
class DetCWD(LevelDistiller):
    """Channel-wise distillation on P2-P6."""

    Params = DetCWDParams
    default_levels = ("0", "1", "2", "3", "pool")
    loss_name = "cwd"

    def level_loss(self, mod, s, t, level, il, targets):
        """``weight · τ² · mean_{n,c} KL``."""
        return self.params.weight * cwd_loss(mod(s), t, self.params.temperature)
