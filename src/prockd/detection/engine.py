"""The detection training loop: data from disk through a ``DataLoader``, mmdet's schedule (linear warm-up over
iterations, steps at epoch milestones), AMP, gradient clipping, DDP under torchrun, checkpoints written
atomically every epoch and an exact resume, checkpoint selection on the validation split's mAP50.

A run directory holds ``config.yaml``, ``metrics.jsonl`` (+ TensorBoard), ``checkpoints/{last,best}.pt``,
``final.json`` and the deployable detector ``detector.pt`` (:func:`load_deployed_detector` rebuilds it
without the teacher or the config file).
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from prockd import distributed as ddp
from prockd.detection.config import DetExperimentConfig, DetectorConfig
from prockd.detection.data import DetectionSet, hflip, make_loader, open_split, read_coco
from prockd.detection.evaluate import coco_metrics, detect
from prockd.detection.methods import DET_METHODS, DetDistiller
from prockd.detection.models import DetTeacher, build_detector, checkpoint_classes
from prockd.engine import (KILL_ENV, _Logger, autocast, make_optimizer, optimizer_step, resolve_device,
                           resume_state, save_epoch, select_best, set_seed)
from prockd.errors import ProckdError
from prockd.models import read_state_dict
from prockd.io import atomic_torch_save, atomic_write_json, atomic_write_text, run_lock


@dataclass
class DetData:
    """The opened splits of a run."""

    train: DetectionSet
    val: DetectionSet | None
    tests: dict[str, DetectionSet]
    classes: list[str]


def open_data(cfg: DetExperimentConfig, log=print) -> DetData:
    """Open (and validate) every split; the embedded canvases are rendered first if needed."""
    d = cfg.data
    if d.name == "canvas":
        from prockd.detection.canvas import build_canvases, split_names
        from prockd.glyphs import charset

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
    return DetData(train.subset(d.train_limit), val.subset(d.test_limit) if val is not None else None, tests, classes)


@dataclass
class DetBuilt:
    """Everything a detection run needs, built and validated before anything is written."""

    cfg: DetExperimentConfig
    data: DetData
    teacher: DetTeacher | None
    distiller: DetDistiller
    device: torch.device


def method_params(cfg: DetExperimentConfig):
    """The detection method class and its validated parameters (:func:`prockd.registry.method_params`)."""
    from prockd.registry import method_params as _validated

    return _validated(DET_METHODS, cfg)


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
    if cls.needs_teacher:
        t = cfg.teacher
        state = read_state_dict(t.checkpoint, "teacher detector") if t.checkpoint else None  # read once
        teacher = DetTeacher(build_detector(t, teacher_classes(t, state), state), cfg.student.mean, cfg.student.std)
    data = data or open_data(cfg, log)
    set_seed(cfg.seed)
    student = build_detector(cfg.student, len(data.classes))
    distiller = cls(student, teacher, params, len(data.classes)).to(device)
    if teacher is not None:
        teacher.to(device)
    return DetBuilt(cfg, data, teacher, distiller, device)


def lr_factor(step: int, warmup: int, factor: float, bounds: list[int], gamma: float) -> float:
    """mmdet's schedule: linear warm-up from ``factor`` over ``warmup`` steps, times ``gamma`` per milestone passed."""
    base = gamma ** sum(step >= b for b in bounds)
    if warmup > 0 and step < warmup:
        return base * (factor + (1 - factor) * step / warmup)
    return base


def evaluate_sets(distiller: DetDistiller, sets: dict[str, DetectionSet], device, amp: str = "none") -> dict:
    """COCO metrics of the deployed detector on every set, keys ``<set>/<metric>``."""
    out = {}
    for name, ds in sets.items():
        dets = detect(distiller.export(), ds, device, amp=amp)
        out.update({f"{name}/{k}": v for k, v in coco_metrics(ds.coco_gt(), dets).items()})
    distiller.train()
    return out


def deploy_info(distiller: DetDistiller) -> dict:
    """What :func:`load_deployed_detector` needs besides the weights: the FA wrapper's shape, if any."""
    from prockd.detection.methods.prockd import FABackbone

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
    from prockd.detection.methods.prockd import FABackbone

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


def train(cfg: DetExperimentConfig, run_dir: str | Path | None = None, *, log=print, built: DetBuilt | None = None) -> dict:
    """Train (or resume) one detection run; returns the summary also written to ``final.json``. The run
    directory belongs to one process (:func:`prockd.io.run_lock`, held by rank 0)."""
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    b = built or build(cfg, log=log)  # bad input fails here, before anything is written
    run_dir = Path(run_dir or cfg.out)
    with run_lock(run_dir, ddp.env_info().main):
        return _train(cfg, run_dir, b, log=log)


