"""``prockd bench speed --task detection``: detection training steps with a live teacher, side by side in one run.

Variants, each a full optimiser step (transform, forward, backward, AdamW step) on the same batch, except
``teacher_forward``:

- ``student_only``: the student detector alone (RPN + RoI-head losses);
- ``teacher_forward``: the frozen teacher's backbone + FPN on the student's transformed batch (no step);
- ``cwd``, ``fgd``: a baseline with the live teacher;
- ``prockd``: ProC-KD with the live teacher (PL / FA on the levels, the teacher path's detection loss
  through the student's heads, mimic and embedding terms: ``teacher_head: shared``, the paper's reading);
  ``prockd_detached``, ``prockd_separate``, ``prockd_none``: the other ``teacher_head`` options (the teacher
  path's detection loss through detached heads, through a separate copy of the heads, or none), to show where
  ProC-KD's time goes;
- ``student_only_torchvision_roi``: student-only with torchvision's RoIAlign kernels (``student.roi_align:
  torchvision``) instead of the default sparse-product pooler (:mod:`prockd.detection.roi_align`), on CPU; the
  ratio ``roi_align_speedup`` is its step time over student-only's;
- ``student_only_unfolded_bn``: student-only with its frozen BatchNorms applied after their convolutions instead of
  folded into them (:func:`prockd.detection.models.fold_frozen_bn`); ``bn_fold_speedup`` its step time over
  student-only's.

Ratio per method: ``(t_method - t_teacher_forward - t_student_only) / (t_teacher_forward + t_student_only)``,
the time its distillation modules add (target <= 0.15), computed per round and reported as the median over
rounds (interleaved rounds: drifts of the machine hit all variants alike). Weights are random (the speed
of a step does not depend on them); images are random with fixed boxes.
"""
from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path

import torch

from prockd.bench.common import method_of
from prockd.bench.compare_detection import SUITE, embedded_configs
from prockd.bench.speed import print_speed_tables, time_interleaved
from prockd.core.config import deep_merge
from prockd.core.io import atomic_write_json
from prockd.core.loop import autocast, resolve_device
from prockd.detection.config import DetectorConfig
from prockd.detection.methods import DET_METHODS
from prockd.detection.models import DetTeacher, build_detector, unfold_frozen_bn
from prockd.glyphs import charset

DET_SCENARIOS = {
    # the embedded detection benchmark's detectors, as its config files define them (see _scenario), 128 px
    "embedded": {"image": [128, 128], "batch_size": 4, "classes": 8, "amp": "none"},
    # Table 2's detectors: ResNeXt-101 32x8d teacher, ResNet-50 student, Cityscapes-sized images (for GPUs)
    "paper": {"image": [1024, 2048], "batch_size": 2, "classes": 8, "amp": "bf16",
              "student": {"backbone": "resnet50", "min_size": [1024], "max_size": 2048},
              "teacher": {"backbone": "resnext101_32x8d", "min_size": [1024], "max_size": 2048, "num_classes": 91}},
}
# the baselines, ProC-KD as the paper reads it, and its other teacher-path options (the suite's variants; a row
# that only changes its teacher, as the fine-tuned-teacher one, steps as its method does)
METHODS = {"student_only": ("student_only", {}), "cwd": ("cwd", {}), "fgd": ("fgd", {}), "prockd": ("prockd", {}),
           **{label.replace("@", "_"): (method_of(label), params) for label, params in SUITE.variants.items()
              if label != "prockd@paper" and "teacher" not in params}}
TARGET = 0.15


def _scenario(name: str) -> dict:
    """A scenario with its detector sections; ``embedded`` reads them from ``configs/detection/embedded``
    (random weights: a step's speed does not depend on them)."""
    sc = copy.deepcopy(DET_SCENARIOS[name])
    if name == "embedded":  # the detection suite's setting: its detectors and class counts
        teacher_raw, student_raw = embedded_configs()
        sc["student"] = dict(student_raw["student"], backbone_weights="none")
        sc["teacher"] = dict(teacher_raw["student"], backbone_weights="none",
                             num_classes=len(charset(teacher_raw["data"]["canvas"]["charset"])))
        sc["classes"] = len(charset(student_raw["data"]["canvas"]["charset"]))
    return sc


def _batch(sc: dict, device) -> tuple[list[torch.Tensor], list[dict]]:
    """Random images with 3 fixed boxes each (classes cycling)."""
    h, w = sc["image"]
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for i in range(sc["batch_size"]):
        images.append(torch.rand(3, h, w, generator=g).to(device))
        boxes = torch.tensor([[0.1, 0.1, 0.35, 0.4], [0.5, 0.2, 0.8, 0.6], [0.3, 0.55, 0.6, 0.95]]) * torch.tensor(
            [w, h, w, h])
        labels = torch.tensor([(i + k) % sc["classes"] + 1 for k in range(3)])
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return images, targets


