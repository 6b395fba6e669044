"""FBKD on FPN levels: attention-guided + non-local distillation of Zhang & Ma, "Improve Object Detection
with Feature-based Knowledge Distillation: Towards Accurate and Efficient Detectors", ICLR 2021, as
mmrazor's ``configs/distill/mmdet/fbkd`` runs it (the ProC-KD paper's tables call it "FBKD (Jiao et al.,
2020)"; mmrazor's FBKD is this method). On P2-P5, with ``G^S(F) = mean_c|F|``, ``G^C(F) = mean_hw|F|``:

- attentions ``A^S = HW softmax(G^S / T)``, ``A^C = C softmax(G^C / T)`` of teacher and student;
- masks (``recipe: mmrazor``): the mean of the teacher's and the student's attentions, detached;
  (``recipe: paper``, the journal version's equations, :mod:`.skd_zhang_ma`): ``HW softmax((G^S_s + G^S_t)/T)``
  and ``C softmax((G^C_s + G^C_t)/T)``, detached;
- masked feature loss ``α (Σ (T - S)² M^S M^C)^{1/2}``;
- attention loss ``γ_c Σ|Ĝ^C_s - G^C_t| + γ_s Σ|Ĝ^S_s - G^S_t|`` (``mmrazor``: the student's pooled maps through
  trainable adaptation layers, 1x1 conv / linear; ``paper``: the attentions themselves, no adaptation);
- non-local loss ``β (Σ (r_t(T) - r_s(S))²)^{1/2}``, ``r`` an embedded-Gaussian non-local block per network
  (trainable, as mmrazor's teacher and student connectors hold them).

Weights α 7e-5, γ_c 4e-3, γ_s 4e-3, β 7e-5, T 0.5. Sums are over the whole batch, as the public code does.
The non-local block pools its keys and values 2x2 (the non-local paper's sub-sampling) and, on levels with
more than ``nl_max_tokens`` cells, its input (area pooling; full-resolution COCO P2 would need a
67k x 17k affinity) — a memory bound the public code does not have.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from prockd.detection.methods.base import (
    DET_METHODS,
    LevelDistiller,
    LevelParams,
    connector,
)


class DetFBKDParams(LevelParams):
    """Attention-guided + non-local distillation weights."""

    recipe: Literal["mmrazor", "paper"] = "mmrazor"
    alpha: float = Field(7e-5, ge=0)  # masked feature L2
    gamma_channel: float = Field(4e-3, ge=0)
    gamma_spatial: float = Field(4e-3, ge=0)
    beta: float = Field(7e-5, ge=0)  # non-local L2
    temperature: float = Field(0.5, gt=0)
    nl_max_tokens: int = Field(4096, ge=16)


class NonLocal2d(nn.Module):
    """Embedded-Gaussian non-local block (Wang et al. 2018): ``x + W softmax(θ(x)ᵀ φ(x)) g(x)``, keys and values
    max-pooled 2x2; zero-initialised output so it starts as the identity."""

    def __init__(self, c: int, max_tokens: int = 4096):
        super().__init__()
        inter = max(1, c // 2)
        self.theta, self.phi, self.g = (nn.Conv2d(c, inter, 1) for _ in range(3))
        self.out = nn.Conv2d(inter, c, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.max_tokens = max_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output (on the pooled grid when the level has more than ``max_tokens`` cells)."""
        n, c, h, w = x.shape
        if h * w > self.max_tokens:
            f = (h * w / self.max_tokens) ** 0.5
            x = F.adaptive_avg_pool2d(x, (max(1, int(h / f)), max(1, int(w / f))))
            n, c, h, w = x.shape
        q = self.theta(x).flatten(2).transpose(1, 2)  # N x HW x C'
        kv_in = F.max_pool2d(x, 2) if min(h, w) >= 2 else x
        k = self.phi(kv_in).flatten(2)  # N x C' x hw
        v = self.g(kv_in).flatten(2).transpose(1, 2)  # N x hw x C'
        y = torch.softmax(q @ k, dim=-1) @ v
        return x + self.out(y.transpose(1, 2).reshape(n, -1, h, w))


