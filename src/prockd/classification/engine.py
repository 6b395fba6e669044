"""Classification's engine: augmentation (stored views or live), the unlabelled transfer set and function
matching's mixtures, the teacher-feature cache, building a run, top-1 evaluation, and
:class:`ClassificationHooks`, its part of the one training loop (:func:`prockd.core.loop.run_training`).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from prockd.classification.cache import TeacherCache, tensor_digest
from prockd.classification.config import ExperimentConfig, FinetuneConfig, TrainConfig
from prockd.classification.finetune import finetuned_teacher
from prockd.classification.data import (
    IGNORE,
    MIXTURE_KEY,
    ArrayDataset,
    ChunkStream,
    ImageFiles,
    JoinedDataset,
    Task,
    build_task,
    chunk_loader,
    shifted_copies,
)
from prockd.classification.methods import Distiller, method_params
from prockd.classification.models import (
    Student,
    Teacher,
    count_params,
    create_model,
    init_student_from_teacher,
    weights_source,
)
from prockd.core import distributed as ddp
from prockd.core.checkpoint import save_teacher, select_best
from prockd.core.config import dump_config
from prockd.core.io import atomic_torch_save, atomic_write_json
from prockd.core.loop import (
    TaskHooks,
    autocast,
    make_scheduler,
    resolve_device,
    run_training,
    set_seed,
)
from prockd.errors import ProckdError


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


class StreamedViews:
    """``views`` deterministic augmented copies of images left on disk, decoded and augmented one by one when
    loaded (by loader workers): item ``v * N + i`` is view ``v`` of file ``i``, drawn from a generator seeded by
    (``v``, ``i``) alone, so the teacher cache and the student see the same pixels and nothing of size N stays in
    memory. The streamed counterpart of :func:`make_views` (whose views of in-memory sets draw from one
    sequential generator)."""

    def __init__(self, files: ImageFiles, views: int, t: TrainConfig):
        self.files, self.views, self.t = files, int(views), t

    def __len__(self) -> int:
        return self.views * len(self.files)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(items, C, H, W)."""
        return (len(self), *self.files.shape[1:])

    def load(self, idx) -> torch.Tensor:
        """uint8 items at positions ``idx``."""
        idx = [int(i) for i in torch.as_tensor(idx).reshape(-1)]
        n, out = len(self.files), []
        for j in idx:
            v, i = divmod(j, n)
            x = self.files.load([i]).float().div_(255.0)
            g = torch.Generator().manual_seed(VIEW_SEED * 1_000_003 + v * 100_000_007 + i)
            out.append(augment_batch(x, self.t.augment, g, self.t).mul(255).round().clamp(0, 255).to(torch.uint8))
        return torch.cat(out) if out else torch.zeros(0, *self.shape[1:], dtype=torch.uint8)

    def digest(self, h) -> None:
        """Feed the files' identity, the view count and the augmentation recipe to hash ``h``."""
        t = self.t
        h.update(f"views{self.views}|{VIEW_SEED}|{t.augment}|{t.aug_rotation}|{t.aug_scale}|{t.aug_shift}".encode())
        self.files.digest(h)


@dataclass
class StepPools:
    """What training steps draw images from: the labelled set's stored views (None: the set itself), the
    unlabelled transfer set's stored views (or the set itself; None without one), and what the teacher cache
    holds: the labelled items first, the unlabelled ones from ``offset`` on."""

    views: ArrayDataset | None
    unlabeled: ArrayDataset | None
    cached: ArrayDataset | JoinedDataset
    offset: int


