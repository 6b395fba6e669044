"""AttentionProbe: distillation through the teacher's patch-attention probe.

After Wang, Zhao, Zhang, Wang, Jiang, "Attention Probe: Vision Transformer Distillation in the Wild",
ICASSP 2022: the teacher's class-token attention over the patches marks the informative ones, and the
student matches the teacher's responses as seen through that probe. Our formulation (documented, not
the authors' code, which is not public): the probe of a token map is
``a(j) = softmax_j(<q, x_j> / (√C · τ))`` over grid positions, with ``q`` the class token (or the
mean token where the network has none); ``L = CE + λ_att KL(a_t ‖ a_s) + λ MSE(r(Σ_j a_t(j) s_j),
Σ_j a_t(j) t_j)`` with a linear connector ``r`` and the teacher grid resampled to the student's.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from prockd.classification.methods.base import METHODS, Distiller, MethodParams
from prockd.connectors import VectorConnector
from prockd.features import Layout, resample_tokens


class AttentionProbeParams(MethodParams):
    """Weights of the probe-attention and probe-response terms, probe temperature."""

    weight: float = Field(1.0, ge=0)
    weight_attention: float = Field(1.0, ge=0)
    temperature: float = Field(1.0, gt=0)


def probe_attention(tokens: torch.Tensor, layout: Layout, tau: float = 1.0) -> torch.Tensor:
    """``B x h·w`` attention of the probe query (class token, else mean grid token) over the grid."""
    grid = tokens[:, layout.prefix:]
    q = tokens[:, 0] if layout.prefix else grid.mean(1)
    logits = torch.einsum("bc,bnc->bn", q, grid) / (math.sqrt(grid.shape[-1]) * tau)
    return F.softmax(logits, dim=-1)


@METHODS.register("attention_probe")
class AttentionProbe(Distiller):
    """Probe-attention and probe-response distillation."""

    Params = AttentionProbeParams

    def __init__(self, student, teacher, params, num_classes):
        super().__init__(student, teacher, params, num_classes)
        self.connector = VectorConnector(student.width, sum(teacher.tap_widths))

    def forward(self, images, targets, teacher_feats=None):
        """(z_s, {"ce", "probe_att", "probe_feat"})."""
        tok, lay, _ = self.student.features(images)
        z_s = self.student.head(tok, lay)
        taps = self.teacher_features(images, teacher_feats)["taps"]
        t, t_lay = resample_tokens(taps.to(tok.dtype), self.teacher.tap_layout, (lay.h, lay.w))
        p = self.params
        a_t = probe_attention(t, t_lay, p.temperature)
        a_s = probe_attention(tok, lay, p.temperature)
        att = (a_t * (a_t.clamp_min(1e-12).log() - a_s.clamp_min(1e-12).log())).sum(-1).mean()
        r_s = self.connector(torch.einsum("bn,bnc->bc", a_t, tok[:, lay.prefix:]))
        r_t = torch.einsum("bn,bnc->bc", a_t, t[:, t_lay.prefix:])
        return z_s, {"ce": self.ce(z_s, targets), "probe_att": p.weight_attention * att,
                     "probe_feat": p.weight * F.mse_loss(r_s, r_t)}
