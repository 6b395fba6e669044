"""Training engine: optimiser, warm-up + cosine schedule, clipping, autocast, logging, checkpoints, resume.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl``, TensorBoard events,
``checkpoints/last.pt`` and ``best.pt`` (written atomically every epoch), ``final.json`` and the
deployable ``student.pt``. Running again on the same directory resumes exactly where it stopped.

With a validation split, ``best.pt`` is chosen on it (never on a test set), the test sets are evaluated only
after the last epoch, for the last and for the selected checkpoint (``final.json``: ``final`` and
``selected``), and ``student.pt`` is the selected checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from prockd import distributed as ddp
from prockd.cache import TeacherCache
from prockd.config import ExperimentConfig, TrainConfig, dump_config
from prockd.data import IGNORE, ArrayDataset, Task, build_task
from prockd.errors import ProckdError
from prockd.io import atomic_torch_save, atomic_write_json, atomic_write_text, run_lock
from prockd.methods import Distiller, method_params
from prockd.models import Student, Teacher, count_params, create_model, init_student_from_teacher

KILL_ENV = "PROCKD_KILL_AFTER_STEPS"  # fault injection for the resume test: SIGKILL after N steps


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available (``cuda:LOCAL_RANK`` under torchrun)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", ddp.env_info().local_rank)
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ProckdError(f"train.device '{name}' is not a device (use auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ProckdError(f"train.device is '{name}' but CUDA is not available")
    if dev.type == "cuda" and dev.index is None:  # one GPU per process under torchrun
        dev = torch.device("cuda", ddp.env_info().local_rank)
    return dev


def make_optimizer(params, t, nesterov: bool = True) -> torch.optim.Optimizer:
    """AdamW or SGD (``t``: a train config with optimizer, lr, momentum, weight_decay); no weight decay on 1-D
    parameters (norms, biases) or parameters flagged ``_no_decay`` (prototypes)."""
    decay, no_decay = [], []
    for p in params:
        (no_decay if p.ndim <= 1 or getattr(p, "_no_decay", False) else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr)
    return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=nesterov)


def warmup_cosine(step: int, total: int, warmup: int, base: float, floor: float) -> float:
    """Learning-rate factor: linear warm-up to 1, then cosine down to ``floor / base``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    f = floor / base
    return f + (1 - f) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def warmup_step(step: int, warmup: int, bounds: list[int], gamma: float) -> float:
    """Learning-rate factor: linear warm-up to 1, then ``gamma`` to the power of the milestones passed."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    return gamma ** sum(step >= b for b in bounds)


def autocast(device: torch.device, amp: str):
    """bf16 / fp16 autocast context (nullcontext for 'none')."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def affine_batch(x: torch.Tensor, g: torch.Generator, rotation: float, scale: float, shift: float) -> torch.Tensor:
    """Random affine map per image (uniform rotation in degrees, relative scale, shift as a fraction of the
    image), bilinear, zero padding."""
    b = x.shape[0]
    u = torch.rand(b, 4, generator=g, dtype=torch.float64) * 2 - 1
    ang = u[:, 0] * math.radians(rotation)
    s = 1.0 + u[:, 1] * scale
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s  # the grid maps output to input: inverse scale
    theta = torch.stack([torch.stack([cos, -sin, -2 * shift * u[:, 2]], -1),
                         torch.stack([sin, cos, -2 * shift * u[:, 3]], -1)], 1).to(x.dtype)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augment_batch(x: torch.Tensor, kind: str, g: torch.Generator, t: TrainConfig | None = None) -> torch.Tensor:
    """Augmentation on a batch: ``flip_crop`` (random horizontal flip + random crop with 1/8 padding) or
    ``affine`` (random rotation / scale / shift with ``t``'s ranges)."""
    if kind == "none":
        return x
    if kind == "affine":
        t = t or TrainConfig()
        return affine_batch(x, g, t.aug_rotation, t.aug_scale, t.aug_shift)
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=g) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    pad = max(1, h // 8)
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    return torch.stack([xp[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


VIEW_SEED = 20240  # augmented views depend on the data and the recipe only, not on the run's seed


def make_views(ds: ArrayDataset, t: TrainConfig) -> ArrayDataset:
    """``t.aug_views`` deterministic augmented copies of every training image, as one dataset: view ``v`` of
    image ``i`` is item ``v * len(ds) + i`` (uint8, so the teacher cache can key and store them)."""
    g = torch.Generator().manual_seed(VIEW_SEED)
    out = []
    for _ in range(t.aug_views):
        for x, _, _ in ds.batches(512):
            out.append(augment_batch(x, t.augment, g, t).mul(255).round().clamp(0, 255).to(torch.uint8))
    return ArrayDataset(torch.cat(out), ds.labels.repeat(t.aug_views), f"{ds.name}_views{t.aug_views}")


def uses_views(t: TrainConfig) -> bool:
    """Whether the recipe draws from stored augmented views (see :func:`make_views`)."""
    return t.augment != "none" and t.aug_views > 0


@dataclass
class StepPools:
    """What training steps draw images from: the labelled set's stored views (None: the set itself), the
    unlabelled transfer set's stored views (or the set itself; None without one), and what the teacher cache
    holds: the labelled items first, the unlabelled ones from ``offset`` on."""

    views: ArrayDataset | None
    unlabeled: ArrayDataset | None
    cached: ArrayDataset
    offset: int


def step_pools(task: Task, t: TrainConfig) -> StepPools:
    """The :class:`StepPools` of a task under a recipe (views made once, deterministically)."""
    views = make_views(task.train, t) if uses_views(t) else None
    labelled = views if views is not None else task.train
    if task.unlabeled is None:
        return StepPools(views, None, labelled, len(labelled))
    if labelled.streaming:
        raise ProckdError("data.unlabeled with data.stream needs stored views (train.augment and train.aug_views > 0)"
                          ": the labelled images must be in memory beside the unlabelled ones")
    unl = make_views(task.unlabeled, t) if views is not None else task.unlabeled
    cached = ArrayDataset(torch.cat([labelled.images, unl.images]), torch.cat([labelled.labels, unl.labels]),
                          f"{labelled.name}+{unl.name}")
    return StepPools(views, unl, cached, len(labelled))


def cached_dataset(task: Task, t: TrainConfig) -> ArrayDataset:
    """What the teacher cache holds for a recipe: the stored augmented views (or the training set itself),
    followed by the unlabelled transfer set's."""
    return step_pools(task, t).cached


def mix_batch(x: torch.Tensor, kind: str, g: torch.Generator) -> torch.Tensor:
    """Function matching's inputs (Beyer et al., CVPR 2022): each image mixed with another image of the batch
    (a random pairing), ``mixup``: ``λ x_i + (1 − λ) x_j``; ``cutmix``: a box of area ``1 − λ`` of ``x_j``
    pasted into ``x_i``; ``λ ~ U(0, 1)`` per image."""
    b, _, h, w = x.shape
    perm = torch.randperm(b, generator=g)
    lam = torch.rand(b, generator=g, dtype=torch.float64)
    if kind == "mixup":
        lv = lam.to(x.dtype).view(-1, 1, 1, 1)
        return lv * x + (1 - lv) * x[perm]
    side = (1 - lam).sqrt()
    ch, cw = (side * h).round().long(), (side * w).round().long()
    cy = (torch.rand(b, generator=g) * (h - ch + 1).float()).long()
    cx = (torch.rand(b, generator=g) * (w - cw + 1).float()).long()
    ys, xs = torch.arange(h).view(1, -1, 1), torch.arange(w).view(1, 1, -1)
    box = ((ys >= cy.view(-1, 1, 1)) & (ys < (cy + ch).view(-1, 1, 1))
           & (xs >= cx.view(-1, 1, 1)) & (xs < (cx + cw).view(-1, 1, 1)))
    return torch.where(box.unsqueeze(1), x[perm], x)


def unlabeled_batch(pools: StepPools, task: Task, t: TrainConfig, n: int, g: torch.Generator):
    """``n`` unlabelled images drawn with replacement (one stored view each, or augmented live): (images in
    [0, 1], targets :data:`~prockd.data.IGNORE`, teacher-cache indices)."""
    m = len(task.unlabeled)
    i = torch.randint(m, (n,), generator=g)
    if pools.views is not None:
        i = torch.randint(t.aug_views, (n,), generator=g) * m + i
        x = pools.unlabeled.images[i].float().div_(255.0)
    else:
        x = augment_batch(pools.unlabeled.images[i].float().div_(255.0), t.augment, g, t)
    return x, torch.full((n,), IGNORE, dtype=torch.int64), pools.offset + i


@torch.no_grad()
def validation_diagnostics(distiller: Distiller, ds: ArrayDataset, device, amp: str = "none",
                           batch_size: int = 256) -> dict[str, float]:
    """The method's own diagnostics (e.g. ProC-KD's teacher-path accuracy) on the validation split, averaged
    over images, with a live teacher; empty for methods without any."""
    distiller.eval()
    sums: dict[str, float] = {}
    for x, y, _ in ds.batches(batch_size):
        with autocast(device, amp):
            stats = distiller.diagnostics(x.to(device), y.to(device))
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(y)
    return {f"val/{k}": v / max(1, len(ds)) for k, v in sums.items()}


@dataclass
class Built:
    """Everything a run needs, built and validated before anything is written."""

    cfg: ExperimentConfig
    task: Task
    teacher: Teacher | None
    distiller: Distiller
    device: torch.device


def build(cfg: ExperimentConfig, task: Task | None = None, teacher: Teacher | None = None) -> Built:
    """Build task, teacher, student and distiller (raises ProckdError on any bad input)."""
    set_seed(cfg.seed)
    device = resolve_device(cfg.train.device)
    task = task or build_task(cfg.data)
    cls, params = method_params(cfg)
    if cls.needs_teacher and teacher is None:
        teacher = Teacher(create_model(cfg.teacher, None, "teacher"), cfg.teacher)
    set_seed(cfg.seed)
    s_model = create_model(cfg.student, task.num_classes, "student")
    if cfg.student.init_from_teacher:
        if teacher is None:
            raise ProckdError("student.init_from_teacher needs a teacher")
        init_student_from_teacher(s_model, teacher.model)
    if cfg.student.channels_last:
        s_model = s_model.to(memory_format=torch.channels_last)
    student = Student(s_model, cfg.student, need_embed=cls.uses_student_embed)
    distiller = cls(student, teacher if cls.needs_teacher else None, params, task.num_classes)
    distiller.to(device)
    if teacher is not None:
        teacher.to(device)
        if cfg.teacher.channels_last:
            teacher.model.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        compile_modules(distiller, cfg.train.compile_backend)
    return Built(cfg, task, teacher, distiller, device)


def compile_modules(distiller: Distiller, backend: str = "inductor") -> None:
    """``torch.compile`` the student network and the method's own modules in place (state-dict keys kept)."""
    distiller.student.model.compile(backend=backend)
    for name, m in distiller.named_children():
        if name != "student" and any(True for _ in m.parameters()):
            m.compile(backend=backend)


@torch.no_grad()
def evaluate(distiller: Distiller, datasets: dict[str, ArrayDataset], device, amp: str = "none",
             batch_size: int = 256, info: ddp.DistInfo = ddp.DistInfo()) -> dict[str, float]:
    """Top-1 accuracy (%) of every output of ``distiller.predict`` on every test set (under DDP each
    rank evaluates its shard and the counts are summed over ranks)."""
    distiller.eval()
    out = {}
    for name, ds in datasets.items():
        correct: dict[str, int] = {}
        indices = torch.arange(len(ds))[info.rank::info.world] if info.enabled else None
        for x, y, _ in ds.batches(batch_size, indices=indices):
            with autocast(device, amp):
                preds = distiller.predict(x.to(device))
            for k, logits in preds.items():
                correct[k] = correct.get(k, 0) + int((logits.argmax(-1).cpu() == y).sum())
        keys = sorted(correct)
        counts = ddp.all_reduce_sum(torch.tensor([correct[k] for k in keys], dtype=torch.float64, device=device), info)
        for k, c in zip(keys, counts.tolist()):
            out[f"{name}/{k}"] = 100.0 * c / max(1, len(ds))
    return out


@torch.no_grad()
def teacher_accuracy(teacher: Teacher, task: Task, device, batch_size: int = 256) -> dict[str, float]:
    """Accuracy (%) of the teacher on its own labelled task (first test set)."""
    name, ds = next(iter(task.tests.items()))
    correct = 0
    for x, y, _ in ds.batches(batch_size):
        correct += int((teacher.predict(x.to(device)).argmax(-1).cpu() == y).sum())
    return {f"teacher/{name}": 100.0 * correct / max(1, len(ds))}


class _Logger:
    def __init__(self, run_dir: Path, start_epoch: int, use_tb: bool = True):
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():  # drop records of epochs that will be redone after a resume
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("epoch", -1) < start_epoch]
            atomic_write_text(self.path, "".join(k + "\n" for k in keep))
        self.tb = None
        if use_tb:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:
                self.tb = None

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.tb.add_scalar(k, v, record.get("epoch", 0))
            self.tb.flush()

    def close(self):
        if self.tb:
            self.tb.close()


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def optimizer_step(loss: torch.Tensor, losses: dict, epoch: int, opt, scaler, sched, params, clip: float | None,
                   scale: float = 1.0) -> None:
    """One optimiser step on ``loss * scale`` (non-finite loss: an error naming every term; gradient clipping
    after unscaling; then the scheduler). Shared by the classification and detection loops."""
    if not torch.isfinite(loss):
        raise ProckdError(f"loss became {loss.item()} at epoch {epoch + 1} (losses: "
                          f"{ {k: float(v) for k, v in losses.items()} }); lower train.lr or loss weights")
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss * scale if scale != 1.0 else loss).backward()
    if clip:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, clip)
    scaler.step(opt)
    scaler.update()
    sched.step()


def resume_state(last: Path, dist, opt, sched, scaler, log=print) -> tuple[int, float, list]:
    """Load ``last.pt`` (distiller, optimiser, scheduler, scaler, RNG states) when it exists; returns
    (first epoch to run, best selection score, history). Shared by the classification and detection loops."""
    if not last.is_file():
        return 0, -1.0, []
    try:
        state = torch.load(last, map_location="cpu", weights_only=False)
        dist.load_state_dict(state["distiller"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
    except Exception as e:  # noqa: BLE001
        raise ProckdError(f"checkpoint {last} is unreadable or does not fit this config: {e}") from None
    log(f"resumed from {last} at epoch {state['epoch'] + 1}")
    return state["epoch"] + 1, state["best"], state["history"]


def open_teacher_cache(b: Built, cfg: ExperimentConfig, pools: StepPools, info, log):
    """The run's teacher-feature cache (built once per node, opened by the other ranks), or None when the
    teacher runs live (no teacher, cache disabled, or fresh augmentation every step)."""
    t = cfg.train
    if b.teacher is None or not cfg.cache.enabled:
        return None
    if t.augment != "none" and pools.views is None:
        log("train.augment draws a fresh view every step (train.aug_views=0): the teacher runs live on the "
            "augmented batch instead of from the cache")
        return None

    def open_cache():
        return TeacherCache(b.teacher, pools.cached, cfg.cache.dir, cfg.cache.dtype, device=b.device,
                            log=log).prepare()

    cache = open_cache() if info.local_rank == 0 else None
    ddp.barrier(info)
    return cache if cache is not None else open_cache()


def make_scheduler(opt, t, steps_per_epoch: int):
    """Per-step learning-rate schedule: warm-up, then steps at epoch milestones or a cosine decay."""
    total = steps_per_epoch * t.epochs
    warm = int(round(t.warmup_epochs * steps_per_epoch))
    if t.schedule == "step":
        bounds = [m * steps_per_epoch for m in t.milestones]
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_step(s, warm, bounds, t.gamma))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, warm, t.lr, t.min_lr))