def step_pools(task: Task, t: TrainConfig) -> StepPools:
    """The :class:`StepPools` of a task under a recipe (views made once, deterministically). An unlabelled set left
    on disk stays there: its views are :class:`StreamedViews` and the cache's items a :class:`JoinedDataset`."""
    views = make_views(task.train, t) if uses_views(t) else None
    labelled = views if views is not None else task.train
    if task.unlabeled is None:
        return StepPools(views, None, labelled, len(labelled))
    u = task.unlabeled
    if u.streaming:
        unl = u if views is None else ArrayDataset(StreamedViews(u.images, t.aug_views, t), u.labels.repeat(t.aug_views),
                                                   f"{u.name}_views{t.aug_views}", u.num_workers)
        return StepPools(views, unl, JoinedDataset([labelled, unl]), len(labelled))
    if labelled.streaming:
        raise ProckdError("data.unlabeled with data.stream needs stored views (train.augment and train.aug_views > 0)"
                          ": the labelled images must be in memory beside the unlabelled ones")
    unl = make_views(u, t) if views is not None else u
    cached = ArrayDataset(torch.cat([labelled.images, unl.images]), torch.cat([labelled.labels, unl.labels]),
                          f"{labelled.name}+{unl.name}")
    return StepPools(views, unl, cached, len(labelled))


class UnlabeledDraws:
    """An epoch's unlabelled draws from a set left on disk: ``steps`` batches of ``n`` images drawn with replacement
    (and one stored view each) up front from a generator of their own, then decoded ahead by loader workers.
    Iterating yields (uint8 images, item indices of ``pools.unlabeled``)."""

    def __init__(self, pools: StepPools, m: int, views: int, n: int, steps: int, seed: int,
                 stream: ChunkStream | None = None):
        g = torch.Generator().manual_seed(seed)
        i = torch.randint(m, (steps, n), generator=g)
        if views:
            i = torch.randint(views, (steps, n), generator=g) * m + i
        self.items, self.pools, self.stream = list(i), pools, stream

    def __iter__(self):
        ds = self.pools.unlabeled
        xs = self.stream.read(self.items) if self.stream is not None else \
            chunk_loader(ds.images, self.items, ds.num_workers)
        for b, x in zip(self.items, xs):
            yield x, b


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


def with_mixtures(distiller: Distiller, x: torch.Tensor, y: torch.Tensor, tf: dict | None, g: torch.Generator,
                  device=None) -> tuple[torch.Tensor, torch.Tensor, dict | None]:
    """A batch with the method's function-matching mixtures appended (:func:`mix_batch`, drawn from ``g``), their
    targets :data:`~prockd.classification.data.IGNORE`; precomputed teacher features ``tf`` get the live teacher's
    features of exactly those mixtures. The batch itself for methods without function matching. The training
    loop and :func:`prockd.build_distiller`'s module both call it: one implementation of the method's inputs."""
    mixing = distiller.function_matching()
    if mixing == "none":
        return x, y, tf
    xm = mix_batch(x, mixing, g)
    if tf is not None:  # Teacher.extract runs without autograd
        live = distiller.teacher.extract(xm.to(device if device is not None else xm.device))
        tf = {k: torch.cat([v, live[k].float()]) for k, v in tf.items()}
    if distiller.wants_mixture_rows():  # which rows are mixtures (sharded with the features under DDP)
        tf = {**(tf or {}), MIXTURE_KEY: torch.arange(len(x) + len(xm)) >= len(x)}
    return torch.cat([x, xm]), torch.cat([y, torch.full((len(xm),), IGNORE, dtype=y.dtype, device=y.device)]), tf


def noisy_student_view(distiller: Distiller, x: torch.Tensor, tf: dict | None, std: float, g: torch.Generator,
                       device=None, teacher_sees: str = "clean", p: float = 1.0) -> tuple[torch.Tensor, dict | None]:
    """Asymmetric views (``train.student_noise``): the teacher's features are fixed on the clean pixels (read from
    the cache, or a live forward here), and the student's copy of the batch gets Gaussian pixel noise of standard
    deviation ``std`` (clamped to [0, 1]), so every distillation term asks the student to map a noisy image to the
    teacher's view of the clean one; with ``p`` < 1 (``train.student_noise_p``) each image gets it with chance
    ``p`` and the others stay clean (drawn after the noise, so ``p`` = 1 draws exactly what it drew before).
    ``teacher_sees="noisy"`` is the symmetric control: the teacher runs live on the student's copy instead. A
    method without a teacher (student-only) gets the noise as plain augmentation. ``std`` 0 returns the batch as
    it is and draws nothing."""
    if std <= 0:
        return x, tf
    noise = torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.dtype)
    noisy = (x + std * noise).clamp_(0.0, 1.0)
    if p < 1.0:
        clean = torch.rand(len(x), generator=g) >= p
        noisy[clean] = x[clean]
    teacher = getattr(distiller, "teacher", None)
    if teacher is not None:
        if teacher_sees == "noisy":  # every row's features replaced by those of the noisy pixels
            live = teacher.extract(noisy.to(device if device is not None else x.device), distiller.teacher_keys)
            tf = {**(tf or {}), **live}
        elif tf is None or not set(tf) - {MIXTURE_KEY}:
            live = teacher.extract(x.to(device if device is not None else x.device), distiller.teacher_keys)
            tf = {**live, **(tf or {})}
    return noisy, tf


