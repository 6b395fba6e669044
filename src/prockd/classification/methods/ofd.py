"""OFD: a comprehensive overhaul of feature distillation.

Heo, Kim, Yun, Park, Kwak, Choi, ICCV 2019. Teacher target ``σ_m(T) = max(T, m)`` with a per-channel
negative margin ``m_c = E[T_c | T_c < 0]``; the student's pre-ReLU map through a conv + BN connector;
partial L2 ``d_p = Σ (T - S)²`` except where ``S ≤ T ≤ 0`` (no penalty below a negative target).
The authors derive ``m`` from the teacher's BatchNorm statistics; here it is estimated from the
teacher's (pre-ReLU if the taps say so, e.g. ``layer3.1.act2:input``) features of the first training
images, which needs no BN before the tap. Mean over elements (authors: sum / batch / 1000).
"""
from __future__ import annotations

import torch
from pydantic import Field

from prockd.classification.methods.base import METHODS, FeatureDistiller, MethodParams
from prockd.connectors import teacher_map


class OFDParams(MethodParams):
    """OFD weight."""

    weight: float = Field(1.0, ge=0)


def ofd_margin(t: torch.Tensor) -> torch.Tensor:
    """Per-channel ``E[t | t < 0]`` over batch and positions of ``B x C x h x w`` (0 where never negative)."""
    neg = (t < 0).to(t.dtype)
    n = neg.sum((0, 2, 3))
    return torch.where(n > 0, (t * neg).sum((0, 2, 3)) / n.clamp_min(1), torch.zeros_like(n))


def ofd_loss(s: torch.Tensor, t: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Partial L2 between ``S`` and ``max(T, m)``, mean over elements."""
    target = torch.maximum(t, margin.view(1, -1, 1, 1).to(t.dtype))
    mask = ((s > target) | (target > 0)).to(s.dtype)
    return ((s - target).pow(2) * mask).mean()


@METHODS.register("ofd")
class OFD(FeatureDistiller):
    """Overhaul feature distillation (margin ReLU target, partial L2, conv1x1 + BN connector)."""

    Params = OFDParams
    connector_kind = "conv1x1_bn"
    loss_name = "ofd"

    def __init__(self, student, teacher, params, num_classes):
        super().__init__(student, teacher, params, num_classes)
        self.register_buffer("margin", torch.zeros(self.t_width))

    def prepare(self, teacher_feats, seed: int = 0, labelled=None) -> None:
        """Estimate the per-channel margins from the teacher features of the first training images."""
        taps = teacher_feats()["taps"]
        lay = self.teacher.tap_layout
        self.margin.copy_(ofd_margin(teacher_map(taps.float(), lay, (lay.h, lay.w))).to(self.margin.device))

    def feature_loss(self, s, t):
        """Partial L2 to the margin target."""
        return ofd_loss(s, t, self.margin)
