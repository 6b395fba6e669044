"""Student-only baseline: the student trained with cross-entropy alone (no teacher); with ``logit_adjust`` (every
method's option, :class:`~prockd.classification.methods.base.MethodParams`) Menon et al.'s logit-adjusted
cross-entropy (ICLR 2021), the long-tail reference."""
from __future__ import annotations

from prockd.classification.methods.base import METHODS, Distiller


@METHODS.register("student_only")
class StudentOnly(Distiller):
    """Cross-entropy only; the reference every distillation method is compared with."""
    main_weights = ()

    needs_teacher = False

    def forward(self, images, targets, teacher_feats=None):
        """(logits, {"ce": CE(z_s + τ log π, y)}); τ = 0: the plain CE."""
        logits = self.student(images)
        return logits, {"ce": self.ce(logits, targets)}
