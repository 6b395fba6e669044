"""The deployable student: backbone + FA + prototypes, predicting alone, saved to and reloaded from a file."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn

from prockd.config import ModelConfig
from prockd.errors import ProckdError
from prockd.io import atomic_torch_save
from prockd.modules import mean_prob_logits

FORMAT = "prockd-deployed-v1"


class DeployedStudent(nn.Module):
    """Student at deployment: raw images in [0, 1] -> logits. ``output`` is plain, aug or avg."""

    def __init__(self, student, fa: nn.Module | None, prototypes: torch.Tensor | None, output: str):
        super().__init__()
        self.student = copy.deepcopy(student)
        for m in self.student.modules():  # the copy must not feed the training recorder's hooks
            m._forward_hooks.clear()
        self.student.recorder = None
        self.student.embed_path = None
        self.fa = copy.deepcopy(fa) if fa is not None else None
        if prototypes is not None:
            self.register_buffer("prototypes", prototypes.detach().clone())
        else:
            self.prototypes = None
        self.output = output if fa is not None else "plain"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits in the student's label space."""
        tok, lay, _ = self.student.features(images)
        plain = self.student.head(tok, lay)
        if self.output == "plain":
            return plain
        aug = self.student.head(self.fa(tok, self.prototypes), lay)
        if self.output == "aug":
            return aug
        return mean_prob_logits(plain, aug)

    def save(self, path: str | Path, num_classes: int, class_names: list[str] | None = None) -> None:
        """Write a self-describing file (config + weights) atomically."""
        cfg = self.student.cfg.model_dump(mode="json")
        cfg.update(pretrained=False, checkpoint=None, init_from_teacher=False)
        atomic_torch_save({
            "format": FORMAT, "student_cfg": cfg, "num_classes": num_classes, "output": self.output,
            "has_fa": self.fa is not None, "fa_scale": bool(getattr(self.fa, "scale", False)),
            "num_prototypes": 0 if self.prototypes is None else int(self.prototypes.shape[0]),
            "class_names": class_names, "state_dict": self.state_dict(),
        }, path)


def load_deployed(path: str | Path) -> DeployedStudent:
    """Rebuild a :class:`DeployedStudent` from a file written by :meth:`DeployedStudent.save`."""
    from prockd.models import Student, create_model
    from prockd.modules import FeatureAugmentation

    p = Path(path)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ProckdError(f"deployed student file {p} is unreadable: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ProckdError(f"{p} is not a prockd deployed-student file (format {FORMAT})")
    cfg = ModelConfig(**obj["student_cfg"])
    student = Student(create_model(cfg, obj["num_classes"], "student"), cfg, need_embed=False)
    fa, protos = None, None
    if obj["has_fa"]:
        fa = FeatureAugmentation(student.width, scale=obj["fa_scale"])
        protos = torch.zeros(obj["num_prototypes"], student.width)
    dep = DeployedStudent(student, fa, protos, obj["output"])
    dep.load_state_dict(obj["state_dict"], strict=True)
    dep.class_names = obj.get("class_names")
    return dep.eval()
