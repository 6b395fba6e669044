"""A finished classification run's deployable student, rebuilt from its directory (``student.pt``, or the
``best`` / ``last`` checkpoint with its ``config.yaml``)."""
from __future__ import annotations

from pathlib import Path

import torch

from prockd.classification.config import load_config
from prockd.classification.deploy import load_deployed
from prockd.classification.engine import build
from prockd.errors import ProckdError


def load_run_student(run: Path, checkpoint: str = "selected"):
    """(deployed student, run config, task or None) of a run directory: its validation-selected ``student.pt``
    (task None: not built), or the student of ``checkpoints/{best,last}.pt`` rebuilt (the task built with it)."""
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise ProckdError(f"{run} is not a prockd run directory (no config.yaml)")
    cfg = load_config(run / "config.yaml")
    if checkpoint == "selected":
        if not (run / "student.pt").is_file():
            raise ProckdError(f"{run} has no student.pt: the run has not finished (run it again to resume, or "
                              "export --checkpoint last)")
        return load_deployed(run / "student.pt"), cfg, None

    ckpt = run / "checkpoints" / f"{checkpoint}.pt"
    if not ckpt.is_file():
        kept = " (a finished run keeps it only with train.keep_state: true; the selected student and best.pt are "\
               "always kept)" if checkpoint == "last" and (run / "final.json").is_file() else ""
        raise ProckdError(f"checkpoint not found: {ckpt}{kept}")
    built = build(cfg)
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        built.distiller.load_deployed_state(state["distiller"])
    except Exception as e:  # noqa: BLE001
        raise ProckdError(f"checkpoint {ckpt} is unreadable: {e}") from None
    dep = built.distiller.export().eval()
    dep.class_names = built.task.class_names
    dep.input_shape = built.task.image_shape
    return dep, cfg, built.task
