"""RoI-head logit distillation (Chen, Choi, Yu, Han, Chandraker, "Learning Efficient Object Detection Models with
Knowledge Distillation", NeurIPS 2017, its classification term): on the student's own proposals, the student's box
classifier is pulled towards the teacher's, ``T² KL(softmax(z_t/T) ‖ softmax(z_s/T))`` averaged over proposals.

The teacher's box predictor must have the student's classes: it is the second stage of fine-tune-then-distil for
detection (``teacher.finetune``: the teacher detector re-learnt on the student's labelled images first). Both heads
read the same proposals (RoIAlign on each one's own pyramid of the same preprocessed batch); on an unlabelled batch
the proposals come from the student's RPN as at inference (no ground truth needed)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from prockd.detection.methods.base import DET_METHODS, DetDistiller, LevelParams
from prockd.errors import ProckdError


class DetRoIKDParams(LevelParams):
    """Weight, temperature and how many of the student's proposals per image are distilled."""

    weight: float = Field(1.0, ge=0)
    temperature: float = Field(1.0, gt=0)
    proposals: int = Field(64, ge=1)  # the RPN's highest-scoring proposals per image


def roi_kd_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · mean_r KL(softmax(t_r/T) ‖ softmax(s_r/T))`` over rows ``r`` (proposals x (K+1) classes)."""
    t = temperature
    return F.kl_div(F.log_softmax(s_logits / t, -1), F.log_softmax(t_logits / t, -1), reduction="batchmean",
                    log_target=True) * t * t


@DET_METHODS.register("roi_kd")
class DetRoIKD(DetDistiller):
    """Logit distillation on the RoI box classifier from a teacher of the student's classes."""

    Params = DetRoIKDParams
    main_weights = ("weight",)

    def __init__(self, student, teacher, params, num_classes):
        super().__init__(student, teacher, params, num_classes)
        if teacher is None:
            raise ProckdError("detection method 'roi_kd' needs a 'teacher' section")
        t_cls = teacher.model.roi_heads.box_predictor.cls_score.out_features - 1
        if t_cls != num_classes:
            raise ProckdError(f"detection method 'roi_kd' distils the teacher's box classifier, which has {t_cls} "
                              f"classes, not the student's {num_classes}: fine-tune the teacher on the student's "
                              "classes first (teacher.finetune: {epochs: 12})")

    def _proposals(self, il, feats) -> list[torch.Tensor]:
        """The student's top proposals per image: those of the training RPN pass on this batch, else (an unlabelled
        batch, :meth:`DetDistiller.forward` clears them) the RPN's as at inference."""
        props = self._last_proposals
        if props is None:
            rpn = self.student.rpn
            was = rpn.training
            rpn.training = False
            try:
                with torch.no_grad():
                    props, _ = rpn(il, feats)
            finally:
                rpn.training = was
        return [p[: self.params.proposals].detach() for p in props]

    def _logits(self, roi_heads, feats, props, image_sizes) -> torch.Tensor:
        x = roi_heads.box_head(roi_heads.box_roi_pool(feats, props, image_sizes))
        return roi_heads.box_predictor(x)[0]

    def distill(self, feats, t_feats, t_stem, il, targets):
        """``kd``: the RoI classifier's KL to the teacher's on the same proposals."""
        props = self._proposals(il, feats)
        s = self._logits(self.student.roi_heads, feats, props, il.image_sizes)
        with torch.no_grad():
            t = self._logits(self.teacher.model.roi_heads, {k: t_feats[k] for k in feats}, props, il.image_sizes)
        return {"roi_kd": self.params.weight * roi_kd_loss(s.float(), t.float(), self.params.temperature)}
