"""The detection distiller interface: one training forward = the student detector's own losses plus the
method's losses on FPN levels, teacher and student on one preprocessed batch."""
from __future__ import annotations

from collections import OrderedDict
from typing import ClassVar

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, field_validator

from prockd.core.distiller import DistillerBase
from prockd.core.registry import Registry
from prockd.detection.models import LEVELS, DetTeacher
from prockd.errors import ProckdError

DET_METHODS: Registry = Registry("detection method")


class LevelParams(BaseModel):
    """Parameters every FPN-level method has: which levels it distils (``'0'..'3'`` = P2..P5, ``'pool'`` = P6)."""

    model_config = ConfigDict(extra="forbid")
    levels: list[str] | None = None  # None: the method's public-config default

    @field_validator("levels")
    @classmethod
    def _known(cls, v):
        if v is not None:
            bad = [x for x in v if x not in LEVELS]
            if bad or not v:
                raise ValueError(f"levels must be a non-empty subset of {list(LEVELS)}, got {v}")
        return v


class WeightedLevelParams(LevelParams):
    """One loss weight per level (summed over levels)."""

    weight: float = Field(1.0, ge=0)


def connector(s_ch: int, t_ch: int) -> nn.Module:
    """1x1 conv from the student's FPN width to the teacher's, identity when they are equal (FPNs: 256 = 256)."""
    return nn.Identity() if s_ch == t_ch else nn.Conv2d(s_ch, t_ch, 1)


