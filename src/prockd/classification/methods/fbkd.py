"""FBKD: attention-guided feature distillation.

Zhang, Ma, "Improve Object Detection with Feature-based Knowledge Distillation: Towards Accurate
and Efficient Detectors", ICLR 2021 (the ProC-KD paper's table cites FBKD as Jiao et al. 2020).
Spatial attention ``A^S = hw · softmax(mean_c |F| / τ)`` and channel attention
``A^C = C · softmax(mean_hw |F| / τ)`` of both networks; the teacher's attentions weight the
feature loss ``mean((T - S)² · A^S_t · A^C_t)`` and the attentions are matched with
``mean|A_t - A_s|``. ``L = CE + α L_feat + γ L_att``. The paper's non-local relation loss is not
included. Means instead of the paper's sums (its α = 7e-5, γ = 4e-3 were tuned for sums).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from prockd.classification.methods.base import METHODS, FeatureDistiller, MethodParams


class FBKDParams(MethodParams):
    """FBKD weights and attention temperature."""

    weight: float = Field(1.0, ge=0)  # α, feature loss
    gamma: float = Field(1.0, ge=0)  # attention loss
    temperature: float = Field(0.5, gt=0)


def fbkd_attention(f: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(spatial ``B x h x w``, channel ``B x C``) attentions, each summing to its number of entries."""
    b, c, h, w = f.shape
    a = f.abs()
    sp = (h * w) * F.softmax((a.mean(1) / tau).flatten(1), dim=1).view(b, h, w)
    ch = c * F.softmax(a.mean((2, 3)) / tau, dim=1)
    return sp, ch


def fbkd_losses(s: torch.Tensor, t: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention-weighted feature loss, attention-matching loss)."""
    sp_t, ch_t = fbkd_attention(t, tau)
    sp_s, ch_s = fbkd_attention(s, tau)
    w = sp_t.unsqueeze(1) * ch_t.view(*ch_t.shape, 1, 1)
    feat = ((t - s).pow(2) * w).mean()
    att = (sp_t - sp_s).abs().mean() + (ch_t - ch_s).abs().mean()
    return feat, att


@METHODS.register("fbkd")
class FBKD(FeatureDistiller):
    """Attention-guided feature distillation (1x1-conv connector)."""

    Params = FBKDParams

    def forward(self, images, targets, teacher_feats=None):
        """(z_s, {"ce", "fbkd_feat", "fbkd_att"})."""
        z_s, s, t = self.feature_maps(images, teacher_feats)
        feat, att = fbkd_losses(s, t, self.params.temperature)
        return z_s, {"ce": self.ce(z_s, targets), "fbkd_feat": self.params.weight * feat,
                     "fbkd_att": self.params.gamma * att}
