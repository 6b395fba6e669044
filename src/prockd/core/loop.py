"""The one training loop of every task, and what it is made of: seeding, devices, the optimiser and its
schedules, autocast, the optimiser step, the run logger.

:func:`run_training` owns the skeleton both tasks share (run directory and its lock, config file, optimiser,
resume, DDP wrapping, the epochs of steps, reduction over ranks, checkpoints, selection on validation,
``final.json``); a task plugs its data, step, evaluation and deployment file in through :class:`TaskHooks`
(:class:`prockd.classification.engine.ClassificationHooks`, :class:`prockd.detection.engine.DetectionHooks`).

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (+ TensorBoard events under
``tb/``), ``checkpoints/last.pt`` and ``best.pt`` (written atomically every epoch), ``final.json`` and the
task's deployable file. Running again on the same directory resumes exactly where it stopped.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from prockd.core import distributed as ddp
from prockd.core.checkpoint import resume_state, save_epoch
from prockd.core.io import atomic_save_figure, atomic_write_json, atomic_write_text, run_lock
from prockd.errors import ProckdError

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
        # the fused kernel (one pass per tensor instead of a loop of element-wise ops): on this project's 2-core CPU,
        # one thread, an AdamW step on 34 M parameters 166 -> 41 ms; at the paper's scale the update of ProC-KD's own
        # 20 M parameters was 123 of the 288 ms it added to a step (docs/research/vit.md, "PL / FA at the paper's scale")
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                    for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, lr=t.lr, fused=fused or None)
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


class RunLogger:
    """``metrics.jsonl`` (records of epochs a resume redoes dropped) and TensorBoard scalars (when installed)."""

    def __init__(self, run_dir: Path, start_epoch: int, use_tb: bool = True):
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():  # drop records of epochs that will be redone after a resume
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("epoch", -1) < start_epoch]
            atomic_write_text(self.path, "".join(k + "\n" for k in keep))
        self.tb = None
        if use_tb:
            try:  # tensorboard is a dependency, but a broken install must not stop training
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:
                self.tb = None

    def write(self, record: dict) -> None:
        """Append one epoch's record."""
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.tb.add_scalar(k, v, record.get("epoch", 0))
            self.tb.flush()

    def close(self):
        """Flush and close TensorBoard."""
        if self.tb:
            self.tb.close()


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


def silent(*_args, **_kwargs) -> None:
    """Log sink of the non-zero ranks."""


def make_scheduler(opt, t, steps_per_epoch: int):
    """Per-step learning-rate schedule: warm-up, then steps at epoch milestones or a cosine decay."""
    total = steps_per_epoch * t.epochs
    warm = int(round(t.warmup_epochs * steps_per_epoch))
    if t.schedule == "step":
        bounds = [m * steps_per_epoch for m in t.milestones]
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_step(s, warm, bounds, t.gamma))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, warm, t.lr, t.min_lr))


def lr_factor(step: int, warmup: int, factor: float, bounds: list[int], gamma: float,
              cosine_total: int | None = None, floor: float = 0.0) -> float:
    """mmdet's schedule: linear warm-up from ``factor`` over ``warmup`` steps, times ``gamma`` per milestone passed;
    with ``cosine_total`` (steps) a cosine decay from 1 to ``floor`` over the whole run instead of the milestones
    (mmdet's ``CosineAnnealingLR`` by iteration, warm-up included)."""
    if cosine_total is not None:
        base = warmup_cosine(step, cosine_total, 0, 1.0, floor)
    else:
        base = gamma ** sum(step >= b for b in bounds)
    if warmup > 0 and step < warmup:
        return base * (factor + (1 - factor) * step / warmup)
    return base


