"""Student-only baseline: the student trained with cross-entropy alone (no teacher)."""
from __future__ import annotations

import torch.nn.functional as F

from prockd.classification.methods.base import METHODS, Distiller


@METHODS.register("student_only")
class StudentOnly(Distiller):
    """Cross-entropy only; the reference every distillation method is compared with."""
    main_weights = ()

    needs_teacher = False

    def forward(self, images, targets, teacher_feats=None):
        """(logits, {"ce": CE(z_s, y)})."""
        logits = self.student(images)
        return logits, {"ce": F.cross_entropy(logits, targets)}