class _DetStep:
    """One optimiser step of a built detection distiller on a fixed batch."""

    def __init__(self, distiller, images, targets, amp: str, device):
        self.d, self.images, self.targets, self.amp, self.device = distiller, images, targets, amp, device
        self.d.train()
        self.opt = torch.optim.AdamW(distiller.learnable_parameters(), lr=1e-4)

    def __call__(self) -> None:
        with autocast(self.device, self.amp):
            loss = sum(self.d(self.images, self.targets).values())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def run_det_speed(scenario: str = "embedded", device: str = "auto", steps: int = 3, rounds: int = 5,
                  warmup: int = 2, batch_size: int | None = None, amp: str | None = None,
                  threads: int | None = None, out: Path | None = None, overrides: dict | None = None,
                  methods: tuple[str, ...] = tuple(METHODS)) -> dict:
    """Measure the detection variants side by side, print figures and ratios, write JSON."""
    if threads:
        torch.set_num_threads(threads)
    sc = deep_merge(_scenario(scenario), overrides or {})
    if batch_size:
        sc["batch_size"] = batch_size
    if amp:
        sc["amp"] = amp
    dev = resolve_device(device)
    t_cfg = DetectorConfig(**sc["teacher"])
    s_cfg = DetectorConfig(**sc["student"])
    torch.manual_seed(0)
    teacher = DetTeacher(build_detector(t_cfg, t_cfg.num_classes), s_cfg.mean, s_cfg.std).to(dev)
    images, targets = _batch(sc, dev)
    fns = {}
    built = {}
    for name in methods:
        m, params = METHODS[name]
        cls = DET_METHODS.get(m)
        torch.manual_seed(0)
        d = cls(build_detector(s_cfg, sc["classes"]), teacher if cls.needs_teacher else None, cls.Params(**params),
                sc["classes"]).to(dev)
        built[name] = d
        fns[name] = _DetStep(d, images, targets, sc["amp"], dev)
    # student-only without each CPU speed change, beside it: row -> (its ratio, whether it differs here, detector)
    without = {"student_only_torchvision_roi": (
                   "roi_align_speedup", dev.type == "cpu" and s_cfg.roi_align == "auto",
                   lambda: build_detector(s_cfg.model_copy(update={"roi_align": "torchvision"}), sc["classes"])),
               "student_only_unfolded_bn": (
                   "bn_fold_speedup", True, lambda: unfold_frozen_bn(build_detector(s_cfg, sc["classes"])))}
    student_only = DET_METHODS.get("student_only")
    for row, (_, differs, detector) in without.items():
        if "student_only" in methods and differs:
            torch.manual_seed(0)
            d = student_only(detector(), None, student_only.Params(), sc["classes"]).to(dev)
            fns[row] = _DetStep(d, images, targets, sc["amp"], dev)
    s0 = built.get("student_only") or next(iter(built.values()))
    with torch.no_grad():
        il, _ = s0.student.transform(images, targets)
        sizes = [f.shape[-2:] for f in s0.student.backbone(il.tensors).values()]

    def teacher_forward():
        with autocast(dev, sc["amp"]):
            teacher.pyramid(il.tensors, sizes)

    fns["teacher_forward"] = teacher_forward
    per = time_interleaved(fns, dev, steps, rounds, warmup)
    times = {k: statistics.median(v) for k, v in per.items()}
    ratios, spread = {}, {}
    for name in methods:
        if name == "student_only" or "student_only" not in per:
            continue
        vals = [(per[name][i] - per["teacher_forward"][i] - per["student_only"][i])
                / (per["teacher_forward"][i] + per["student_only"][i]) for i in range(rounds)]
        ratios[f"{name}_overhead"] = statistics.median(vals)
        spread[f"{name}_overhead"] = [min(vals), max(vals)]
    for row, (ratio, _, _) in without.items():
        if row in per:
            vals = [per[row][i] / per["student_only"][i] for i in range(rounds)]
            ratios[ratio] = statistics.median(vals)
            spread[ratio] = [min(vals), max(vals)]
    bs = sc["batch_size"]
    result = {"task": "detection", "scenario": scenario, "device": str(dev),
              "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "batch_size": bs, "image": sc["image"], "amp": sc["amp"], "threads": torch.get_num_threads(),
              "steps": steps, "rounds": rounds, "step_seconds": times,
              "images_per_second": {k: bs / v for k, v in times.items()}, "ratios": ratios,
              "ratio_range_over_rounds": spread, "per_round_seconds": per, "target": TARGET,
              "met": {k: v <= TARGET for k, v in ratios.items() if k.endswith("_overhead")},
              "params": {"student": sum(p.numel() for p in s0.student.parameters()),
                         "teacher": sum(p.numel() for p in teacher.parameters()),
                         **{f"{k}_trainable": sum(p.numel() for p in d.learnable_parameters()) for k, d in built.items()}}}
    print(f"prockd bench speed --task detection: scenario {scenario}, device {result['device_name']}, batch {bs} x "
          f"{sc['image'][0]}x{sc['image'][1]}, amp {sc['amp']}, {torch.get_num_threads()} threads, median of "
          f"{rounds} rounds x {steps} steps")
    print_speed_tables(times, bs, ratios, {k: TARGET for k in ratios if k.endswith("_overhead")}, spread,
                       "added by the distillation modules")
    if out is not None:
        atomic_write_json(Path(out), result)
        print(f"wrote {out}")
    return json.loads(json.dumps(result))
