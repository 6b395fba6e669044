"""SSIM-KD on FPN levels: de Rijk, Schneider, Cordts, Gavrila, "Structural Knowledge Distillation for Object
Detection", NeurIPS 2022: ``λ Σ_levels (1 - SSIM(minmax(adapt(S)), minmax(T))) / 2`` with an 11x11
Gaussian window (σ 1.5), min-max normalisation per map, λ = 4 (the paper's 2-4). Not the paper's SKD
(that is :mod:`.skd_zhang_ma`)."""
from __future__ import annotations

import torch
from pydantic import Field

from prockd.detection.methods.base import DET_METHODS, LevelDistiller, LevelParams
from prockd.losses import ssim


class DetSSIMKDParams(LevelParams):
    """SSIM-KD weight and window."""

    weight: float = Field(4.0, ge=0)
    window: int = Field(11, ge=1)
    sigma: float = Field(1.5, gt=0)


def minmax(f: torch.Tensor) -> torch.Tensor:
    """Each map of ``N x C x H x W`` scaled to [0, 1] over its channels and positions."""
    lo = f.flatten(1).min(1).values.view(-1, 1, 1, 1)
    hi = f.flatten(1).max(1).values.view(-1, 1, 1, 1)
    return (f - lo) / (hi - lo).clamp_min(1e-12)


@DET_METHODS.register("ssim_kd")
class DetSSIMKD(LevelDistiller):
    """Structural (SSIM) distillation on P2-P5."""

    Params = DetSSIMKDParams
    loss_name = "ssim"

    def level_loss(self, mod, s, t, level, il, targets):
        """``λ (1 - SSIM) / 2`` of the min-max-normalised maps."""
        p = self.params
        return p.weight * (1.0 - ssim(minmax(mod(s)), minmax(t), p.window, p.sigma, 1e-4, 9e-4)) / 2