def save_epoch(ckpt_dir: Path, epoch: int, best: float, history: list, record: dict, improved: bool, dist,
               opt, sched, scaler) -> None:
    """An epoch's ``last.pt`` (everything an exact resume needs) and, when it improved, ``best.pt`` (both
    atomic; both training loops)."""
    atomic_torch_save({"epoch": epoch, "best": best, "history": history, "distiller": dist.state_dict(),
                       "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                       "scaler": scaler.state_dict(), "rng": _rng_state()}, ckpt_dir / "last.pt")
    if improved:
        atomic_torch_save({"epoch": epoch, "distiller": dist.state_dict(), "metrics": record}, ckpt_dir / "best.pt")


def select_best(ckpt_dir: Path, dist, primary: str, final: dict, tests, evaluate_tests) -> dict | None:
    """The test results of the checkpoint chosen on ``primary`` (``best.pt``): the last epoch's own when it is
    the chosen one, else ``evaluate_tests()`` after loading it into ``dist``. None without a ``best.pt``."""
    path = ckpt_dir / "best.pt"
    if not path.is_file():
        return None
    chosen = torch.load(path, map_location="cpu", weights_only=False)
    selected = {"epoch": chosen["epoch"], primary: chosen["metrics"].get(primary)}
    if chosen["epoch"] == final.get("epoch"):  # the last epoch itself: its test results are already there
        selected.update({k: v for k, v in final.items() if k.split("/")[0] in tests})
    else:
        dist.load_state_dict(chosen["distiller"])
        selected.update(evaluate_tests())
    return selected


def _step_batch(b: Built, cfg: ExperimentConfig, x, y, idx, pools: StepPools, cache, g, gu, info):
    """The global batch of one step, each rank's shard of it, on the device: the labelled images (one stored
    view each, or augmented live), the unlabelled draws, function matching's mixtures; with their teacher
    features when a cache holds them (mixtures: a live teacher on exactly those pixels). Returns (images,
    targets, teacher features or None, this rank's share of the global batch)."""
    t, device = cfg.train, b.device
    if pools.views is not None:  # one of the stored views of each image: teacher and student see the same one
        idx = torch.randint(t.aug_views, (len(idx),), generator=g) * len(b.task.train) + idx
        x = pools.views.images[idx].float().div_(255.0)
    else:
        x = augment_batch(x, t.augment, g, t)
    if pools.unlabeled is not None:
        xu, yu, iu = unlabeled_batch(pools, b.task, t, cfg.data.unlabeled.batch_size or t.batch_size, gu)
        x, y, idx = torch.cat([x, xu]), torch.cat([y, yu]), torch.cat([idx, iu])
    tf = cache.get(idx, device) if cache is not None else None
    mixing = b.distiller.function_matching()
    if mixing != "none":
        xm = mix_batch(x, mixing, gu)
        if tf is not None:  # Teacher.extract runs without autograd
            live = b.teacher.extract(xm.to(device))
            tf = {k: torch.cat([v, live[k].float()]) for k, v in tf.items()}
        x, y = torch.cat([x, xm]), torch.cat([y, torch.full((len(xm),), IGNORE, dtype=torch.int64)])
    share = 1.0
    if info.enabled:  # every rank draws the same global batch (and its augmentation), then keeps its shard
        part = ddp.shard(torch.arange(len(y)), info)
        share = len(part) * info.world / max(len(y), info.world)
        x, y = x[part], y[part]
        tf = {k: v[part.to(v.device)] for k, v in tf.items()} if tf is not None else None
    return x.to(device), y.to(device), tf, share


def _train_epoch(b: Built, cfg: ExperimentConfig, model, epoch: int, step: int, pools: StepPools, cache, opt,
                 sched, scaler, params, info, kill_after: int) -> tuple[dict[str, float], int, int]:
    """One epoch of optimiser steps: (loss / stat sums over the rank's batches, batches, global step)."""
    t, dist = cfg.train, b.distiller
    steps_per_epoch = math.ceil(len(b.task.train) / t.batch_size)
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    # unlabelled draws and mixtures from a generator of their own: the labelled batches stay those of the run
    # without them
    gu = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch + 500_009)
    sums: dict[str, float] = {}
    n_batches = 0
    bar = tqdm(b.task.train.batches(t.batch_size, g), total=steps_per_epoch,
               disable=not (t.progress and info.main), desc=f"epoch {epoch + 1}/{t.epochs}", leave=False)
    for x, y, idx in bar:
        x, y, tf, share = _step_batch(b, cfg, x, y, idx, pools, cache, g, gu, info)
        with autocast(b.device, t.amp):
            _, losses = model(x, y, teacher_feats=tf)
            loss = sum(losses.values())
        optimizer_step(loss, losses, epoch, opt, scaler, sched, params, t.clip_grad,
                       share if info.enabled else 1.0)
        step += 1
        n_batches += 1
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) * share / info.world
        for k, v in dist.step_stats().items():
            sums["stat:" + k] = sums.get("stat:" + k, 0.0) + float(v) * share / info.world
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if kill_after and step >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    return sums, n_batches, step


