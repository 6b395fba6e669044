"""Stage 1 of fine-tune-then-distil: the teacher fine-tuned on the student's labelled task, cached by content.

Vemulapalli, Yang, Ghahremani, ..., Tuzel, "Knowledge Transfer from Vision Foundation Models for Efficient Training
of Small Task-specific Models" (task-oriented knowledge transfer), ICML 2024: fine-tune the foundation model on the
labelled target set, then distil it into the small model on the task's images. ``teacher.finetune``
(:class:`~prockd.classification.config.FinetuneConfig`) runs that first stage for any distiller: a copy of the
teacher with a new head of the task's classes trains on the labelled set (the run's data, its validation split
choosing the checkpoint; the test sets are never read), and the result is the frozen teacher of the run.

The fine-tune is itself a resumable run directory under ``<dir>/<key>/`` (``key``: a SHA-1 of the teacher's weights
and architecture, the labelled data, the recipe and, with ``per_seed``, the run's seed): killed, it resumes exactly
on the next start; finished, it holds ``teacher.pt`` (the weights chosen on validation) and ``finetune.json`` (its
validation accuracy, epoch and wall time), and every later run with the same key reads them. Processes that need
the same key wait for the one that builds it (:func:`prockd.core.io.shared_build_lock`).
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import shutil
from pathlib import Path

from prockd.classification.cache import tensor_digest
from prockd.classification.config import ExperimentConfig, FinetuneConfig, ModelConfig, build_config
from prockd.classification.data import Task
from prockd.classification.models import Teacher, create_model
from prockd.core.io import atomic_torch_save, atomic_write_json, shared_build_lock
from prockd.core.loop import set_seed
from prockd.errors import ProckdError

FINETUNE_FILE = "finetune.json"
# the teacher's keys that describe the network and its input (what a fine-tuned copy keeps); the distillation taps
# belong to the frozen teacher, not to the fine-tune
_NET_KEYS = ("name", "kwargs", "input_size", "in_chans", "mean", "std", "channels_last")


def finetune_dir(cfg: ExperimentConfig, ft: FinetuneConfig) -> Path:
    """Where fine-tuned teachers are kept: ``ft.dir``, else ``finetuned`` beside the feature cache's folder."""
    if ft.dir:
        return Path(ft.dir).expanduser()
    return Path(cfg.cache.dir).expanduser().parent / "finetuned"


def _net_config(teacher: ModelConfig, checkpoint: Path) -> dict:
    raw = {k: v for k, v in teacher.model_dump(mode="json").items() if k in _NET_KEYS}
    raw["kwargs"] = {k: v for k, v in (raw.get("kwargs") or {}).items() if k != "num_classes"}
    return dict(raw, checkpoint=str(checkpoint), pretrained=False)


def stage1_config(cfg: ExperimentConfig, ft: FinetuneConfig, base: Path, seed: int) -> ExperimentConfig:
    """The fine-tune's own experiment: student-only training of the teacher's network (its weights from ``base``,
    a new head) on the run's labelled data with the recipe ``ft`` (augmentation and views default to the run's)."""
    t = cfg.train
    train = dict(t.model_dump(mode="json"), epochs=ft.epochs, lr=ft.lr, optimizer=ft.optimizer,
                 weight_decay=ft.weight_decay, batch_size=ft.batch_size or t.batch_size,
                 warmup_epochs=ft.warmup_epochs, min_lr=ft.lr * 0.01, schedule="cosine", milestones=[],
                 augment=ft.augment if ft.augment is not None else t.augment,
                 aug_views=ft.aug_views if ft.aug_views is not None else t.aug_views,
                 student_noise=0.0, student_noise_p=1.0, eval_every=1, compile=False)
    data = dict(cfg.data.model_dump(mode="json"), unlabeled=None, corruptions=[])
    return build_config({"seed": seed, "student": _net_config(cfg.teacher, base), "data": data,
                         "method": {"name": "student_only"}, "train": train, "cache": {"enabled": False}},
                        "teacher.finetune (stage 1)")


def _freeze(model, prefixes: list[str]) -> int:
    """Freeze the parameters under ``prefixes`` (module paths); an unknown prefix is an error with near names."""
    names = [n for n, _ in model.named_parameters()]
    modules = sorted({n.rsplit(".", 1)[0] for n in names if "." in n} | {n.split(".")[0] for n in names})
    frozen: set[str] = set()
    for f in prefixes:
        hit = {n for n in names if n == f or n.startswith(f + ".")}
        if not hit:
            near = difflib.get_close_matches(f, modules, n=3)
            raise ProckdError(f"teacher.finetune.freeze: '{f}' names no parameter of the teacher"
                              + (f"; did you mean {', '.join(near)}?" if near else "")
                              + f" (top-level modules: {', '.join(sorted({n.split('.')[0] for n in names}))})")
        frozen |= hit
    for n, p in model.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    return len(frozen)


