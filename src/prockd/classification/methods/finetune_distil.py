"""Fine-tune, then distil: the teacher fine-tuned on the student's labelled task, its logits distilled.

Vemulapalli, Yang, Ghahremani, ..., Tuzel, "Knowledge Transfer from Vision Foundation Models for Efficient Training
of Small Task-specific Models" (task-oriented knowledge transfer), ICML 2024. Stage 1 (``teacher.finetune``, its
defaults when the section is absent; :mod:`prockd.classification.finetune`) fine-tunes a copy of the teacher with a
new head of the task's classes on the labelled set; stage 2 trains the student with Hinton et al.'s loss towards
that teacher's logits, ``L = α_ce CE(z_s, y) + α_kd T² KL(softmax(z_t / T) ‖ softmax(z_s / T))``, on every image a
step sees: the labelled views, the unlabelled transfer set where given, and function matching's mixtures (Beyer et
al., CVPR 2022) with ``function_matching``. The cross-entropy skips the images without labels.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from prockd.classification.methods.base import METHODS, Distiller, MethodParams
from prockd.errors import ProckdError
from prockd.losses import kl_div


class FinetuneDistilParams(MethodParams):
    """Stage 2's loss weights and temperature (stage 1's recipe is ``teacher.finetune``)."""

    temperature: float = Field(4.0, gt=0)
    alpha_ce: float = Field(1.0, ge=0)
    alpha_kd: float = Field(1.0, ge=0)
    # function matching (Beyer et al., CVPR 2022): the KL also on mixup / cutmix mixtures of the batch's images
    function_matching: Literal["none", "mixup", "cutmix"] = "none"


@METHODS.register("finetune_distil")
class FinetuneDistil(Distiller):
    """Vemulapalli et al. (ICML 2024): KD from the teacher fine-tuned on the task (stage 1 ``teacher.finetune``)."""

    main_weights = ("alpha_kd",)
    Params = FinetuneDistilParams
    teacher_keys = ("logits",)
    needs_finetune = True  # the engine fine-tunes the teacher first (teacher.finetune's defaults when unset)

    def __init__(self, student, teacher, params, num_classes):
        super().__init__(student, teacher, params, num_classes)
        if teacher.num_outputs != num_classes:
            raise ProckdError(f"finetune_distil distils a teacher fine-tuned on the task: its head has "
                              f"{teacher.num_outputs} classes, the task {num_classes} (build it with teacher.finetune)")

    def forward(self, images, targets, teacher_feats=None):
        """(z_s, {"ce": α_ce CE(z_s, y), "kd": α_kd T² KL(z_t ‖ z_s)}); the KL on every row, labelled or not."""
        z_s = self.student(images)
        z_t = self.teacher_features(images, teacher_feats)["logits"]
        p = self.params
        return z_s, {"ce": p.alpha_ce * self.ce(z_s, targets),
                     "kd": p.alpha_kd * kl_div(z_t.to(z_s.dtype).float(), z_s.float(), p.temperature)}
