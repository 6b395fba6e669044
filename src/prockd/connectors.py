"""Connectors shared by the feature-based baselines: layouts, grids and widths made to match.

Teacher and student features arrive as token maps ``B x N x C`` with a :class:`~prockd.features.Layout`
(ViT tokens with prefix tokens, Swin NHWC stages and CNN NCHW stages all look alike). The baselines
compare them as ``B x C x h x w`` maps on the *student's* grid:

- :func:`student_map` / :func:`teacher_map`: drop prefix tokens, resample the teacher's grid to the
  student's (area pooling down, bilinear up), reshape to maps (ViT tokens <-> CNN maps);
- :class:`MapConnector`: the learnable width adapter ``C_s -> C_t`` on maps (1x1 conv, optionally
  with BatchNorm as in AB/OFD, or 3x3 conv + BN), trained with the student, dropped at deployment;
- :class:`VectorConnector`: the same for pooled vectors (linear, optionally with BatchNorm).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from prockd.features import Layout, resample_tokens, tokens_to_map

ConnectorKind = Literal["conv1x1", "conv1x1_bn", "conv3x3_bn", "identity"]


def student_map(tokens: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Student tokens as a ``B x C x h x w`` map on the student's own grid (prefix tokens dropped)."""
    return tokens_to_map(tokens, layout)


def teacher_map(tokens: torch.Tensor, layout: Layout, size: tuple[int, int], dtype=None) -> torch.Tensor:
    """Teacher tokens resampled to ``size`` (the student's grid) as a ``B x C x h x w`` map."""
    t, lay = resample_tokens(tokens, layout, size)
    m = tokens_to_map(t, lay)
    return m if dtype is None else m.to(dtype)


def pooled(tokens: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Average of the grid tokens (``B x C``): a model-agnostic global feature."""
    return tokens[:, layout.prefix:].mean(1)


class MapConnector(nn.Module):
    """Width adapter on maps, ``B x C_in x h x w -> B x C_out x h x w``.

    ``conv1x1`` is the FitNets regressor; ``conv1x1_bn`` the AB/OFD connector (conv + BatchNorm,
    Heo et al. 2019); ``conv3x3_bn`` a spatially aware variant; ``identity`` needs equal widths.
    """

    def __init__(self, in_ch: int, out_ch: int, kind: ConnectorKind = "conv1x1"):
        super().__init__()
        if kind == "identity":
            if in_ch != out_ch:
                raise ValueError(f"identity connector needs equal widths, got {in_ch} -> {out_ch}")
            self.net = nn.Identity()
        elif kind == "conv1x1":
            self.net = nn.Conv2d(in_ch, out_ch, 1)
        elif kind == "conv1x1_bn":
            self.net = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))
        elif kind == "conv3x3_bn":
            self.net = nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch))
        else:
            raise ValueError(f"unknown connector kind {kind!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Adapted map."""
        return self.net(x)


class VectorConnector(nn.Module):
    """Width adapter on pooled features ``B x D_in -> B x D_out`` (linear, optionally + BatchNorm)."""

    def __init__(self, in_dim: int, out_dim: int, bn: bool = False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, out_dim), nn.BatchNorm1d(out_dim)) if bn else nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Adapted vector."""
        return self.net(x)
