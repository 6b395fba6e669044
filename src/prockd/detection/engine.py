"""Detection's engine: opening the splits, building a run, COCO evaluation of the deployed detector, and
:class:`DetectionHooks`, its part of the one training loop (:func:`prockd.core.loop.run_training`): data from
disk through a ``DataLoader``, mmdet's schedule, checkpoint selection on the validation split's mAP50.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from prockd.core import distributed as ddp
from prockd.core.checkpoint import read_state_dict, save_teacher, select_best
from prockd.core.config import dump_config
from prockd.core.io import unlabeled_files
from prockd.core.loop import (
    TaskHooks,
    lr_factor,
    resolve_device,
    run_training,
    set_seed,
)
from prockd.core.registry import method_params as validated_method_params
from prockd.detection.canvas import UNLABELED_ID, build_canvases, build_unlabeled_canvases, split_names
from prockd.detection.config import DetectorConfig, DetExperimentConfig
from prockd.detection.data import (
    DetectionSet,
    hflip,
    make_loader,
    open_split,
    read_coco,
    unlabeled_set,
)
from prockd.detection.deploy import save_deployed
from prockd.detection.evaluate import coco_metrics, detect
from prockd.detection.finetune import finetuned_teacher
from prockd.detection.methods import DET_METHODS, DetDistiller
from prockd.detection.models import (
    DetTeacher,
    PyramidCache,
    build_detector,
    checkpoint_classes,
)
from prockd.errors import ProckdError
from prockd.glyphs import charset


@dataclass
class DetData:
    """The opened splits of a run."""

    train: DetectionSet
    val: DetectionSet | None
    tests: dict[str, DetectionSet]
    classes: list[str]
    unlabeled: DetectionSet | None = None  # data.unlabeled: images without boxes (the distillers' transfer set)


def open_data(cfg: DetExperimentConfig, log=print) -> DetData:
    """Open (and validate) every split; the embedded canvases are rendered first if needed."""
    d = cfg.data
    if d.name == "canvas":
        paths = build_canvases(d.canvas, log)
        classes = list(charset(d.canvas.charset))
        train = read_coco(*paths["train"], classes)
        val = read_coco(*paths["val"], classes) if "val" in paths else None
        tests = {n: read_coco(*paths[n], classes) for n in split_names(d.canvas)[1]}
    else:
        train = open_split(d.train, d.classes, d.name_map)
        classes = train.classes
        val = open_split(d.val, classes, d.name_map) if d.val is not None else None
        tests = {n: open_split(s, classes, d.name_map) for n, s in d.tests.items()}
    tests = {n: t.subset(d.test_limit) for n, t in tests.items()}
    unlabeled = None
    u = d.unlabeled
    if u is not None:
        if u.canvas_fonts:
            files = build_unlabeled_canvases(d.canvas, u.canvas_fonts, u.canvas_images, log)
            unlabeled = unlabeled_set(files, classes, "data.unlabeled (canvases)")
        else:
            good, bad = unlabeled_files(u.dir, u.limit)
            if bad:
                log(f"data.unlabeled.dir: {len(bad)} unreadable files skipped (e.g. {bad[0]})")
            unlabeled = unlabeled_set([(f, UNLABELED_ID + i) for i, f in enumerate(good)], classes,
                                      f"data.unlabeled.dir ({u.dir})")
    return DetData(train.subset(d.train_limit), val.subset(d.test_limit) if val is not None else None, tests, classes,
                   unlabeled)


@dataclass
class DetBuilt:
    """Everything a detection run needs, built and validated before anything is written."""

    cfg: DetExperimentConfig
    data: DetData
    teacher: DetTeacher | None
    distiller: DetDistiller
    device: torch.device


def method_params(cfg: DetExperimentConfig):
    """The detection method class and its validated parameters (:func:`prockd.core.registry.method_params`)."""
    return validated_method_params(DET_METHODS, cfg)


def teacher_classes(t: DetectorConfig, state: dict | None) -> int:
    """The teacher head's number of classes: configured, from its checkpoint's ``state``, or COCO's 90."""
    if t.num_classes is not None:
        return t.num_classes
    if state is not None:
        return checkpoint_classes(state, t.checkpoint)
    if t.weights == "coco":
        return 90
    raise ProckdError("teacher: set 'checkpoint' (a trained detector) or 'weights: coco'; a detection teacher "
                      "must know something")