class DetDistiller(DistillerBase):
    """One detection method (:class:`prockd.core.distiller.DistillerBase`). ``forward(images, targets) -> {loss name: loss}`` in training.

    ``images`` are a list of ``3 x H x W`` tensors in [0, 1], ``targets`` torchvision target dicts. The
    student's transform runs once; its normalised, padded ``images.tensors`` go to the student's backbone
    and to the frozen teacher's backbone + FPN (:meth:`DetTeacher.pyramid`). The teacher is held outside
    the module tree.
    """

    Params: ClassVar[type[BaseModel]] = LevelParams
    default_levels: ClassVar[tuple[str, ...]] = ("0", "1", "2", "3")
    # whether the method's terms are defined without ground-truth boxes (they then also read data.unlabeled)
    boxes_free: ClassVar[bool] = True

    def __init__(self, student, teacher: DetTeacher | None, params: BaseModel, num_classes: int):
        super().__init__(student, teacher, params, num_classes)
        self.levels = tuple(getattr(params, "levels", None) or self.default_levels)
        self.s_width = student.backbone.out_channels
        self.t_width = teacher.width if teacher is not None else self.s_width
        self._stats: dict[str, float] = {}
        # the student's RPN proposals of the labelled batch being distilled (RoI-level distillers read them); None
        # for an unlabelled batch
        self._last_proposals: list[torch.Tensor] | None = None
        self.pyramid_cache = None  # a models.PyramidCache when train.cache_teacher (set by engine.build)

    @property
    def reads_unlabeled(self) -> bool:
        """Whether an unlabelled transfer set (``data.unlabeled``) feeds this method: it has a teacher and its
        terms need no ground-truth boxes."""
        return self.teacher is not None and self.boxes_free

    def features(self, tensors: torch.Tensor) -> OrderedDict:
        """The student's pyramid (ProC-KD adds FA here: what the deployed detector computes)."""
        return self.student.backbone(tensors)

    def detection_losses(self, il, feats: OrderedDict, targets, suffix: str = "", rpn=None,
                         roi_heads=None) -> dict[str, torch.Tensor]:
        """The RPN and RoI-head losses on ``feats``: the student's heads, or the ``rpn`` / ``roi_heads`` given
        (callables with the same signatures)."""
        proposals, rpn_losses = (rpn or self.student.rpn)(il, feats, targets)
        if rpn is None:
            self._last_proposals = proposals  # the student's own proposals of this batch (RoI-level distillers)
        _, roi = (roi_heads or self.student.roi_heads)(feats, proposals, il.image_sizes, targets)
        return {k + suffix: v for k, v in {**rpn_losses, **roi}.items()}

    def forward(self, images: list[torch.Tensor], targets: list[dict], u_images: list[torch.Tensor] | None = None,
                u_targets: list[dict] | None = None) -> dict[str, torch.Tensor]:
        """Training losses (detection + distillation); with an unlabelled batch (``u_images``, box-less
        ``u_targets`` carrying image ids) also the distillation terms on it, named ``<term>_u``."""
        il, targets = self.student.transform(images, targets)
        feats = self.features(il.tensors)
        losses = self.detection_losses(il, feats, targets)
        if self.teacher is not None:
            t_feats, t_stem = self.teacher_pyramid(il, [tuple(f.shape[-2:]) for f in feats.values()], targets)
            losses.update(self.distill(feats, t_feats, t_stem, il, targets))
            if u_images:
                self._last_proposals = None  # the labelled batch's proposals are not this batch's
                il_u, u_targets = self.student.transform(u_images, u_targets)
                feats_u = self.features(il_u.tensors)
                t_u, t_stem_u = self.teacher_pyramid(il_u, [tuple(f.shape[-2:]) for f in feats_u.values()], u_targets)
                losses.update({f"{k}_u": v for k, v in self.distill_unlabeled(feats_u, t_u, t_stem_u, il_u,
                                                                                u_targets).items()})
        return losses

    def distill_unlabeled(self, feats: OrderedDict, t_feats: OrderedDict, t_stem: torch.Tensor, il,
                          targets) -> dict[str, torch.Tensor]:
        """The method's losses on an unlabelled batch (default: :meth:`distill`; only called when
        :attr:`boxes_free`)."""
        return self.distill(feats, t_feats, t_stem, il, targets)

    def teacher_pyramid(self, il, sizes: list[tuple[int, int]], targets) -> tuple[OrderedDict, torch.Tensor]:
        """The teacher's pyramid of the batch: through :attr:`pyramid_cache` when set (keys: image id, flip,
        resized, padded and level sizes), else live."""
        if self.pyramid_cache is None or not self.training or not all("image_id" in t for t in targets):
            return self.teacher.pyramid(il.tensors, sizes)
        padded, levels = tuple(il.tensors.shape[-2:]), tuple(sizes)
        keys = [(int(t["image_id"]), bool(t.get("flipped", False)), tuple(hw), padded, levels)
                for t, hw in zip(targets, il.image_sizes)]
        return self.pyramid_cache(il.tensors, sizes, keys)

    def distill(self, feats: OrderedDict, t_feats: OrderedDict, t_stem: torch.Tensor, il,
                targets) -> dict[str, torch.Tensor]:
        """The method's losses (default: none)."""
        return {}

    def step_stats(self) -> dict[str, float]:
        """Diagnostics of the last training forward (default: none)."""
        return self._stats

    def export(self) -> nn.Module:
        """The deployable detector (no teacher, no training-only modules)."""
        return self.student

    @torch.no_grad()
    def predict(self, images: list[torch.Tensor]) -> list[dict]:
        """Detections of the deployed detector (``boxes`` xyxy, ``labels`` 1..K, ``scores``)."""
        m = self.export()
        was = m.training
        m.eval()
        out = m(images)
        m.train(was)
        return out


class LevelDistiller(DetDistiller):
    """A method with one loss module per distilled level; subclasses implement :meth:`make_level` and
    :meth:`level_loss` and name their loss ``loss_name``."""

    loss_name: ClassVar[str] = "kd"

    def __init__(self, student, teacher, params, num_classes):
        super().__init__(student, teacher, params, num_classes)
        if teacher is None:
            raise ProckdError(f"detection method '{self.name}' needs a 'teacher' section")
        self.per_level = nn.ModuleDict({k: self.make_level(self.s_width, self.t_width) for k in self.levels})

    def make_level(self, s_ch: int, t_ch: int) -> nn.Module:
        """The trainable modules of one level (default: a connector)."""
        return connector(s_ch, t_ch)

    def level_loss(self, mod: nn.Module, s: torch.Tensor, t: torch.Tensor, level: str, il, targets) -> torch.Tensor:
        """The loss of one level (weighted)."""
        raise NotImplementedError

    def distill(self, feats, t_feats, t_stem, il, targets):
        """Sum over the distilled levels (float32)."""
        total = sum(self.level_loss(self.per_level[k], feats[k].float(), t_feats[k].float(), k, il, targets)
                    for k in self.levels)
        return {self.loss_name: total}
