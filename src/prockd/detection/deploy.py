"""The deployable detector: ``detector.pt`` holds the student's weights, its detector config, the class names
and, for ProC-KD, the FA wrapper's shape; :func:`load_deployed_detector` rebuilds it from that file alone
(no teacher, no config file)."""
from __future__ import annotations

from pathlib import Path

import torch

from prockd.core.io import atomic_torch_save
from prockd.detection.config import DetectorConfig, DetExperimentConfig
from prockd.detection.methods.base import DetDistiller
from prockd.detection.methods.prockd import FABackbone
from prockd.detection.models import build_detector
from prockd.errors import ProckdError


def deploy_info(distiller: DetDistiller) -> dict:
    """What :func:`load_deployed_detector` needs besides the weights: the FA wrapper's shape, if any."""
    bb = distiller.export().backbone
    if isinstance(bb, FABackbone):
        k = next(iter(bb.prototypes.values())).shape[0]
        return {"fa_levels": list(bb.levels), "num_prototypes": int(k), "per_level": bb.per_level,
                "fa_scale": next(iter(bb.fa.values())).scale}
    return {}


def save_deployed(distiller: DetDistiller, cfg: DetExperimentConfig, classes: list[str], path: Path) -> None:
    """The deployable detector: weights, the student's detector config, class names, the FA wrapper's shape."""
    atomic_torch_save({"model": distiller.export().state_dict(), "detector": cfg.student.model_dump(mode="json"),
                       "classes": classes, "method": cfg.method.name, "fa": deploy_info(distiller)}, path)


def load_deployed_detector(path: str | Path):
    """(detector in eval mode, class names) from a ``detector.pt`` file alone."""
    p = Path(path)
    if not p.is_file():
        raise ProckdError(f"deployed detector not found: {p}")
    blob = torch.load(p, map_location="cpu", weights_only=False)
    if not isinstance(blob, dict) or "detector" not in blob:
        raise ProckdError(f"{p} is not a prockd detector file (no 'detector' entry)")
    cfg = DetectorConfig(**dict(blob["detector"], checkpoint=None, backbone_weights="none", weights="none"))
    model = build_detector(cfg, len(blob["classes"]))
    fa = blob.get("fa") or {}
    if fa:
        model.backbone = FABackbone(model.backbone, tuple(fa["fa_levels"]), fa["num_prototypes"], fa["per_level"],
                                    fa["fa_scale"])
    model.load_state_dict(blob["model"])
    return model.eval(), blob["classes"]