def build(cfg: DetExperimentConfig, data: DetData | None = None, log=print) -> DetBuilt:
    """Build data, teacher, student and distiller (raises ProckdError on any bad input)."""
    set_seed(cfg.seed)
    device = resolve_device(cfg.train.device)
    cls, params = method_params(cfg)
    teacher = None
    if cls.needs_teacher and cfg.teacher is not None and cfg.teacher.finetune is not None:
        data = data or open_data(cfg, log)  # stage 1 trains on the labelled split
        ckpt, _ = finetuned_teacher(cfg, pretrain_teacher, log)
        cfg = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"checkpoint": str(ckpt),
                                                                                "num_classes": None})})
    if cls.needs_teacher:
        t = cfg.teacher
        if t is None:
            raise ProckdError(f"detection method '{cfg.method.name}' needs a 'teacher' section")
        state = read_state_dict(t.checkpoint, "teacher detector") if t.checkpoint else None  # read once
        teacher = DetTeacher(build_detector(t, teacher_classes(t, state), state), cfg.student.mean, cfg.student.std)
    data = data or open_data(cfg, log)
    set_seed(cfg.seed)
    student = build_detector(cfg.student, len(data.classes))
    distiller = cls(student, teacher, params, len(data.classes)).to(device)
    if teacher is not None:
        teacher.to(device)
        if cfg.train.cache_teacher:
            distiller.pyramid_cache = PyramidCache(teacher)
    return DetBuilt(cfg, data, teacher, distiller, device)


def evaluate_sets(distiller: DetDistiller, sets: dict[str, DetectionSet], device, amp: str = "none") -> dict:
    """COCO metrics of the deployed detector on every set, keys ``<set>/<metric>``."""
    out = {}
    for name, ds in sets.items():
        dets = detect(distiller.export(), ds, device, amp=amp)
        out.update({f"{name}/{k}": v for k, v in coco_metrics(ds.coco_gt(), dets).items()})
    distiller.train()
    return out


