"""SSIM-KD: structural (SSIM-based) feature distillation, named ``ssim_kd``.

de Rijk, Schneider, Cordts, Gavrila, "Structural Knowledge Distillation for Object Detection",
NeurIPS 2022: the feature-imitation L2 is replaced by ``1 - SSIM(S, T)``, computed per
channel with local Gaussian windows (means, variances and covariance of each window),
``SSIM = (2μ_sμ_t + C1)(2σ_st + C2) / ((μ_s² + μ_t² + C1)(σ_s² + σ_t² + C2))``, averaged over
windows, channels and the batch. The window shrinks to the map when the map is smaller.

Not the paper's SKD: ProC-KD's tables cite the structured KD of Zhang & Ma (2023, attention-guided + non-local
distillation for detection), which this method is not; the name ``skd`` is kept free for it.
"""
from __future__ import annotations

from pydantic import Field

from prockd.classification.methods.base import METHODS, FeatureDistiller, MethodParams
from prockd.losses import ssim


class SSIMKDParams(MethodParams):
    """SSIM-KD weight and SSIM constants."""

    weight: float = Field(1.0, ge=0)
    window: int = Field(5, ge=1)
    sigma: float = Field(1.5, gt=0)
    c1: float = Field(1e-4, ge=0)
    c2: float = Field(9e-4, ge=0)


@METHODS.register("ssim_kd")
class SSIMKD(FeatureDistiller):
    """Structural (SSIM) feature distillation of de Rijk et al. 2022 (1x1-conv connector)."""

    Params = SSIMKDParams
    loss_name = "ssim"

    def feature_loss(self, s, t):
        """``1 - SSIM``."""
        p = self.params
        return 1.0 - ssim(s.float(), t.float(), p.window, p.sigma, p.c1, p.c2)


METHODS.moved("skd", "the SSIM-based method of de Rijk et al. 2022 is now named 'ssim_kd'; 'skd' is reserved for "
                     "the structured KD of Zhang & Ma 2023 that the paper cites, which prockd does not implement yet")
