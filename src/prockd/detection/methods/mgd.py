"""MGD on FPN levels (Yang et al., "Masked Generative Distillation", ECCV 2022), as the authors' repository
(yzd-v/MGD) runs it for Faster R-CNN: P2-P5, a random spatial mask drops each position of the (aligned)
student map with probability λ = 0.45, a per-level generator conv3x3-ReLU-conv3x3 regenerates the teacher's
map, ``L = α · Σ (G(S ⊙ M) - T)² / N``, α = 5e-7 (sum over channels and positions, mean over images)."""
from __future__ import annotations

import torch
import torch.nn as nn
from pydantic import Field

from prockd.detection.methods.base import (
    DET_METHODS,
    LevelDistiller,
    LevelParams,
    connector,
)
from prockd.losses import mgd_mask


class DetMGDParams(LevelParams):
    """MGD α and mask ratio λ."""

    weight: float = Field(5e-7, ge=0)
    mask_ratio: float = Field(0.45, ge=0, lt=1)


def mgd_sum_loss(generated: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``Σ (G - T)² / N``."""
    return (generated - t).pow(2).sum() / generated.shape[0]


@DET_METHODS.register("mgd")
class DetMGD(LevelDistiller):
    """Masked generative distillation on P2-P5."""

    Params = DetMGDParams
    loss_name = "mgd"

    def make_level(self, s_ch, t_ch):
        """Connector (1x1 when widths differ) + generator."""
        return nn.ModuleDict({"align": connector(s_ch, t_ch), "gen": nn.Sequential(
            nn.Conv2d(t_ch, t_ch, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(t_ch, t_ch, 3, padding=1))})

    def level_loss(self, mod, s, t, level, il, targets):
        """``α · Σ (G(align(S) ⊙ M) - T)² / N``."""
        s = mod["align"](s)
        return self.params.weight * mgd_sum_loss(mod["gen"](s * mgd_mask(s, self.params.mask_ratio)), t)