def unlabeled_batch(pools: StepPools, task: Task, t: TrainConfig, n: int, g: torch.Generator, draws=None):
    """``n`` unlabelled images drawn with replacement (one stored view each, or augmented live): (images in
    [0, 1], targets :data:`~prockd.classification.data.IGNORE`, teacher-cache indices). A set left on disk is drawn
    from ``draws`` (an iterator of :class:`UnlabeledDraws`, decoded ahead by loader workers)."""
    m = len(task.unlabeled)
    if pools.unlabeled.streaming:
        if draws is None:  # outside an epoch's loop: decode here
            draws = iter(UnlabeledDraws(pools, m, t.aug_views if pools.views is not None else 0, n, 1,
                                        int(torch.randint(2**31, (1,), generator=g))))
        x8, i = next(draws)
        x = x8.float().div_(255.0)
        if pools.views is None:
            x = augment_batch(x, t.augment, g, t)
        return x, torch.full((len(i),), IGNORE, dtype=torch.int64), pools.offset + i
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
    weights: dict[str, str] | None = None  # where the teacher's and the student's weights come from, in words
    finetune: dict | None = None  # the fine-tuned teacher's stage 1 (teacher.finetune): key, validation top-1, cost


def build(cfg: ExperimentConfig, task: Task | None = None, teacher: Teacher | None = None, log=print) -> Built:
    """Build task, teacher, student and distiller (raises ProckdError on any bad input). With ``teacher.finetune``
    (or a method that distils a fine-tuned teacher, ``finetune_distil``) the teacher is first fine-tuned on the task's
    labelled set, or read from the fine-tuned-teacher cache (:mod:`prockd.classification.finetune`)."""
    set_seed(cfg.seed)
    device = resolve_device(cfg.train.device)
    task = task or build_task(cfg.data)
    cls, params = method_params(cfg)
    notes: dict[str, list[str]] = {"teacher": [], "student": []}  # a checkpoint's new head, said beside its source
    weights = {"student": weights_source(cfg.student, "student")}
    ft_info = None
    ft = finetune_recipe(cfg, cls)
    if cls.needs_teacher and teacher is None:
        weights["teacher"] = weights_source(cfg.teacher, "teacher")  # a teacher without weights fails here
        if ft is not None:
            teacher, ft_info = finetuned_teacher(cfg, ft, task, build, train, log)
            weights["teacher"] = (f"{weights['teacher']}, fine-tuned on the task's labelled set "
                                  f"({ft_info['dir']}/teacher.pt)")
        else:
            teacher = Teacher(create_model(cfg.teacher, None, "teacher", notes["teacher"]), cfg.teacher)
    elif cls.needs_teacher:
        weights["teacher"] = "a teacher built by the caller"
    set_seed(cfg.seed)
    s_model = create_model(cfg.student, task.num_classes, "student", notes["student"])
    if cfg.student.init_from_teacher:  # from the teacher the config names, whatever the method (student-only too)
        if cfg.teacher is None:
            raise ProckdError("student.init_from_teacher: the config has no teacher section to copy the embedding and "
                              "first blocks from; add teacher: {name: ..., checkpoint: ...} or drop the key")
        if teacher is None or ft is not None:  # the pre-trained weights, also where the method distils a fine-tune
            weights.setdefault("teacher", weights_source(cfg.teacher, "teacher"))
            source = create_model(cfg.teacher, None, "teacher")
        else:
            source = teacher.model
        n = init_student_from_teacher(s_model, source)
        weights["student"] += f", {n} tensors (embedding, first blocks) copied from the teacher"
    if cfg.student.channels_last:
        s_model = s_model.to(memory_format=torch.channels_last)
    student = Student(s_model, cfg.student, need_embed=cls.uses_student_embed)
    if getattr(params, "student_noise", None) is not None and cfg.train.student_noise > 0:
        raise ProckdError(f"method.params.student_noise ({params.student_noise}, preset {getattr(params, 'preset', '')!r})"
                          f" and train.student_noise ({cfg.train.student_noise}) both set the noise on the student's "
                          "images: keep one (the method's replaces the recipe's)")
    distiller = cls(student, teacher if cls.needs_teacher else None, params, task.num_classes)
    distiller.to(device)
    if teacher is not None:
        teacher.to(device)
        if cfg.teacher.channels_last:
            teacher.model.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        compile_modules(distiller, cfg.train.compile_backend)
    for role, said in notes.items():  # "<role> checkpoint FILE: classifier ...": FILE is in the source already
        for note in said:
            weights[role] = f"{weights[role]}: {note.split(': ', 1)[1]}"
    return Built(cfg, task, teacher, distiller, device, weights, ft_info)


