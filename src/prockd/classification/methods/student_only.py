"""Student-only baseline: the student trained with cross-entropy alone (no teacher); optionally Menon et al.'s
logit-adjusted cross-entropy (ICLR 2021), the long-tail control for ProC-KD's ``logit_adjust``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from prockd.classification.methods.base import METHODS, Distiller


class StudentOnlyParams(BaseModel):
    """Student-only's one option."""

    model_config = ConfigDict(extra="forbid")
    # τ of the logit-adjusted CE(z_s + τ log π, y) (Menon et al., "Long-tail learning via logit adjustment",
    # ICLR 2021), π the labelled set's class frequencies; 0: plain cross-entropy
    logit_adjust: float = Field(0.0, ge=0)


@METHODS.register("student_only")
class StudentOnly(Distiller):
    """Cross-entropy only; the reference every distillation method is compared with."""
    main_weights = ()

    needs_teacher = False
    Params = StudentOnlyParams
    derived_buffers = ("log_prior",)  # set from the data before every run: a checkpoint without it still resumes

    def __init__(self, student, teacher, params: StudentOnlyParams, num_classes: int):
        super().__init__(student, teacher, params, num_classes)
        self.register_buffer("log_prior", torch.zeros(num_classes))

    @torch.no_grad()
    def set_class_counts(self, counts: torch.Tensor) -> None:
        """The labelled set's class log-frequencies (for ``logit_adjust``)."""
        counts = counts.double().clamp_min(1).cpu()
        self.log_prior.copy_((counts / counts.sum()).log().to(self.log_prior))

    def forward(self, images, targets, teacher_feats=None):
        """(logits, {"ce": CE(z_s + τ log π, y)}); τ = 0: the plain CE."""
        logits = self.student(images)
        adj = self.params.logit_adjust * self.log_prior.to(logits.dtype)
        return logits, {"ce": F.cross_entropy(logits + adj, targets)}
