"""The distiller interface shared by every method."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict

from prockd.registry import Registry

METHODS: Registry = Registry("method")


class NoParams(BaseModel):
    """A method without parameters."""

    model_config = ConfigDict(extra="forbid")


class Distiller(nn.Module):
    """One distillation method. ``forward(images, targets) -> (student logits, {loss name: loss})``.

    ``images`` are raw batches in [0, 1]; each network applies its own transform. The frozen teacher
    is held outside the module tree (never in ``state_dict`` nor ``learnable_parameters``).
    ``teacher_feats`` may carry precomputed teacher features (the feature cache).
    """

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = NoParams
    needs_teacher: ClassVar[bool] = True

    def __init__(self, student, teacher, params: BaseModel, num_classes: int):
        super().__init__()
        self.student = student
        object.__setattr__(self, "teacher", teacher)
        self.params = params
        self.num_classes = num_classes

    def teacher_features(self, images: torch.Tensor, teacher_feats: dict | None) -> dict:
        """Precomputed features when given, else a live frozen-teacher forward."""
        if teacher_feats is not None:
            return teacher_feats
        return self.teacher.extract(images)

    def prepare(self, teacher_feats, seed: int = 0) -> None:
        """Data-dependent initialisation; ``teacher_feats()`` returns teacher features of the first training
        images and is only called by methods that need them (default: nothing to do)."""

    def forward(self, images: torch.Tensor, targets: torch.Tensor, teacher_feats: dict | None = None):
        """Training forward: (student logits, dict of named losses)."""
        raise NotImplementedError

    def learnable_parameters(self) -> list[nn.Parameter]:
        """Everything the optimiser updates: the student and the method's own modules."""
        return [p for p in self.parameters() if p.requires_grad]

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Evaluation logits by output name; ``"deployed"`` is what :meth:`export` predicts."""
        logits = self.student(images)
        return {"deployed": logits, "plain": logits}

    def export(self) -> nn.Module:
        """The deployable student (no teacher, no training-only modules)."""
        from prockd.deploy import DeployedStudent

        return DeployedStudent(self.student, None, None, "plain")