class DetectionHooks(TaskHooks):
    """Detection's part of the training loop (:func:`prockd.core.loop.run_training`): images from disk through
    a ``DataLoader`` (each rank its shard), horizontal flips, mmdet's schedule (linear warm-up over iterations,
    steps at epoch milestones, plain momentum), COCO mAP50 on validation for selection (rank 0),
    ``detector.pt``."""

    nesterov = False  # mmdet: plain momentum

    def __init__(self, cfg: DetExperimentConfig, b: DetBuilt):
        super().__init__(cfg, b.distiller, b.device)
        self.b, self.data = b, b.data
        self.primary = "val/mAP50" if b.data.val is not None else f"{next(iter(b.data.tests))}/mAP50"
        # the unlabelled transfer set feeds the distillation terms of a method that reads it (not student-only,
        # not a loss that needs ground-truth boxes)
        self.unlabeled = b.data.unlabeled if b.data.unlabeled is not None and b.distiller.reads_unlabeled else None

    def config_text(self) -> str:
        """The resolved config as YAML."""
        return dump_config(self.cfg)

    def steps_per_epoch(self, info) -> int:
        """Batches of this rank's shard of the training set."""
        per_rank = -(-len(self.data.train) // info.world)
        return -(-per_rank // self.cfg.train.batch_size)

    def scheduler(self, opt, steps_per_epoch: int):
        """mmdet's schedule (:func:`prockd.core.loop.lr_factor`): steps at the milestones or a cosine decay."""
        t = self.cfg.train
        bounds = [m * steps_per_epoch for m in t.milestones]
        total = steps_per_epoch * t.epochs if t.schedule == "cosine" else None
        floor = t.min_lr / t.lr
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, t.warmup_iters, t.warmup_factor, bounds,
                                                                           t.gamma, total, floor))

    def epoch_batches(self, epoch: int, info):
        """This rank's shuffled shard (:func:`prockd.detection.data.make_loader`); flips drawn from a generator
        seeded by the run's seed and the epoch."""
        cfg = self.cfg
        self.g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch + 17)
        labelled = make_loader(self.data.train, cfg.train.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch,
                               workers=cfg.data.num_workers, rank=info.rank, world=info.world)
        if self.unlabeled is None:
            return labelled
        return zip(labelled, self._unlabeled_batches(epoch, info))

    def _unlabeled_batches(self, epoch: int, info):
        """This rank's shuffled unlabelled batches (``data.unlabeled.batch_size``, else ``train.batch_size``), a
        new order per epoch and per pass, repeated as long as the labelled batches last."""
        cfg, k = self.cfg, 0
        bs = cfg.data.unlabeled.batch_size or cfg.train.batch_size
        while True:
            yield from make_loader(self.unlabeled, bs, shuffle=True, seed=cfg.seed + 7919, epoch=epoch * 1000 + k,
                                   workers=cfg.data.num_workers, rank=info.rank, world=info.world)
            k += 1

    def _to_device(self, images, targets):
        if self.cfg.data.flip:
            images, targets = hflip(images, targets, self.g)
        images = [im.to(self.device, non_blocking=True) for im in images]
        targets = [{k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in tg.items()} for tg in targets]
        return images, targets

    def step_inputs(self, batch, info):
        """(images, targets[, unlabelled images, their box-less targets]) on the device, flipped when
        ``data.flip``; every rank's share is whole."""
        if self.unlabeled is None:
            return self._to_device(*batch), 1.0
        (images, targets), (u_images, u_targets) = batch
        return (*self._to_device(images, targets), *self._to_device(u_images, u_targets)), 1.0

    def forward(self, model, inputs) -> dict:
        """The detector's and the method's losses."""
        return model(*inputs)

    def record_head(self, step: int) -> dict:
        """The global step count (runs may stop at ``train.max_steps``)."""
        return {"steps": step}

    def evaluate_epoch(self, epoch: int, last_epoch: bool, info) -> dict:
        """mAP50 on the selection data (validation, else the first test set) every ``eval_every`` epochs from
        epoch ``eval_from`` on and after the last, on rank 0."""
        t, data = self.cfg.train, self.data
        if info.main and (((epoch + 1) % t.eval_every == 0 and epoch + 1 >= t.eval_from) or last_epoch):
            name = self.primary.split("/")[0]
            return evaluate_sets(self.distiller, {name: data.val if data.val is not None else data.tests[name]},
                                 self.device, t.amp)
        return {}

    def improved(self, record: dict, best: float) -> bool:
        """Higher or equal mAP50 (a tie goes to the later epoch)."""
        return self.primary in record and record[self.primary] >= best

    def progress_keys(self, key: str) -> bool:
        """Losses and mAP50."""
        return key.startswith("loss/") or key.endswith("mAP50")

    def finish(self, run_dir, history: list, best: float, info, log) -> dict:
        """Every test set for the last and for the selected checkpoint (rank 0); whether the replicas agree."""
        cfg, data, dist, device, t = self.cfg, self.data, self.distiller, self.device, self.cfg.train
        summary: dict = {"method": cfg.method.name, "seed": cfg.seed, "classes": data.classes,
                         "world_size": info.world, "replicas_identical": ddp.replicas_identical(dist, info)}
        if not summary["replicas_identical"]:
            log("warning: the DDP replicas' weights differ at the end of training (a rank ran other steps?)")
        if info.main:
            final = evaluate_sets(dist, data.tests, device, t.amp)
            selected = None  # a checkpoint is chosen on validation only, never on a test set (as classification)
            if data.val is not None:
                selected = select_best(run_dir / "checkpoints", dist, self.primary,
                                       dict(final, epoch=history[-1]["epoch"]), data.tests,
                                       lambda: evaluate_sets(dist, data.tests, device, t.amp))
            summary.update({"final": final, "selected": selected, "best": best, "history_len": len(history),
                            "student_params": sum(p.numel() for p in dist.student.parameters()),
                            "deployed_params": sum(p.numel() for p in dist.export().parameters())})
        return summary

    def save_deployed(self, run_dir) -> None:
        """``detector.pt`` (:mod:`prockd.detection.deploy`)."""
        save_deployed(self.distiller, self.cfg, self.data.classes, run_dir / "detector.pt")


def train(cfg: DetExperimentConfig, run_dir: str | Path | None = None, *, log=print, built: DetBuilt | None = None) -> dict:
    """Train (or resume) one detection run with :func:`prockd.core.loop.run_training`; returns the summary also
    written to ``final.json`` (``config.yaml``, ``metrics.jsonl``, ``checkpoints/``, ``detector.pt`` beside
    it)."""
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    b = built or build(cfg, log=log)  # bad input fails here, before anything is written
    return run_training(DetectionHooks(cfg, b), run_dir or cfg.out, log=log)


def pretrain_teacher(cfg: DetExperimentConfig, out: str | Path | None = None, log=print) -> dict:
    """Train a detector on its own labelled task (student-only) and write ``teacher.pt``: the file a
    distillation config names as ``teacher.checkpoint`` (with the same detector section)."""
    out = Path(out or cfg.out)
    built = build(cfg, log=log)
    summary = train(cfg, out, built=built, log=log)
    ckpt = out / "teacher.pt"
    if "final" in summary:  # the main process (the others return no results)
        save_teacher(ckpt, built.distiller.student, classes=built.data.classes)
    return {"teacher_checkpoint": str(ckpt), "final": summary.get("final")}
