"""The losses both tasks use, each a plain function of tensors tested against a direct computation: KL with a
temperature (Hinton et al. 2015; ProC-KD's Eq. 9, KD, probe distillation), channel-wise distillation (CWD,
Shu et al. 2021), MGD's random mask (Yang et al. 2022), Pearson-correlation distillation (PKD, Cao et al.
2022), SSIM (Wang et al. 2004; SSIM-KD). The classification and detection methods wrap them with their own
connectors and weights."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_div(p_logits: torch.Tensor, q_logits: torch.Tensor, t: float) -> torch.Tensor:
    """``T² · KL(softmax(p/T) ‖ softmax(q/T))`` averaged over the batch."""
    logp = F.log_softmax(p_logits / t, dim=-1)
    logq = F.log_softmax(q_logits / t, dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1).mean() * t * t


def cwd_loss(s: torch.Tensor, t: torch.Tensor, tau: float) -> torch.Tensor:
    """Channel-wise spatial-distribution KL, ``τ²``-scaled, mean over batch and channels."""
    ls = F.log_softmax(s.flatten(2) / tau, dim=-1)
    lt = F.log_softmax(t.flatten(2) / tau, dim=-1)
    return (lt.exp() * (lt - ls)).sum(-1).mean() * tau * tau


def mgd_mask(s: torch.Tensor, ratio: float) -> torch.Tensor:
    """``B x 1 x h x w`` mask, 0 with probability ``ratio`` (one draw per position, shared by channels)."""
    b, _, h, w = s.shape
    return (torch.rand(b, 1, h, w, device=s.device) >= ratio).to(s.dtype)


def mgd_loss(generated: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the generated and the teacher map."""
    return F.mse_loss(generated, t)


def standardise(f: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Zero mean, unit variance per channel over batch and positions (``B x C x h x w``)."""
    mean = f.mean((0, 2, 3), keepdim=True)
    std = f.var((0, 2, 3), keepdim=True, unbiased=False).add(eps).sqrt()
    return (f - mean) / std


def pearson_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``½ · MSE(standardise(S), standardise(T))``."""
    return 0.5 * (standardise(s) - standardise(t)).pow(2).mean()


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
