"""The distiller interface shared by every method."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

from prockd.classification.deploy import DeployedStudent
from prockd.connectors import MapConnector, pooled, student_map, teacher_map
from prockd.core.distiller import DistillerBase
from prockd.core.registry import Registry
from prockd.errors import ProckdError

METHODS: Registry = Registry("method")


class NoParams(BaseModel):
    """A method without parameters."""

    model_config = ConfigDict(extra="forbid")


class Distiller(DistillerBase):
    """One classification distillation method (:class:`prockd.core.distiller.DistillerBase`).
    ``forward(images, targets) -> (student logits, {loss name: loss})``.

    ``images`` are raw batches in [0, 1]; each network applies its own transform. The frozen teacher
    is held outside the module tree (never in ``state_dict`` nor ``learnable_parameters``).
    ``teacher_feats`` may carry precomputed teacher features (the feature cache).
    """

    Params: ClassVar[type[BaseModel]] = NoParams
    # logit methods (KD, DKD) compare class i of the teacher with class i of the student
    needs_shared_label_space: ClassVar[bool] = False
    # whether the method reads the student's embedding-layer output (a hook on its embedding tap)
    uses_student_embed: ClassVar[bool] = False
    # what a live teacher pass must produce (None: taps, logits and embedding)
    teacher_keys: ClassVar[tuple[str, ...] | None] = None
    deployed_prefixes: ClassVar[tuple[str, ...] | None] = ("student.",)  # :meth:`export`: the student alone

    def __init__(self, student, teacher, params: BaseModel, num_classes: int):
        super().__init__(student, teacher, params, num_classes)
        if self.needs_shared_label_space:
            t_classes = teacher.num_outputs
            if not getattr(params, "shared_label_space", False) or t_classes != num_classes:
                raise ProckdError(
                    f"method '{self.name}' needs teacher and student to share one label space (teacher has "
                    f"{t_classes} classes, the student task {num_classes}); this is a cross-task config: use "
                    "prockd or a feature/relation baseline (fitnets, rkd, ab, ofd, ...), or set "
                    "method.params.shared_label_space=true when teacher class i is student class i")

    def function_matching(self) -> str:
        """``none``, ``mixup`` or ``cutmix``: whether every step also feeds mixtures of the batch's images with
        no label (function matching, Beyer et al., "Knowledge distillation: a good teacher is patient and
        consistent", CVPR 2022): CE ignores them, the distillation terms see them, the teacher runs live on
        exactly those pixels. The ``function_matching`` parameter of the methods that distil logits."""
        return getattr(self.params, "function_matching", "none")

    def teacher_features(self, images: torch.Tensor, teacher_feats: dict | None) -> dict:
        """Precomputed features when given, else a live frozen-teacher forward."""
        if teacher_feats is not None:
            return teacher_feats
        return self.teacher.extract(images, self.teacher_keys)

    def pooled_features(self, images: torch.Tensor, teacher_feats: dict | None):
        """(student logits, student pre-logits features ``B x D_s``, teacher taps averaged over the grid
        ``B x sum(C_t)``, both in float32): the inputs of the methods that compare global features."""
        tok, lay, _ = self.student.features(images)
        z_s = self.student.head(tok, lay)
        s = self.student.head(tok, lay, pre_logits=True).float()
        t = pooled(self.teacher_features(images, teacher_feats)["taps"], self.teacher.tap_layout).float()
        return z_s, s, t

    def prepare(self, teacher_feats, seed: int = 0, labelled=None) -> None:
        """Data-dependent initialisation; ``teacher_feats()`` returns teacher features of the first training
        images, ``labelled()`` (teacher features, labels) of every labelled training item (each stored view);
        each is only called by methods that need it (default: nothing to do)."""

    def set_class_counts(self, counts: torch.Tensor) -> None:
        """The labelled training set's images per class (``num_classes`` counts), given before :meth:`prepare`;
        methods that use class priors keep them (default: nothing to do)."""

    def forward(self, images: torch.Tensor, targets: torch.Tensor, teacher_feats: dict | None = None):
        """Training forward: (student logits, dict of named losses)."""
        raise NotImplementedError

    @torch.no_grad()
    def diagnostics(self, images: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Diagnostics on held-out images with a live teacher (logged as ``val/<name>``); default: none."""
        return {}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Evaluation logits by output name; ``"deployed"`` is what :meth:`export` predicts."""
        logits = self.student(images)
        return {"deployed": logits, "plain": logits}

    def export(self) -> nn.Module:
        """The deployable student (no teacher, no training-only modules)."""
        return DeployedStudent(self.student, None, None, "plain")


class FeatureDistiller(Distiller):
    """A feature-map baseline: ``L = CE(z_s, y) + λ · loss(r(S), T)``.

    ``S`` is the student's last feature map, ``r`` a :class:`~prockd.connectors.MapConnector` to the
    teacher's width, ``T`` the teacher's taps (concatenated on the fusion grid) resampled to the
    student's grid. Subclasses set ``connector`` and implement :meth:`feature_loss`.
    """

    connector_kind: ClassVar[str] = "conv1x1"
    loss_name: ClassVar[str] = "feat"

    def __init__(self, student, teacher, params: BaseModel, num_classes: int):
        super().__init__(student, teacher, params, num_classes)
        self.t_width = sum(teacher.tap_widths)
        self.connector = MapConnector(student.width, self.t_width, self.connector_kind)

    def feature_maps(self, images, teacher_feats):
        """(student logits, connected student map ``B x C_t x h x w``, teacher map on the student grid)."""
        tok, lay, _ = self.student.features(images)
        z_s = self.student.head(tok, lay)
        s = self.connector(student_map(tok, lay))
        tf = self.teacher_features(images, teacher_feats)
        t = teacher_map(tf["taps"], self.teacher.tap_layout, (lay.h, lay.w), dtype=s.dtype)
        return z_s, s, t

    def feature_loss(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The method's loss between the connected student map and the teacher map."""
        raise NotImplementedError

    def forward(self, images, targets, teacher_feats=None):
        """(z_s, {"ce", loss_name})."""
        z_s, s, t = self.feature_maps(images, teacher_feats)
        return z_s, {"ce": F.cross_entropy(z_s, targets),
                     self.loss_name: self.params.weight * self.feature_loss(s, t)}
