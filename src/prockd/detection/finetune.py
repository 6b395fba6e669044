"""Stage 1 of fine-tune-then-distil for detection (``teacher.finetune``, :class:`DetFinetuneConfig`): the teacher
detector, started from its own checkpoint with a new box predictor for the student's classes (after Vemulapalli,
Yang, Ghahremani, ..., Tuzel, "Knowledge Transfer from Vision Foundation Models for Efficient Training of Small
Task-specific Models", ICML 2024, whose stage 1 fine-tunes the teacher on the target task), is trained on the
student's labelled training split with the checkpoint chosen on validation; the result, cached by content, is the
frozen teacher of the run."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prockd.core.io import atomic_write_json, shared_build_lock
from prockd.detection.config import DetExperimentConfig, build_det_config
from prockd.errors import ProckdError


def finetune_dir(cfg: DetExperimentConfig) -> Path:
    """Where fine-tuned teacher detectors are kept: ``teacher.finetune.dir``, else ``~/.cache/prockd/finetuned_det``."""
    ft = cfg.teacher.finetune
    return Path(ft.dir or "~/.cache/prockd/finetuned_det").expanduser()


def stage1_config(cfg: DetExperimentConfig) -> dict:
    """The raw config of the fine-tune run: the teacher's detector started from its checkpoint
    (``init_checkpoint``), the student's labelled data (without the unlabelled set), student-only, the fine-tune's
    recipe over the run's schedule settings."""
    t, ft = cfg.teacher, cfg.teacher.finetune
    if not t.checkpoint:
        raise ProckdError("teacher.finetune needs teacher.checkpoint: the detector file to fine-tune")
    det = t.model_dump(mode="json", exclude={"finetune", "checkpoint", "num_classes"})
    det.update(init_checkpoint=t.checkpoint)
    data = cfg.data.model_dump(mode="json", exclude={"unlabeled"})
    train = cfg.train.model_dump(mode="json")
    train.update(epochs=ft.epochs, optimizer=ft.optimizer, lr=ft.lr, milestones=list(ft.milestones),
                 batch_size=ft.batch_size or cfg.train.batch_size, eval_every=ft.eval_every, eval_from=1,
                 cache_teacher=False, max_steps=None, keep_state=False)
    return {"task": "detection", "seed": ft.seed, "student": det, "data": data, "train": train,
            "method": {"name": "student_only"}}


def finetuned_teacher(cfg: DetExperimentConfig, pretrain_teacher, log=print) -> tuple[Path, dict]:
    """(the fine-tuned teacher's ``teacher.pt``, its summary): trained once per content key by ``pretrain_teacher``
    (:func:`prockd.detection.engine.pretrain_teacher`) while holding the key's build lock, so that runs sharing it
    wait and read it (:func:`prockd.core.io.shared_build_lock`, as the classification fine-tune); a killed fine-tune
    resumes from its last epoch on the next run, and ``summary.json``, written last, marks it as ready."""
    raw = stage1_config(cfg)
    src = Path(cfg.teacher.checkpoint).expanduser()
    key_src = {"v": 1, "raw": {k: v for k, v in raw.items() if k != "train"} | {
        "train": {k: v for k, v in raw["train"].items() if k not in ("progress", "num_threads", "device")}},
        "teacher_file": [str(src.resolve()), src.stat().st_size, src.stat().st_mtime_ns]}
    key = hashlib.sha1(json.dumps(key_src, sort_keys=True, default=str).encode()).hexdigest()[:16]
    run_dir = finetune_dir(cfg) / key
    with shared_build_lock(run_dir / ".finetune.lock"):
        if not (run_dir / "summary.json").is_file():
            ft = cfg.teacher.finetune
            log(f"teacher.finetune: fine-tuning the teacher detector on the student's classes ({ft.epochs} epochs, "
                f"{ft.optimizer} lr {ft.lr:g}) -> {run_dir}")
            res = pretrain_teacher(build_det_config(dict(raw, out=str(run_dir)), "teacher.finetune (stage 1)"),
                                   run_dir, log=log)
            selected = json.loads((run_dir / "final.json").read_text()).get("selected")
            atomic_write_json(run_dir / "summary.json", {"key": key, "final": res.get("final"), "selected": selected})
            sel = selected or {}
            log(f"teacher.finetune: fine-tuned teacher's validation mAP50 {sel.get('val/mAP50', float('nan')):.1f} "
                f"(epoch {sel.get('epoch')})")
        summary = json.loads((run_dir / "summary.json").read_text())
    return run_dir / "teacher.pt", summary