def fine_tuned_teacher(cfg: ExperimentConfig, task: Task, log=print) -> Teacher | None:
    """The run's teacher fine-tuned on ``task`` (stage 1 run here once, or read from its cache) when the run asks
    for one (:func:`finetune_recipe`), else None: what a comparison prepares before its workers start."""
    ft = finetune_recipe(cfg, method_params(cfg)[0])
    return None if ft is None else finetuned_teacher(cfg, ft, task, build, train, log)[0]


def finetune_recipe(cfg: ExperimentConfig, cls) -> FinetuneConfig | None:
    """The run's stage-1 recipe: ``teacher.finetune``, else the defaults for a method that distils a fine-tuned
    teacher (``finetune_distil``), else None (the teacher stays as pre-trained)."""
    if not cls.needs_teacher or cfg.teacher is None:
        return None
    if cfg.teacher.finetune is not None:
        return cfg.teacher.finetune
    return FinetuneConfig() if getattr(cls, "needs_finetune", False) else None


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
def teacher_accuracy(teacher: Teacher, task: Task, device, batch_size: int = 256,
                     cache_dir: str | Path | None = None) -> dict[str, float]:
    """Accuracy (%) of the teacher on its own labelled task (first test set). With ``cache_dir`` the result is
    kept there, keyed like the teacher-feature cache (the teacher, its weights, the images and labels): the
    runs of a comparison share one frozen teacher and compute it once."""
    name, ds = next(iter(task.tests.items()))
    path = None
    if cache_dir is not None:
        ident = {"teacher": teacher.describe(), "weights": tensor_digest(teacher.model.state_dict()),
                 "data": ds.fingerprint(), "name": name}
        key = hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:20]
        path = Path(cache_dir).expanduser() / "teacher_accuracy" / f"{key}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass  # not computed yet (or unreadable): compute it again
    correct = 0
    for x, y, _ in ds.batches(batch_size):
        correct += int((teacher.predict(x.to(device)).argmax(-1).cpu() == y).sum())
    res = {f"teacher/{name}": 100.0 * correct / max(1, len(ds))}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, res)
    return res


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


def step_batch(b: Built, cfg: ExperimentConfig, x, y, idx, pools: StepPools, cache, g, gu, info, draws=None):
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
        xu, yu, iu = unlabeled_batch(pools, b.task, t, cfg.data.unlabeled.batch_size or t.batch_size, gu, draws)
        x, y, idx = torch.cat([x, xu]), torch.cat([y, yu]), torch.cat([idx, iu])
    tf = cache.get(idx, device) if cache is not None else None
    x, y, tf = with_mixtures(b.distiller, x, y, tf, gu, device)
    std, p = b.distiller.view_noise(t.student_noise, t.student_noise_p)
    x, tf = noisy_student_view(b.distiller, x, tf, std, gu, device, t.student_noise_teacher, p)
    share = 1.0
    if info.enabled:  # every rank draws the same global batch (and its augmentation), then keeps its shard
        part = ddp.shard(torch.arange(len(y)), info)
        share = len(part) * info.world / max(len(y), info.world)
        x, y = x[part], y[part]
        tf = {k: v[part.to(v.device)] for k, v in tf.items()} if tf is not None else None
    return x.to(device), y.to(device), tf, share


