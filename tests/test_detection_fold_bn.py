"""Frozen BatchNorms folded into their convolutions: the same detector, parameters and state dict."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torchvision.ops.misc import FrozenBatchNorm2d

from prockd.detection.config import DetectorConfig
from prockd.detection.models import build_detector, fold_frozen_bn, unfold_frozen_bn


def _unfolded(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every folded pair back to torch's own convolution and torchvision's frozen norm."""
    return unfold_frozen_bn(copy.deepcopy(model))


def test_folding_keeps_the_function_gradients_and_state_dict():
    cfg = DetectorConfig(backbone="builtin:mobilenet_v2", fpn_channels=16, representation_size=32, min_size=[64],
                         max_size=64, anchor_sizes=[8, 16, 32, 64, 128], norm="frozen", trainable_layers=5)
    folded = build_detector(cfg, 3)
    names = {type(m).__name__ for m in folded.backbone.modules()}
    assert {"_FoldedConv2d", "_FoldedFrozenBN"} <= names
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # BatchNorm statistics of a trained network, not the identity of a fresh one
        for m in folded.modules():
            if isinstance(m, FrozenBatchNorm2d):
                for t in (m.weight, m.bias, m.running_mean):
                    t.copy_(torch.randn(t.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.2)
    folded.double()  # float64: the two computations agree to float order, far below any tolerance
    plain = _unfolded(folded)
    assert not any(type(m).__name__.startswith("_Folded") for m in plain.modules())
    assert folded.state_dict().keys() == plain.state_dict().keys()
    x = torch.rand(2, 3, 64, 64, generator=g, dtype=torch.float64)
    a, b = folded.backbone(x), plain.backbone(x)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-9)
    sa = sum((v * torch.linspace(-1, 1, v.numel(), dtype=torch.float64).view(v.shape)).sum() for v in a.values())
    sb = sum((v * torch.linspace(-1, 1, v.numel(), dtype=torch.float64).view(v.shape)).sum() for v in b.values())
    pa = dict(folded.backbone.named_parameters())
    pb = dict(plain.backbone.named_parameters())
    ga = torch.autograd.grad(sa, [p for p in pa.values() if p.requires_grad])
    gb = torch.autograd.grad(sb, [pb[k] for k, p in pa.items() if p.requires_grad])
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-9)
    # a checkpoint written by one loads into the other (and into a detector built with the norm trained)
    plain.load_state_dict(folded.state_dict())
    build_detector(cfg.model_copy(update={"norm": "train"}), 3).load_state_dict(folded.state_dict(), strict=False)


def test_fold_only_takes_a_conv_directly_followed_by_a_frozen_norm():
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4), nn.ReLU(), FrozenBatchNorm2d(4),
                        nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5), nn.Conv2d(5, 6, 1, bias=True), FrozenBatchNorm2d(6))
    assert fold_frozen_bn(seq) == 2
    assert [type(m).__name__ for m in seq] == ["_FoldedConv2d", "_FoldedFrozenBN", "ReLU", "FrozenBatchNorm2d",
                                               "Conv2d", "BatchNorm2d", "_FoldedConv2d", "_FoldedFrozenBN"]
    x = torch.rand(1, 3, 8, 8)
    seq.eval()
    torch.testing.assert_close(seq(x), _unfolded(seq)(x))