def _epoch_evaluation(b: Built, epoch: int, t, info) -> dict:
    """The end of an epoch's metrics: validation (the selection data) every ``eval_every`` epochs, every test
    set after the last epoch; without a validation split, the first test set every ``eval_every`` epochs."""
    dist, device, out = b.distiller, b.device, {}
    last_epoch = epoch + 1 == t.epochs
    if b.task.val is not None and ((epoch + 1) % t.eval_every == 0 or last_epoch):
        out.update(evaluate(dist, {"val": b.task.val}, device, t.amp, info=info))
        out.update(validation_diagnostics(dist, b.task.val, device, t.amp))
    if last_epoch:  # every test set (shifted domains too) at the end
        out.update(evaluate(dist, b.task.tests, device, t.amp, info=info))
    elif b.task.val is None and (epoch + 1) % t.eval_every == 0:
        first = next(iter(b.task.tests))
        out.update(evaluate(dist, {first: b.task.tests[first]}, device, t.amp, info=info))
    return out


def train(cfg: ExperimentConfig, run_dir: str | Path | None = None, *, log=print, built: Built | None = None,
          teacher_task: Task | None = None) -> dict:
    """Train (or resume) one run; returns the summary also written to ``final.json``.

    Under ``torchrun`` (``WORLD_SIZE > 1``) the run is data-parallel (DDP): rank 0 alone logs and writes
    checkpoints, metrics are reduced over ranks, the teacher cache is built once per node and shared. The run
    directory belongs to one process (:func:`prockd.io.run_lock`, held by rank 0): a second run on it is an error.
    """
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    b = built or build(cfg)  # bad input fails here, before anything is written
    run_dir = Path(run_dir or cfg.out)
    with run_lock(run_dir, ddp.env_info().main):
        return _train(cfg, run_dir, b, log=log, teacher_task=teacher_task)