def pooled_attention(f: torch.Tensor, temp: float) -> dict[str, torch.Tensor]:
    """``G^S`` (``N x H x W``), ``G^C`` (``N x C``) and the attentions ``A^S``, ``A^C``."""
    n, c, h, w = f.shape
    gs, gc = f.abs().mean(1), f.abs().mean((2, 3))
    return {"gs": gs, "gc": gc, "as": h * w * F.softmax((gs / temp).reshape(n, -1), 1).reshape(n, h, w),
            "ac": c * F.softmax(gc / temp, 1)}


def fbkd_level_losses(s: torch.Tensor, t: torch.Tensor, mod: nn.ModuleDict, p: DetFBKDParams) -> dict[str, torch.Tensor]:
    """The four weighted terms of one level; ``s`` already aligned to the teacher's width."""
    n, c, h, w = t.shape
    at, ast = pooled_attention(t, p.temperature), pooled_attention(s, p.temperature)
    if p.recipe == "mmrazor":
        m_s = ((at["as"] + ast["as"]) / 2).detach()
        m_c = ((at["ac"] + ast["ac"]) / 2).detach()
        gs_s = mod["adapt_spatial"](ast["gs"].unsqueeze(1)).squeeze(1)
        gc_s = mod["adapt_channel"](ast["gc"])
        att_c, att_s = (gc_s - at["gc"]).abs().sum(), (gs_s - at["gs"]).abs().sum()
    else:
        m_s = (h * w * F.softmax(((at["gs"] + ast["gs"]) / p.temperature).reshape(n, -1), 1).reshape(n, h, w)).detach()
        m_c = (c * F.softmax((at["gc"] + ast["gc"]) / p.temperature, 1)).detach()
        att_c, att_s = (ast["ac"] - at["ac"]).abs().sum(), (ast["as"] - at["as"]).abs().sum()
    feat = ((t - s).pow(2) * m_s.unsqueeze(1) * m_c[:, :, None, None]).sum().clamp_min(1e-12).sqrt()
    nl = (mod["nl_t"](t) - mod["nl_s"](s)).pow(2).sum().clamp_min(1e-12).sqrt()
    return {"feat": p.alpha * feat, "att_channel": p.gamma_channel * att_c, "att_spatial": p.gamma_spatial * att_s,
            "nonlocal": p.beta * nl}


@DET_METHODS.register("fbkd")
class DetFBKD(LevelDistiller):
    """Attention-guided + non-local distillation on P2-P5 (mmrazor's FBKD recipe by default)."""

    Params = DetFBKDParams
    main_weights = ("alpha", "gamma_channel", "gamma_spatial", "beta")
    prefix = "fbkd"

    def make_level(self, s_ch, t_ch):
        """Connector, adaptation layers (mmrazor recipe) and the two non-local blocks."""
        mt = self.params.nl_max_tokens
        return nn.ModuleDict({"align": connector(s_ch, t_ch), "adapt_spatial": nn.Conv2d(1, 1, 1),
                              "adapt_channel": nn.Linear(t_ch, t_ch), "nl_s": NonLocal2d(t_ch, mt),
                              "nl_t": NonLocal2d(t_ch, mt)})

    def distill(self, feats, t_feats, t_stem, il, targets):
        """The four terms summed over levels, reported separately."""
        out: dict[str, torch.Tensor] = {}
        for k in self.levels:
            mod = self.per_level[k]
            for name, v in fbkd_level_losses(mod["align"](feats[k].float()), t_feats[k].float(), mod,
                                             self.params).items():
                out[f"{self.prefix}_{name}"] = out.get(f"{self.prefix}_{name}", 0.0) + v
        return out
