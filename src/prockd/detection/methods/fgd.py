"""FGD on FPN levels (Yang et al., "Focal and Global Knowledge Distillation for Detectors", CVPR 2022),
as the authors' repository (yzd-v/FGD) defines it, on P2-P5:

- attention of a map ``F`` (``N x C x H x W``) at temperature T: spatial ``A^S = HW · softmax(mean_c|F| / T)``,
  channel ``A^C = C · softmax(mean_hw|F| / T)``;
- ground-truth masks on each level's grid: boxes scaled to the grid (floor / ceil), the foreground mask holds
  ``1 / (box area in cells)`` (the largest where boxes overlap), the background mask ``1`` off the boxes,
  normalised by its number of cells (indexed [row = y, column = x]; the original code's H/W swap is not kept);
- focal loss ``α Σ M_fg A^S_t A^C_t (S - T)² / N + β Σ M_bg A^S_t A^C_t (S - T)² / N``;
- attention loss ``γ (Σ|A^C_s - A^C_t| / N + Σ|A^S_s - A^S_t| / N)``;
- global loss ``λ Σ (GcBlock_s(S) - GcBlock_t(T))² / N`` (GcBlock: attention pooling + channel-add transform).

Defaults α 5e-5, β 2.5e-5, γ 5e-5, λ 5e-7, T 0.5 (Faster R-CNN); the authors clip gradients at 35
(``train.clip_grad``).
"""
from __future__ import annotations

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


class DetFGDParams(LevelParams):
    """FGD weights and temperature."""

    alpha: float = Field(5e-5, ge=0)
    beta: float = Field(2.5e-5, ge=0)
    gamma: float = Field(5e-5, ge=0)
    lambda_global: float = Field(5e-7, ge=0)
    temperature: float = Field(0.5, gt=0)


def fgd_attention(f: torch.Tensor, temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(spatial ``N x H x W``, channel ``N x C``) attention."""
    n, c, h, w = f.shape
    a = f.abs()
    sp = h * w * F.softmax((a.mean(1) / temp).reshape(n, -1), dim=1).reshape(n, h, w)
    ch = c * F.softmax(a.mean((2, 3)) / temp, dim=1)
    return sp, ch


def fgd_masks(boxes: list[torch.Tensor], padded: tuple[int, int],
              grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(foreground, background) masks ``N x H x W`` of boxes (``xyxy`` on the padded batch of size ``padded``)
    on a level grid ``grid`` = (H, W). Each image's boxes are rasterised together (``M x H x W``, a box's
    cells hold its ``1 / area``; the maximum over boxes), not box by box."""
    h, w = grid
    fg = torch.zeros(len(boxes), h, w)
    rows, cols = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
    for i, b in enumerate(boxes):
        b = b.detach().float().cpu()
        if len(b):
            x0 = torch.floor(b[:, 0] / padded[1] * w).long().clamp(0, w - 1)[:, None, None]
            x1 = torch.ceil(b[:, 2] / padded[1] * w).long().clamp(0, w - 1)[:, None, None]
            y0 = torch.floor(b[:, 1] / padded[0] * h).long().clamp(0, h - 1)[:, None, None]
            y1 = torch.ceil(b[:, 3] / padded[0] * h).long().clamp(0, h - 1)[:, None, None]
            inside = (rows >= y0) & (rows <= y1) & (cols >= x0) & (cols <= x1)
            area = 1.0 / ((y1 + 1 - y0) * (x1 + 1 - x0)).float()
            fg[i] = (inside * area).amax(0)
    bg = (fg <= 0).float()
    cells = bg.sum((1, 2), keepdim=True)
    return fg, torch.where(cells > 0, bg / cells.clamp_min(1), bg)


class GcBlock(nn.Module):
    """Global context block (Cao et al. 2019): softmax attention pooling + bottleneck channel-add transform."""

    def __init__(self, c: int, ratio: float = 0.5):
        super().__init__()
        r = max(1, int(c * ratio))
        self.mask = nn.Conv2d(c, 1, 1)
        self.add = nn.Sequential(nn.Conv2d(c, r, 1), nn.LayerNorm([r, 1, 1]), nn.ReLU(inplace=True), nn.Conv2d(r, c, 1))
        nn.init.zeros_(self.add[-1].weight)
        nn.init.zeros_(self.add[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x + transform(Σ_j softmax(mask(x))_j x_j)``."""
        n, c, h, w = x.shape
        att = F.softmax(self.mask(x).reshape(n, 1, h * w), dim=-1)  # N x 1 x HW
        ctx = torch.bmm(x.reshape(n, c, h * w), att.transpose(1, 2)).reshape(n, c, 1, 1)
        return x + self.add(ctx)


def fgd_level_loss(s, t, fg, bg, gc_s, gc_t, p: DetFGDParams) -> dict[str, torch.Tensor]:
    """The four FGD terms (weighted) of one level; ``s`` already aligned to the teacher's width."""
    n = s.shape[0]
    sp_t, ch_t = fgd_attention(t, p.temperature)
    sp_s, ch_s = fgd_attention(s, p.temperature)
    w = sp_t.unsqueeze(1) * ch_t[:, :, None, None]
    d2 = (s - t).pow(2) * w
    fg_loss = (d2 * fg.unsqueeze(1)).sum() / n
    bg_loss = (d2 * bg.unsqueeze(1)).sum() / n
    att = (ch_s - ch_t).abs().sum() / n + (sp_s - sp_t).abs().sum() / n
    glob = (gc_s(s) - gc_t(t)).pow(2).sum() / n
    return {"fg": p.alpha * fg_loss, "bg": p.beta * bg_loss, "att": p.gamma * att, "global": p.lambda_global * glob}


@DET_METHODS.register("fgd")
class DetFGD(LevelDistiller):
    """Focal and global distillation on P2-P5 (uses the ground-truth boxes)."""

    Params = DetFGDParams
    main_weights = ("alpha", "beta", "gamma", "lambda_global")
    boxes_free = False  # its focal masks are the ground-truth boxes: an unlabelled transfer set is left out

    def make_level(self, s_ch, t_ch):
        """Connector + the student's and the teacher's GcBlocks."""
        return nn.ModuleDict({"align": connector(s_ch, t_ch), "gc_s": GcBlock(t_ch), "gc_t": GcBlock(t_ch)})

    def distill(self, feats, t_feats, t_stem, il, targets):
        """The four terms summed over levels, reported separately."""
        out: dict[str, torch.Tensor] = {}
        padded = tuple(il.tensors.shape[-2:])
        boxes = [t["boxes"] for t in targets]
        for k in self.levels:
            mod, s, t = self.per_level[k], feats[k].float(), t_feats[k].float()
            fg, bg = fgd_masks(boxes, padded, tuple(s.shape[-2:]))
            terms = fgd_level_loss(mod["align"](s), t, fg.to(s.device), bg.to(s.device), mod["gc_s"], mod["gc_t"],
                                   self.params)
            for name, v in terms.items():
                out[f"fgd_{name}"] = out.get(f"fgd_{name}", 0.0) + v
        return out