def _train(cfg: DetExperimentConfig, run_dir: Path, b: DetBuilt, *, log) -> dict:
    """:func:`train` inside the run directory's lock."""
    info = ddp.setup(b.device.type)
    if not info.main:
        log = _silent
    dist, device, t, data = b.distiller, b.device, cfg.train, b.data
    if info.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    ckpt_dir = run_dir / "checkpoints"
    params = dist.learnable_parameters()
    opt = make_optimizer(params, t, nesterov=False)  # mmdet: plain momentum
    per_rank = -(-len(data.train) // info.world)
    steps_per_epoch = -(-per_rank // t.batch_size)
    bounds = [m * steps_per_epoch for m in t.milestones]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, t.warmup_iters, t.warmup_factor, bounds,
                                                                       t.gamma))
    scaler = torch.amp.GradScaler(device.type, enabled=(t.amp == "fp16" and device.type == "cuda"))
    last = ckpt_dir / "last.pt"
    start_epoch, best, history = resume_state(last, dist, opt, sched, scaler, log)
    model = dist
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(dist, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=True)
    logger = _Logger(run_dir, start_epoch) if info.main else None
    kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
    step = start_epoch * steps_per_epoch
    primary = "val/mAP50" if data.val is not None else f"{next(iter(data.tests))}/mAP50"
    stopped = False
    for epoch in range(start_epoch, t.epochs):
        dist.set_epoch(epoch, t.epochs)
        dist.train()
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch + 17)
        loader = make_loader(data.train, t.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch,
                             workers=cfg.data.num_workers, rank=info.rank, world=info.world)
        sums: dict[str, float] = {}
        n = 0
        t0 = time.perf_counter()
        bar = tqdm(loader, total=steps_per_epoch, disable=not (t.progress and info.main), leave=False,
                   desc=f"epoch {epoch + 1}/{t.epochs}")
        for images, targets in bar:
            if cfg.data.flip:
                images, targets = hflip(images, targets, g)
            images = [im.to(device, non_blocking=True) for im in images]
            targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in tg.items()} for tg in targets]
            with autocast(device, t.amp):
                losses = model(images, targets)
                loss = sum(losses.values())
            optimizer_step(loss, losses, epoch, opt, scaler, sched, params, t.clip_grad)
            step += 1
            n += 1
            for k, v in losses.items():
                sums["loss/" + k] = sums.get("loss/" + k, 0.0) + float(v.detach())
            for k, v in dist.step_stats().items():
                sums["train/" + k] = sums.get("train/" + k, 0.0) + float(v)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            if kill_after and step >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            if t.max_steps and step >= t.max_steps:
                stopped = True
                break
        keys = sorted(sums)
        red = ddp.all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device), info)
        record = {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "time_s": time.perf_counter() - t0, "steps": step}
        record.update({k: v / max(1, n * info.world) for k, v in zip(keys, red.tolist())})
        last_epoch = epoch + 1 == t.epochs or stopped
        if info.main and ((epoch + 1) % t.eval_every == 0 or last_epoch):  # the selection data: val, else test 1
            name = primary.split("/")[0]
            record.update(evaluate_sets(dist, {name: data.val if data.val is not None else data.tests[name]},
                                        device, t.amp))
        history.append(record)
        improved = primary in record and record[primary] >= best
        if improved:
            best = record[primary]
        if info.main:
            logger.write(record)
            save_epoch(ckpt_dir, epoch, best, history, record, improved, dist, opt, sched, scaler)
            if t.progress:
                log(f"epoch {epoch + 1}/{t.epochs} " + " ".join(
                    f"{k}={v:.4g}" for k, v in record.items() if k.startswith("loss/") or k.endswith("mAP50")))
        ddp.barrier(info)
        if stopped:
            break
    summary: dict = {"method": cfg.method.name, "seed": cfg.seed, "classes": data.classes, "world_size": info.world,
                     "replicas_identical": ddp.replicas_identical(dist, info)}
    if not summary["replicas_identical"]:
        log("warning: the DDP replicas' weights differ at the end of training (a rank ran other steps?)")
    if info.main:
        final = evaluate_sets(dist, data.tests, device, t.amp)
        selected = None  # a checkpoint is chosen on validation only, never on a test set (as classification)
        if data.val is not None:
            selected = select_best(ckpt_dir, dist, primary, dict(final, epoch=history[-1]["epoch"]), data.tests,
                                   lambda: evaluate_sets(dist, data.tests, device, t.amp))
        summary.update({"final": final, "selected": selected, "best": best, "history_len": len(history),
                        "student_params": sum(p.numel() for p in dist.student.parameters()),
                        "deployed_params": sum(p.numel() for p in dist.export().parameters())})
        logger.close()
        save_deployed(dist, cfg, data.classes, run_dir / "detector.pt")
        atomic_write_json(run_dir / "final.json", summary)
    ddp.barrier(info)
    return summary


def _silent(*_a, **_k) -> None:
    """Log sink of the non-zero ranks."""


def pretrain_teacher(cfg: DetExperimentConfig, out: str | Path | None = None, log=print) -> dict:
    """Train a detector on its own labelled task (student-only) and write ``teacher.pt``: the file a
    distillation config names as ``teacher.checkpoint`` (with the same detector section)."""
    out = Path(out or cfg.out)
    built = build(cfg, log=log)
    summary = train(cfg, out, built=built, log=log)
    ckpt = out / "teacher.pt"
    if "final" in summary:  # the main process (the others return no results)
        atomic_torch_save({"model": built.distiller.student.state_dict(), "classes": built.data.classes}, ckpt)
    return {"teacher_checkpoint": str(ckpt), "final": summary.get("final")}