def finetuned_teacher(cfg: ExperimentConfig, ft: FinetuneConfig, task: Task, build, train,
                      log=print) -> tuple[Teacher, dict]:
    """The run's frozen teacher fine-tuned on ``task``'s labelled set (trained here once per key with the engine's
    own ``build`` and ``train``, else read from the cache), and what the run logs and keeps of it
    (``finetune.json``'s content plus whether it was reused)."""
    if task.val is None:
        raise ProckdError("teacher.finetune chooses the fine-tuned teacher's checkpoint on a validation split: give "
                          "the task one (data.val_fraction, data.val_dir, or data.glyphs.val_fonts)")
    seed = cfg.seed if ft.per_seed else ft.seed
    set_seed(cfg.seed)  # the frozen teacher's own weights, as the run would build them without a fine-tune
    base_model = create_model(cfg.teacher, None, "teacher")
    base_state = base_model.state_dict()
    ident = {"teacher": tensor_digest(base_state), "net": _net_config(cfg.teacher, Path("-")),
             "train": task.train.fingerprint(), "val": task.val.fingerprint(), "classes": task.class_names,
             "recipe": ft.model_dump(mode="json", exclude={"dir", "per_seed", "seed"}), "seed": seed,
             "views": [cfg.train.augment, cfg.train.aug_views, cfg.train.aug_rotation, cfg.train.aug_scale,
                       cfg.train.aug_shift, cfg.train.batch_size]}
    key = hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:20]
    root = finetune_dir(cfg, ft)
    run_dir = root / key
    reused = True
    with shared_build_lock(run_dir / ".finetune.lock"):
        if not (run_dir / FINETUNE_FILE).is_file():
            reused = False
            base = run_dir / "base.pt"
            if not base.is_file():
                atomic_torch_save(base_state, base)
            s1 = stage1_config(cfg, ft, base, seed)
            log(f"teacher.finetune: stage 1, fine-tuning {cfg.teacher.name} with a new head of {task.num_classes} "
                f"classes on {len(task.train)} labelled images for {ft.epochs} epochs (lr {ft.lr:g}"
                + (f", frozen: {', '.join(ft.freeze)}" if ft.freeze else "") + f") in {run_dir}")
            built = build(s1, task=dataclasses.replace(task, tests={}, unlabeled=None))
            if ft.freeze:
                n = _freeze(built.distiller.student.model, ft.freeze)
                log(f"teacher.finetune: {n} parameter tensors frozen under {', '.join(ft.freeze)}")
            summary = train(s1, run_dir, built=built, log=lambda m: log(f"  [fine-tune] {m}"))
            selected = summary.get("selected") or {}
            info = {"key": key, "teacher": cfg.teacher.name, "classes": task.num_classes,
                    "val_top1": selected.get("val/deployed"), "epoch": selected.get("epoch"),
                    "epochs": ft.epochs, "wall_s": summary["wall_s"],
                    "recipe": ft.model_dump(mode="json"), "seed": seed}
            # the weights chosen on validation: the engine leaves them in the model after the selection
            atomic_torch_save({"model": built.distiller.student.model.state_dict(), "class_names": task.class_names},
                              run_dir / "teacher.pt")
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # teacher.pt holds what a run needs
            for f in ("base.pt", "student.pt"):
                (run_dir / f).unlink(missing_ok=True)
            atomic_write_json(run_dir / FINETUNE_FILE, info)
        info = json.loads((run_dir / FINETUNE_FILE).read_text())
    model = create_model(ModelConfig(**_net_config(cfg.teacher, run_dir / "teacher.pt")), task.num_classes,
                         "fine-tuned teacher")
    teacher = Teacher(model, cfg.teacher)
    log(f"teacher.finetune: fine-tuned teacher {'read from' if reused else 'written to'} {run_dir}: validation top-1 "
        f"{info['val_top1']:.2f} % (epoch {info['epoch']} of {info['epochs']}, chosen on validation), fine-tune "
        f"{info['wall_s']:.1f} s" + (" (paid once, by the run that built it)" if reused else ""))
    return teacher, dict(info, reused=reused, dir=str(run_dir))
