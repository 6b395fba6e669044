"""The deployable student: backbone + FA + prototypes, predicting alone, and its file: ``student.pt`` (format
``prockd-deployed-v1``: the student's config, FA, prototypes, class names, input shape), reloaded without the
teacher or the training config; a finished run's student rebuilt from its checkpoints. ONNX export lives in
:mod:`prockd.classification.export`, top-k prediction in :mod:`prockd.classification.predict`.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn

from prockd.classification.config import ModelConfig
from prockd.classification.data import ArrayDataset
from prockd.classification.models import Student, create_model
from prockd.core.io import atomic_save_figure, atomic_torch_save
from prockd.errors import ProckdError
from prockd.prototypes import FeatureAugmentation, mean_prob_logits

FORMAT = "prockd-deployed-v1"


class DeployedStudent(nn.Module):
    """Student at deployment: raw images in [0, 1] -> logits. ``output`` is plain, aug or avg.

    ``forward`` keeps autograd available (attention relevance needs gradients); wrap it in
    ``torch.no_grad()`` to predict.
    """

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
        self.class_names: list[str] | None = None
        self.input_shape: tuple[int, int, int] | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits in the student's label space."""
        tok, lay, _ = self.student.features(images)
        return self.logits_from_tokens(tok, lay)

    def _paths(self, tok: torch.Tensor, lay, pre_logits: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(plain head, head after FA) on the backbone's tokens; each None when the deployed output skips it."""
        plain = None if self.output == "aug" else self.student.head(tok, lay, pre_logits=pre_logits)
        aug = None if self.output == "plain" else self.student.head(self.fa(tok, self.prototypes), lay,
                                                                    pre_logits=pre_logits)
        return plain, aug

    def logits_from_tokens(self, tok: torch.Tensor, lay) -> torch.Tensor:
        """Logits from the backbone's last tokens (FA and head; what follows the backbone at deployment)."""
        plain, aug = self._paths(tok, lay, pre_logits=False)
        if aug is None or plain is None:
            return aug if plain is None else plain
        return mean_prob_logits(plain, aug)

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """The pooled features the deployed classifier reads (``pre_logits``): after FA for the aug output,
        the concatenation of both paths for avg, the backbone's own for plain."""
        tok, lay, _ = self.student.features(images)
        return torch.cat([f for f in self._paths(tok, lay, pre_logits=True) if f is not None], dim=-1)

    def without_fa(self) -> "DeployedStudent":
        """The same backbone and head predicting from its own tokens (what FA adds is measured against it)."""
        plain = DeployedStudent(self.student, None, None, "plain")
        plain.class_names, plain.input_shape = self.class_names, self.input_shape
        return plain.eval()

    def save(self, path: str | Path, num_classes: int, class_names: list[str] | None = None,
             input_shape: tuple[int, int, int] | None = None) -> None:
        """Write a self-describing file (config + weights + class names + input shape) atomically."""
        cfg = self.student.cfg.model_dump(mode="json")
        cfg.update(pretrained=False, checkpoint=None, init_from_teacher=False)
        shape = input_shape or self.input_shape
        atomic_torch_save({
            "format": FORMAT, "student_cfg": cfg, "num_classes": num_classes, "output": self.output,
            "has_fa": self.fa is not None, "fa_scale": bool(getattr(self.fa, "scale", False)),
            "num_prototypes": 0 if self.prototypes is None else int(self.prototypes.shape[0]),
            "class_names": class_names if class_names is not None else self.class_names,
            "input_shape": list(shape) if shape else None, "state_dict": self.state_dict(),
        }, path)


def default_input_shape(dep: DeployedStudent) -> tuple[int, int, int]:
    """(C, H, W) of the images the student was trained on; the student's own input size for older files."""
    if dep.input_shape:
        return tuple(int(v) for v in dep.input_shape)
    t = dep.student.transform
    return (t.in_chans, t.size or 224, t.size or 224)


@torch.no_grad()
def top1(model: nn.Module, ds: ArrayDataset, batch_size: int = 256) -> float:
    """Top-1 accuracy (%) of a deployed student (raw images in [0, 1] -> logits) on a dataset."""
    model.eval()
    correct = 0
    for x, y, _ in ds.batches(batch_size):
        correct += int((model(x).argmax(-1) == y).sum())
    return 100.0 * correct / len(ds)


@torch.no_grad()
def confusion(model: nn.Module, ds: ArrayDataset, num_classes: int, batch_size: int = 256) -> torch.Tensor:
    """The confusion matrix of a deployed student on a dataset: entry (i, j) counts images of class i predicted j."""
    model.eval()
    m = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for x, y, _ in ds.batches(batch_size):
        pred = model(x).argmax(-1)
        m.index_put_((y.long(), pred.long()), torch.ones_like(y, dtype=torch.int64), accumulate=True)
    return m


def plot_confusion(m: torch.Tensor, names: list[str], path: Path, title: str) -> None:
    """The confusion matrix as a PNG, rows normalised to the share of each true class (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share = m.double() / m.sum(1, keepdim=True).clamp_min(1)
    k = len(names)
    side = min(12.0, 2.5 + 0.3 * k)
    fig, ax = plt.subplots(figsize=(side, side * 0.9))
    im = ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), names, rotation=90, fontsize=max(5, 10 - k // 10))
    ax.set_yticks(range(k), names, fontsize=max(5, 10 - k // 10))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)


def load_deployed(path: str | Path) -> DeployedStudent:
    """Rebuild a :class:`DeployedStudent` from a file written by :meth:`DeployedStudent.save`."""
    p = Path(path)
    if not p.is_file():
        raise ProckdError(f"deployed student file not found: {p}")
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
    dep.input_shape = tuple(obj["input_shape"]) if obj.get("input_shape") else None
    return dep.eval()