def _train(cfg: ExperimentConfig, run_dir: Path, b: Built, *, log, teacher_task: Task | None) -> dict:
    """:func:`train` inside the run directory's lock."""
    info = ddp.setup(b.device.type)
    if not info.main:
        log = _silent
    if teacher_task is None and cfg.teacher_eval.data is not None and b.teacher is not None:
        teacher_task = build_task(cfg.teacher_eval.data)
    dist, device, t = b.distiller, b.device, cfg.train
    if info.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    ckpt_dir = run_dir / "checkpoints"

    teacher_metrics = {}
    if b.teacher is not None and teacher_task is not None:
        teacher_metrics = teacher_accuracy(b.teacher, teacher_task, device)
        log(f"teacher accuracy on its own task: {teacher_metrics}")

    pools = step_pools(b.task, t)
    cache = open_teacher_cache(b, cfg, pools, info, log)

    if b.teacher is not None:  # deterministic, before a resume overwrites it: fresh and resumed runs agree
        first = torch.arange(min(len(b.task.train), 256))

        def first_feats() -> dict:
            if cache is not None:
                return cache.get(first, device)
            return b.teacher.extract(b.task.train.take(first).float().div(255).to(device))

        def labelled_feats() -> tuple[dict, torch.Tensor]:
            labelled = pools.views if pools.views is not None else b.task.train
            if cache is not None:
                return cache.get(torch.arange(len(labelled)), device), labelled.labels.to(device)
            parts = [b.teacher.extract(x.to(device)) for x, _, _ in labelled.batches(256)]
            return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}, labelled.labels.to(device)

        dist.prepare(first_feats, cfg.seed, labelled_feats)
    params = dist.learnable_parameters()
    opt = make_optimizer(params, t)
    steps_per_epoch = math.ceil(len(b.task.train) / t.batch_size)
    sched = make_scheduler(opt, t, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=(t.amp == "fp16" and device.type == "cuda"))

    last = ckpt_dir / "last.pt"
    start_epoch, best, history = resume_state(last, dist, opt, sched, scaler, log)
    initial_protos = getattr(dist, "prototypes", None)
    if initial_protos is not None and start_epoch == 0 and info.main:
        atomic_torch_save(initial_protos.detach().cpu().clone(), run_dir / "prototypes_init.pt")

    model = dist
    if info.enabled:  # after the resume: DDP broadcasts rank 0's (identical) state at construction
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(dist, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=True)
    logger = _Logger(run_dir, start_epoch) if info.main else None
    kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
    step = start_epoch * steps_per_epoch
    # best.pt is chosen on the validation split when the task has one (never on a test set)
    primary = "val/deployed" if b.task.val is not None else f"{next(iter(b.task.tests))}/deployed"
    for epoch in range(start_epoch, t.epochs):
        dist.set_epoch(epoch, t.epochs)
        dist.train()
        t0 = time.perf_counter()
        sums, n_batches, step = _train_epoch(b, cfg, model, epoch, step, pools, cache, opt, sched, scaler, params,
                                             info, kill_after)
        keys = sorted(sums)
        reduced = ddp.all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device), info)
        record = {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "time_s": time.perf_counter() - t0}
        for k, v in zip(keys, reduced.tolist()):
            record["train/" + k[5:] if k.startswith("stat:") else "loss/" + k] = v / max(1, n_batches)
        record.update({f"diag/{k}": v for k, v in dist.epoch_stats().items()})
        record.update(_epoch_evaluation(b, epoch, t, info))
        history.append(record)
        # on a validation split a tie goes to the later epoch (small splits saturate early)
        improved = record.get(primary, -1.0) > best or (b.task.val is not None and primary in record
                                                         and record[primary] == best)
        if improved:
            best = record[primary]
        if info.main:
            logger.write(record)
            save_epoch(ckpt_dir, epoch, best, history, record, improved, dist, opt, sched, scaler)
        ddp.barrier(info)  # no rank runs ahead of the checkpoint
        if t.progress:
            log(f"epoch {epoch + 1}/{t.epochs} " + " ".join(
                f"{k}={v:.4g}" for k, v in record.items() if k.startswith(("loss/", "test", "val/")) and "/" in k))
    final = history[-1] if history else {}
    selected = None
    if b.task.val is not None:  # the checkpoint chosen on validation
        selected = select_best(ckpt_dir, dist, "val/deployed", final, b.task.tests,
                               lambda: evaluate(dist, b.task.tests, device, t.amp, info=info))
    summary = {"method": cfg.method.name, "seed": cfg.seed, "final": final, "selected": selected, "best": best,
               "student_params": count_params(dist.student),
               "deployed_params": count_params(dist.export()),
               "teacher": teacher_metrics, "train_counts": b.task.info.get("train_counts"),
               "world_size": info.world}
    if info.main:
        logger.close()
        dist.export().save(run_dir / "student.pt", b.task.num_classes, b.task.class_names,
                           b.task.image_shape)
        atomic_write_json(run_dir / "final.json", summary)
    ddp.barrier(info)
    return summary


def _silent(*_args, **_kwargs) -> None:
    """Log sink of the non-zero ranks."""
