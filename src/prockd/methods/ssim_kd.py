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

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from prockd.methods.base import METHODS, FeatureDistiller


class SSIMKDParams(BaseModel):
    """SSIM-KD weight and SSIM constants."""

    model_config = ConfigDict(extra="forbid")
    weight: float = Field(1.0, ge=0)
    window: int = Field(5, ge=1)
    sigma: float = Field(1.5, gt=0)
    c1: float = Field(1e-4, ge=0)
    c2: float = Field(9e-4, ge=0)


def gaussian_window(size: int, sigma: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalised ``size x size`` Gaussian window."""
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(s: torch.Tensor, t: torch.Tensor, window: int = 5, sigma: float = 1.5, c1: float = 1e-4,
         c2: float = 9e-4) -> torch.Tensor:
    """Mean SSIM over valid windows, channels and batch of two ``B x C x h x w`` maps."""
    _, c, h, w = s.shape
    k = min(window, h, w)
    win = gaussian_window(k, sigma, s.dtype, s.device).expand(c, 1, k, k)

    def filt(x):
        return F.conv2d(x, win, groups=c)

    mu_s, mu_t = filt(s), filt(t)
    var_s = filt(s * s) - mu_s ** 2
    var_t = filt(t * t) - mu_t ** 2
    cov = filt(s * t) - mu_s * mu_t
    num = (2 * mu_s * mu_t + c1) * (2 * cov + c2)
    den = (mu_s ** 2 + mu_t ** 2 + c1) * (var_s + var_t + c2)
    return (num / den).mean()


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
