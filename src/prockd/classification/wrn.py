"""CIFAR-style wide residual networks (the paper's Table 4 same-task protocol).

Zagoruyko, Komodakis, "Wide Residual Networks", BMVC 2016: a 3x3 stem (16 channels), three groups
of ``n = (depth - 4) / 6`` pre-activation basic blocks with widths ``16k, 32k, 64k`` (strides 1, 2,
2), final BN-ReLU, global average pooling and a linear classifier. WRN-40-2 (teacher), WRN-40-1,
WRN-16-2 and WRN-16-1 (students) on 100 classes have 2.26 M, 0.57 M, 0.70 M and 0.18 M parameters.
The timm-style interface (``forward_features`` / ``forward_head``, ``num_features``) lets them be
students as well as teachers. Names: ``builtin:wrn_40_2`` etc., or ``builtin:wrn`` with ``depth``
and ``widen_factor`` kwargs.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from prockd.errors import ProckdError


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 with an identity or 1x1-conv shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.act1 = nn.ReLU()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act2 = nn.ReLU()
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.equal = c_in == c_out and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block."""
        o = self.act1(self.bn1(x))
        y = self.conv2(self.drop(self.act2(self.bn2(self.conv1(o)))))
        return y + (x if self.equal else self.shortcut(o))


class WideResNet(nn.Module):
    """WRN-depth-k for small (32 px) images."""

    def __init__(self, depth: int = 40, widen_factor: int = 2, num_classes: int = 100, in_chans: int = 3,
                 drop_rate: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        groups = []
        for g in range(3):
            blocks = [WideBasicBlock(widths[g] if i == 0 else widths[g + 1], widths[g + 1],
                                     (1 if g == 0 else 2) if i == 0 else 1, drop_rate) for i in range(n)]
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.norm = nn.BatchNorm2d(widths[3])
        self.act = nn.ReLU()
        self.num_features = widths[3]
        self.fc = nn.Linear(widths[3], num_classes)
        self.feature_info = [{"module": m, "num_chs": c} for m, c in zip(("block1", "block2", "block3"), widths[1:])]
        self.pretrained_cfg = {"input_size": (in_chans, 32, 32), "mean": (0.5071, 0.4865, 0.4409),
                               "std": (0.2673, 0.2564, 0.2762)}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``B x 64k x h/4 x w/4`` map after the final BN-ReLU."""
        return self.act(self.norm(self.block3(self.block2(self.block1(self.stem(x))))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pooling, then the classifier unless ``pre_logits``."""
        x = x.mean((2, 3))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits."""
        return self.forward_head(self.forward_features(x))


def wide_resnet(pretrained: bool = False, num_classes: int | None = None, depth: int = 40, widen_factor: int = 2,
                **kwargs) -> WideResNet:
    """A WRN; no hub weights exist for these, so ``pretrained`` needs ``checkpoint`` instead."""
    if pretrained:
        raise ProckdError("builtin WRN models have no downloadable weights: set pretrained: false and give "
                          "'checkpoint' (e.g. a teacher trained with `prockd pretrain-teacher`)")
    return WideResNet(depth, widen_factor, num_classes if num_classes is not None else 100, **kwargs)


def _named(depth: int, k: int):
    def make(pretrained: bool = False, num_classes: int | None = None, **kwargs) -> WideResNet:
        return wide_resnet(pretrained, num_classes, depth, k, **kwargs)
    make.__doc__ = f"WRN-{depth}-{k}."
    return make


WRN_BUILTINS = {"wrn": wide_resnet, **{f"wrn_{d}_{k}": _named(d, k) for d, k in ((40, 2), (40, 1), (16, 2), (16, 1))}}