class ClassificationHooks(TaskHooks):
    """Classification's part of the training loop (:func:`prockd.core.loop.run_training`): stored augmented
    views or live augmentation, unlabelled draws and function matching's mixtures, the teacher-feature cache,
    top-1 accuracy of every output, selection on ``val/deployed``, ``student.pt``."""

    def __init__(self, cfg: ExperimentConfig, b: Built, teacher_task: Task | None = None):
        super().__init__(cfg, b.distiller, b.device)
        self.b, self.teacher_task = b, teacher_task
        self.teacher_metrics: dict = {}
        self.pools: StepPools | None = None
        self.draws = None  # the epoch's unlabelled draws from disk (UnlabeledDraws)
        self.stream: ChunkStream | None = None  # their loader workers, started once
        self.cache = None
        # best.pt is chosen on the validation split when the task has one (never on a test set)
        self.primary = "val/deployed" if b.task.val is not None else f"{next(iter(b.task.tests))}/deployed"

    def config_text(self) -> str:
        """The resolved config as YAML."""
        return dump_config(self.cfg)

    def teacher_reference(self) -> dict | None:
        """The frozen teacher by reference (its weights' source and a digest of them) for the checkpoints."""
        if self.b.teacher is None:
            return None
        return {"source": (self.b.weights or {}).get("teacher"), "digest": tensor_digest(self.b.teacher.model.state_dict())}

    def setup(self, info, log) -> None:
        """The teacher's own task (to check its accuracy), built before anything is written."""
        if self.teacher_task is None and self.cfg.teacher_eval.data is not None and self.b.teacher is not None \
                and self.b.finetune is None:  # a fine-tuned teacher's head is the student's task's, not its own
            self.teacher_task = build_task(self.cfg.teacher_eval.data)

    def before_training(self, run_dir, info, log) -> None:
        """The teacher's accuracy on its own task, the step pools, the teacher cache, the method's
        data-dependent initialisation."""
        b, cfg, device, t = self.b, self.cfg, self.device, self.cfg.train
        for role, source in (b.weights or {}).items():
            log(f"{role} weights: {source}")
        if b.task.unlabeled is not None:
            u, info_ = b.task.unlabeled, b.task.info
            by = (f"{u.num_workers} loader worker" + ("s" if u.num_workers > 1 else "")) if u.num_workers else \
                "the training process"
            log(f"unlabelled transfer set: {len(u)} images" + (f", left on disk under {cfg.data.unlabeled.dir} and "
                f"decoded by {by}" if u.streaming else " in memory"))
            if info_.get("unlabeled_skipped"):
                log(f"data.unlabeled.dir: skipped {info_['unlabeled_skipped']} unreadable files (not images, or a "
                    f"broken header), e.g. {', '.join(info_['unlabeled_skipped_files'][:3])}")
        if b.finetune is not None and cfg.teacher_eval.data is not None:
            log("teacher accuracy on its own task: not measured (the teacher was fine-tuned on this task with a new "
                "head; its validation top-1 is in the line above)")
        elif b.teacher is not None and self.teacher_task is not None:
            self.teacher_metrics = teacher_accuracy(b.teacher, self.teacher_task, device,
                                                    cache_dir=cfg.cache.dir if cfg.cache.enabled else None)
            log(f"teacher accuracy on its own task: {self.teacher_metrics}")
        b.distiller.set_class_counts(torch.bincount(b.task.train.labels, minlength=b.task.num_classes))
        pools = self.pools = step_pools(b.task, t)
        cache = self.cache = open_teacher_cache(b, cfg, pools, info, log)
        if b.teacher is None:
            return
        # deterministic, before a resume overwrites it: fresh and resumed runs agree
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

        self.distiller.prepare(first_feats, cfg.seed, labelled_feats)

    def steps_per_epoch(self, info) -> int:
        """Global batches per epoch (every rank draws the same global batch and keeps its shard)."""
        return math.ceil(len(self.b.task.train) / self.cfg.train.batch_size)

    def scheduler(self, opt, steps_per_epoch: int):
        """Warm-up, then cosine or steps (:func:`prockd.core.loop.make_scheduler`)."""
        return make_scheduler(opt, self.cfg.train, steps_per_epoch)

    def after_resume(self, run_dir, start_epoch: int, info) -> None:
        """ProC-KD's initial prototypes, kept for the analysis figures (fresh runs only)."""
        initial = getattr(self.distiller, "prototypes", None)
        if initial is not None and start_epoch == 0 and info.main:
            atomic_torch_save(initial.detach().cpu().clone(), run_dir / "prototypes_init.pt")

    def epoch_batches(self, epoch: int, info):
        """The epoch's shuffled labelled batches; unlabelled draws and mixtures come from a generator of their
        own, so the labelled batches stay those of the run without them."""
        seed = self.cfg.seed * 1_000_003 + epoch
        self.g = torch.Generator().manual_seed(seed)
        self.gu = torch.Generator().manual_seed(seed + 500_009)
        self.draws = None
        p, t = self.pools, self.cfg.train
        if p is not None and p.unlabeled is not None and p.unlabeled.streaming:  # decoded ahead by loader workers
            if self.stream is None:  # loader workers started once for the run
                self.stream = ChunkStream(p.unlabeled.images, p.unlabeled.num_workers)
            self.draws = iter(UnlabeledDraws(p, len(self.b.task.unlabeled), t.aug_views if p.views is not None else 0,
                                             self.cfg.data.unlabeled.batch_size or t.batch_size,
                                             self.steps_per_epoch(info), seed + 700_001, self.stream))
        return self.b.task.train.batches(self.cfg.train.batch_size, self.g)

    def step_inputs(self, batch, info):
        """(images, targets, teacher features) of this rank (:func:`step_batch`) and its share."""
        x, y, idx = batch
        x, y, tf, share = step_batch(self.b, self.cfg, x, y, idx, self.pools, self.cache, self.g, self.gu, info,
                                     self.draws)
        return (x, y, tf), share

    def forward(self, model, inputs) -> dict:
        """The distiller's losses (its logits are not needed here)."""
        x, y, tf = inputs
        return model(x, y, teacher_feats=tf)[1]

    def evaluate_epoch(self, epoch: int, last_epoch: bool, info) -> dict:
        """Validation (the selection data) every ``eval_every`` epochs with the method's diagnostics; without a
        validation split, the first test set every ``eval_every`` epochs and every test set after the last
        epoch. With one, the test sets are read once, for the checkpoint chosen on validation (:meth:`finish`)."""
        b, t = self.b, self.cfg.train
        dist, device, out = b.distiller, b.device, {}
        if b.task.val is not None and ((epoch + 1) % t.eval_every == 0 or last_epoch):
            out.update(evaluate(dist, {"val": b.task.val}, device, t.amp, info=info))
            out.update(validation_diagnostics(dist, b.task.val, device, t.amp))
        if last_epoch and b.task.val is None:  # every test set (shifted domains too) at the end
            out.update(evaluate(dist, b.task.tests, device, t.amp, info=info))
        elif b.task.val is None and (epoch + 1) % t.eval_every == 0:
            first = next(iter(b.task.tests))
            out.update(evaluate(dist, {first: b.task.tests[first]}, device, t.amp, info=info))
        return out

    def improved(self, record: dict, best: float) -> bool:
        """Higher is better; on a validation split a tie goes to the later epoch (small splits saturate
        early)."""
        return record.get(self.primary, -1.0) > best or (self.b.task.val is not None and self.primary in record
                                                         and record[self.primary] == best)

    def headline(self, record: dict) -> str | None:
        """The deployed student's validation top-1 (the selection metric), first on the epoch's line."""
        if self.primary in record:
            where = "validation" if self.primary.startswith("val/") else self.primary.split("/")[0]
            return f"{where} top-1 {record[self.primary]:.2f} % (deployed student)"
        return None

    def progress_keys(self, key: str) -> bool:
        """Losses and accuracies."""
        return key.startswith(("loss/", "test", "val/")) and "/" in key

    def finish(self, run_dir, history: list, best: float, info, log) -> dict:
        """The last epoch's results and the test results of the checkpoint chosen on validation (also the last
        epoch's when it is the chosen one), with that checkpoint's accuracy on the setting's shifted copies of the
        validation split (``val_<kind><severity>/...``: what a choice of robustness recipe may read)."""
        b, cfg = self.b, self.cfg
        dist, device, t = b.distiller, b.device, cfg.train
        final = history[-1] if history else {}
        selected = None
        if b.task.val is not None:  # the checkpoint chosen on validation
            selected = select_best(run_dir / "checkpoints", dist, self.primary, final, b.task.tests,
                                   lambda: evaluate(dist, b.task.tests, device, t.amp, info=info))
            if selected is not None and selected["epoch"] == final.get("epoch"):
                final.update({k: v for k, v in selected.items() if k.split("/")[0] in b.task.tests})
            shifted_val = shifted_copies(b.task.val, cfg.data.corruptions)
            if selected is not None and shifted_val:  # the distiller holds the chosen checkpoint now
                selected.update(evaluate(dist, shifted_val, device, t.amp, info=info))
        own, deployed = count_params(dist.student), count_params(dist.export())
        if deployed != own:
            log(f"deployed student: {deployed:,} parameters, the student network's {own:,} and {deployed - own:,} "
                f"(+{100 * (deployed - own) / max(1, own):.0f} %) that {cfg.method.name} adds at deployment")
        return {"method": cfg.method.name, "seed": cfg.seed, "final": final, "selected": selected, "best": best,
                "student_params": own,
                "deployed_params": deployed,
                "teacher": self.teacher_metrics, "weights": b.weights, "train_counts": b.task.info.get("train_counts"),
                "unlabeled": ({"count": len(b.task.unlabeled), "streamed": b.task.unlabeled.streaming,
                               "skipped": b.task.info.get("unlabeled_skipped", 0)} if b.task.unlabeled is not None
                              else None),
                "world_size": info.world, "finetune": b.finetune,
                "teacher_images": ({"live": b.teacher.images_seen, "cached": getattr(self.cache, "rows_read", 0)}
                                   if b.teacher is not None else None)}

    def save_deployed(self, run_dir) -> None:
        """``student.pt``: the deployable student (:mod:`prockd.classification.deploy`)."""
        b = self.b
        b.distiller.export().save(run_dir / "student.pt", b.task.num_classes, b.task.class_names,
                                  b.task.image_shape)