class TaskHooks:
    """What a task plugs into :func:`run_training`. ``cfg`` is the run's config (``cfg.train`` the recipe),
    ``distiller`` the method (a :class:`prockd.core.distiller.DistillerBase`), ``device`` where it runs."""

    nesterov: bool = True  # SGD's Nesterov momentum (detection follows mmdet: plain momentum)

    def __init__(self, cfg, distiller, device: torch.device):
        self.cfg, self.distiller, self.device = cfg, distiller, device

    def config_text(self) -> str:
        """The resolved config written to ``config.yaml``."""
        raise NotImplementedError

    def setup(self, info: ddp.DistInfo, log) -> None:
        """Anything that may still fail on bad input, before the run directory is written (default: nothing)."""

    def before_training(self, run_dir: Path, info: ddp.DistInfo, log) -> None:
        """After ``config.yaml`` is written, before the optimiser exists (teacher checks, caches, data-dependent
        initialisation; default: nothing)."""

    def steps_per_epoch(self, info: ddp.DistInfo) -> int:
        """Optimiser steps per epoch (what the schedule counts in)."""
        raise NotImplementedError

    def scheduler(self, opt, steps_per_epoch: int):
        """The per-step learning-rate schedule."""
        raise NotImplementedError

    def after_resume(self, run_dir: Path, start_epoch: int, info: ddp.DistInfo) -> None:
        """After the resume, before DDP wraps the distiller (default: nothing)."""

    def epoch_batches(self, epoch: int, info: ddp.DistInfo):
        """The epoch's batches (an iterable; its generators are seeded from the run's seed and the epoch)."""
        raise NotImplementedError

    def step_inputs(self, batch, info: ddp.DistInfo):
        """One batch on the device: (inputs for :meth:`forward`, this rank's share of the global batch)."""
        raise NotImplementedError

    def forward(self, model, inputs) -> dict[str, torch.Tensor]:
        """The training forward of ``model`` (the distiller, or its DDP wrapper): named losses."""
        raise NotImplementedError

    def record_head(self, step: int) -> dict:
        """Entries of an epoch's record before its losses (default: none)."""
        return {}

    def evaluate_epoch(self, epoch: int, last_epoch: bool, info: ddp.DistInfo) -> dict:
        """The end of an epoch's metrics (the selection metric among them when it is due)."""
        raise NotImplementedError

    primary: str = ""  # the selection metric's record key, set by the task

    def improved(self, record: dict, best: float) -> bool:
        """Whether ``record`` beats the best selection score so far."""
        raise NotImplementedError

    def progress_keys(self, key: str) -> bool:
        """Whether a record entry appears in the epoch's console line."""
        raise NotImplementedError

    def headline(self, record: dict) -> str | None:
        """What leads the epoch's console line: the selection metric (default: ``primary=value``), None when the
        epoch has no evaluation."""
        return f"{self.primary}={record[self.primary]:.4g}" if self.primary in record else None

    def finish(self, run_dir: Path, history: list, best: float, info: ddp.DistInfo, log) -> dict:
        """After the last epoch: final and selected test results, the summary written to ``final.json``."""
        raise NotImplementedError

    def teacher_reference(self) -> dict | None:
        """The frozen teacher as checkpoints name it (``source``: where its weights come from, ``digest``: a SHA-1
        of them), never its weights; None without a teacher (default)."""
        return None

    def save_deployed(self, run_dir: Path) -> None:
        """The task's deployable file in the run directory (rank 0)."""
        raise NotImplementedError


# what a run may change and still continue in its directory: how many epochs, and how and where it runs
CONTINUABLE = {"out", "train.epochs", "train.progress", "train.num_threads", "train.device", "train.keep_state",
               "data.num_workers", "cache.dir", "cache.enabled", "teacher.finetune.dir"}