def train(cfg: ExperimentConfig, run_dir: str | Path | None = None, *, log=print, built: Built | None = None,
          teacher_task: Task | None = None) -> dict:
    """Train (or resume) one classification run with :func:`prockd.core.loop.run_training`; returns the
    summary also written to ``final.json``.

    A run directory holds ``config.yaml``, ``metrics.jsonl``, ``checkpoints/``, ``final.json`` and the
    deployable ``student.pt``. With a validation split, ``best.pt`` is chosen on it (never on a test set), the
    test sets are evaluated only after the last epoch, for the last and for the selected checkpoint
    (``final.json``: ``final`` and ``selected``), and ``student.pt`` is the selected checkpoint.
    """
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    b = built or build(cfg, log=log)  # bad input fails here, before anything is written
    return run_training(ClassificationHooks(cfg, b, teacher_task), run_dir or cfg.out, log=log)


def pretrain_teacher(cfg: ExperimentConfig, out: str | Path | None = None, log=print) -> dict:
    """Train a network on its own labelled task (student-only) and write ``teacher.pt``: the file a
    distillation config names as ``teacher.checkpoint`` (with the same model section)."""
    out = Path(out or cfg.out)
    built = build(cfg)
    summary = train(cfg, out, built=built, log=log)
    ckpt = save_teacher(out / "teacher.pt", built.distiller.student.model)
    return {"teacher_checkpoint": str(ckpt), "final": summary["final"]}