OWN_ENTRIES = {".lock", ".finetune.lock", "base.pt"}  # what prockd may leave in a folder before its config.yaml


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _short(v) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _epochs_done(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    return max((json.loads(x).get("epoch", -1) + 1 for x in lines if x.strip()), default=0)


def check_run_dir(run_dir: Path, config_text: str) -> tuple[str, str | None]:
    """Whether ``run_dir`` can take a run of this config, before anything is written there: ``("new", None)`` for a
    new or empty folder, ``("finished", None)`` for a finished run of the same config (nothing to train),
    ``("resume", changes)`` for a run to continue (``changes``: the settings it continues with, in one line, or None).
    A folder holding other files, a run of another model, data or method (any key but :data:`CONTINUABLE`), fewer
    epochs than it trained, or more epochs for a finished run that kept no resumable state (``train.keep_state``) is a
    one-line :class:`~prockd.errors.ProckdError` that names the keys and says to use a new ``--out``."""
    if not run_dir.is_dir():
        return "new", None
    entries = sorted(p.name for p in run_dir.iterdir())
    if set(entries) <= OWN_ENTRIES:
        return "new", None
    stored = run_dir / "config.yaml"
    if not stored.is_file():
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise ProckdError(f"--out {run_dir} is a folder of other files ({shown}), not a prockd run: choose a new folder "
                          "(or an empty one) for the run")
    try:
        old = _flat(yaml.safe_load(stored.read_text()))
    except (OSError, yaml.YAMLError) as e:
        raise ProckdError(f"{stored} is unreadable ({type(e).__name__}): this run cannot be continued; use a new "
                          "--out") from None
    new = _flat(yaml.safe_load(config_text))
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    hard = [k for k in diff if k not in CONTINUABLE]
    if hard:
        shown = "; ".join(f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}" for k in hard[:3])
        raise ProckdError(f"--out {run_dir} holds a run of another config ({shown}"
                          + (f"; and {len(hard) - 3} more keys" if len(hard) > 3 else "")
                          + "): its checkpoints do not fit this one. Use a new --out, or the run's own config "
                            f"({stored}); nothing was changed")
    finished = (run_dir / "final.json").is_file()
    resumable = (run_dir / "checkpoints" / "last.pt").is_file()
    done, epochs = _epochs_done(run_dir), new.get("train.epochs")
    if isinstance(epochs, int) and epochs < done:
        raise ProckdError(f"--out {run_dir}: train.epochs {old.get('train.epochs')} -> {epochs}, but the run has trained "
                          f"{done} epochs: use a new --out for a shorter run; nothing was changed")
    if finished and epochs == old.get("train.epochs"):
        return "finished", None
    if finished and not resumable:
        raise ProckdError(f"--out {run_dir}: train.epochs {old.get('train.epochs')} -> {epochs}, but the finished run "
                          "kept no resumable state (train.keep_state: false): train the longer run in a new --out, "
                          "and set train.keep_state: true on runs you mean to extend; nothing was changed")
    changes = "; ".join(f"{k} {_short(old.get(k))} -> {_short(new.get(k))}" for k in diff if k != "out")
    return "resume", changes or None


def plot_run(path: Path, history: list[dict], primary: str, chosen: int | None = None) -> None:
    """A run's own ``curves.png``: its training losses and its selection metric per epoch (1-based, as the
    console), the chosen epoch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    for k in sorted({k for h in history for k in h if k.startswith("loss/")}):
        pts = [(h["epoch"] + 1, h[k]) for h in history if k in h]
        a.plot([e for e, _ in pts], [v for _, v in pts], label=k.removeprefix("loss/"), lw=1.2)
    a.set_xlabel("epoch")
    a.set_ylabel("training loss")
    if a.get_legend_handles_labels()[0]:
        a.legend(fontsize=7)
    pts = [(h["epoch"] + 1, h[primary]) for h in history if primary in h]
    b.plot([e for e, _ in pts], [v for _, v in pts], marker=".", lw=1.2)
    if chosen is not None:
        b.axvline(chosen, color="gray", ls="--", lw=1, label=f"chosen: epoch {chosen}")
        b.legend(fontsize=7)
    b.set_xlabel("epoch")
    b.set_ylabel(primary)
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)


def run_training(hooks: TaskHooks, run_dir: str | Path, *, log=print) -> dict:
    """Train (or resume) one run of any task; returns the summary also written to ``final.json``.

    The run directory is checked first (:func:`check_run_dir`): a folder of other files or a run of another config is
    refused before anything is written; a finished run of the same config returns its ``final.json`` without training;
    a run continued with more epochs says so. Under ``torchrun`` (``WORLD_SIZE > 1``) the run is data-parallel (DDP):
    rank 0 alone logs and writes checkpoints, metrics are reduced over ranks. The run directory belongs to one
    process (:func:`prockd.core.io.run_lock`, held by rank 0): a second run on it is an error.
    """
    run_dir = Path(run_dir)
    state, changes = check_run_dir(run_dir, hooks.config_text())
    if state == "finished":
        log(f"{run_dir} holds this run, finished ({_epochs_done(run_dir)} epochs): nothing to train; its results are "
            f"in {run_dir / 'final.json'}")
        return json.loads((run_dir / "final.json").read_text())
    if changes:
        log(f"{run_dir}: continuing the run with {changes}")
    with run_lock(run_dir, ddp.env_info().main):
        return _run(hooks, run_dir, log)


def _run(hooks: TaskHooks, run_dir: Path, log) -> dict:
    """:func:`run_training` inside the run directory's lock."""
    cfg, dist, device = hooks.cfg, hooks.distiller, hooks.device
    t = cfg.train
    t_start = time.perf_counter()
    info = ddp.setup(device.type)
    if not info.main:
        log = silent
    hooks.setup(info, log)
    if info.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", hooks.config_text())
    ckpt_dir = run_dir / "checkpoints"
    hooks.before_training(run_dir, info, log)
    params = dist.learnable_parameters()
    opt = make_optimizer(params, t, nesterov=hooks.nesterov)
    steps_per_epoch = hooks.steps_per_epoch(info)
    sched = hooks.scheduler(opt, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=(t.amp == "fp16" and device.type == "cuda"))
    teacher_ref = hooks.teacher_reference()
    start_epoch, best, history = resume_state(ckpt_dir / "last.pt", dist, opt, sched, scaler, log, teacher_ref)
    outside_epochs = time.perf_counter() - t_start  # this process's set-up (caches, data) before the first epoch
    hooks.after_resume(run_dir, start_epoch, info)
    model = dist
    if info.enabled:  # after the resume: DDP broadcasts rank 0's (identical) state at construction
        model = DistributedDataParallel(dist, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=True)
    logger = RunLogger(run_dir, start_epoch) if info.main else None
    max_steps = getattr(t, "max_steps", None)
    step = start_epoch * steps_per_epoch
    stopped = False
    for epoch in range(start_epoch, t.epochs):
        dist.set_epoch(epoch, t.epochs)
        dist.train()
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        n = 0
        bar = tqdm(hooks.epoch_batches(epoch, info), total=steps_per_epoch, leave=False,
                   disable=not (t.progress and info.main), desc=f"epoch {epoch + 1}/{t.epochs}")
        for batch in bar:
            inputs, share = hooks.step_inputs(batch, info)
            with autocast(device, t.amp):
                losses = hooks.forward(model, inputs)
                loss = sum(losses.values())
            optimizer_step(loss, losses, epoch, opt, scaler, sched, params, t.clip_grad,
                           share if info.enabled else 1.0)
            step += 1
            n += 1
            for k, v in losses.items():
                sums["loss/" + k] = sums.get("loss/" + k, 0.0) + float(v.detach()) * share / info.world
            for k, v in dist.step_stats().items():
                sums["train/" + k] = sums.get("train/" + k, 0.0) + float(v) * share / info.world
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            if max_steps and step >= max_steps:
                stopped = True
                break
        keys = sorted(sums)
        reduced = ddp.all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device), info)
        record = {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "time_s": time.perf_counter() - t0,
                  **hooks.record_head(step)}
        record.update({k: v / max(1, n) for k, v in zip(keys, reduced.tolist())})
        record.update({f"diag/{k}": v for k, v in dist.epoch_stats().items()})
        record.update(hooks.evaluate_epoch(epoch, epoch + 1 == t.epochs or stopped, info))
        record["wall_s"] = time.perf_counter() - t0  # the epoch's steps and its evaluation
        history.append(record)
        improved = hooks.improved(record, best)
        if improved:
            best = record[hooks.primary]
        if info.main:
            logger.write(record)
            save_epoch(ckpt_dir, epoch, best, history, record, improved, dist, opt, sched, scaler, teacher_ref)
        ddp.barrier(info)  # no rank runs ahead of the checkpoint
        if t.progress:
            head = hooks.headline(record)
            log(f"epoch {epoch + 1}/{t.epochs}: " + (f"{head} | " if head else "") + " ".join(
                f"{k}={v:.4g}" for k, v in record.items() if hooks.progress_keys(k) and k != hooks.primary))
        if stopped:
            break
    t_finish = time.perf_counter()
    summary = hooks.finish(run_dir, history, best, info, log)
    for part in ("final", "selected"):  # final.json counts epochs from 1, as the console does (metrics.jsonl from 0)
        if isinstance(summary.get(part), dict) and isinstance(summary[part].get("epoch"), int):
            summary[part]["epoch"] += 1
    # the run's cost on this machine: every epoch (a resumed run's earlier ones from their records), this process's
    # set-up and the final evaluation (a killed process's set-up is not counted)
    summary["wall_s"] = round(sum(h.get("wall_s", h.get("time_s", 0.0)) for h in history) + outside_epochs
                              + time.perf_counter() - t_finish, 1)
    if info.main:
        summary["checkpoint_mb"] = {f.name: round(f.stat().st_size / 2**20, 2) for f in sorted(ckpt_dir.glob("*.pt"))
                                    if getattr(t, "keep_state", False) or f.name != "last.pt"}
        logger.close()
        hooks.save_deployed(run_dir)
        atomic_write_json(run_dir / "final.json", summary)
        plot_run(run_dir / "curves.png", history, hooks.primary, (summary.get("selected") or {}).get("epoch"))
        if not getattr(t, "keep_state", False):  # a finished run keeps what a user needs, not its optimiser's state
            (ckpt_dir / "last.pt").unlink(missing_ok=True)
    ddp.barrier(info)
    return summary
