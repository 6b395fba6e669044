"""prockd's Python API, the functions ``import prockd`` offers (the CLI is a thin layer over them):

- :func:`train`: one run from a config file, a dict or a loaded config, exactly as ``prockd train``;
- :func:`build_distiller`: any method (ProC-KD, its baselines) as an ``nn.Module`` for one's own training loop;
- :func:`evaluate` and :func:`export`: a run's deployed model on its test sets, to a file or ONNX (parity-checked);
- :func:`load_student`: a deployed student (``student.pt`` or an exported ``.onnx``) that predicts top-k classes;
- :func:`compare`: the paired-seed comparison (``prockd bench compare``) on one's own spec;
- :func:`init_config`: a commented config written from one's own image folder (``prockd init``).

ProC-KD: Li, Li, Wu, Han, "Prototype-guided cross-task knowledge distillation", FITEE 26(6), 2025
(arXiv:2212.13180).
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from pydantic import BaseModel, ValidationError

from prockd.bench.compare import load_spec, run_compare
from prockd.classification.config import ExperimentConfig, ModelConfig
from prockd.classification.data import build_task
from prockd.classification.engine import noisy_student_view, with_mixtures
from prockd.classification.methods import METHODS, Distiller
from prockd.classification.models import Student, Teacher, create_model, weights_source
from prockd.classification.export import export_onnx
from prockd.classification.init import init_config_text, write_init_config
from prockd.classification.predict import Predictor
from prockd.classification.runs import load_run_student
from prockd.core.config import apply_run_overrides, format_errors, method_reference
from prockd.core.config import config_reference as key_reference
from prockd.detection.config import DetExperimentConfig
from prockd.detection.init import DET_METHOD, init_det_config_text, write_init_det_config
from prockd.detection.methods import DET_METHODS
from prockd.errors import ProckdError
from prockd.tasks import build_any_config, commands, load_any_config, task_name

ModelSpec = nn.Module | str | Mapping[str, Any] | ModelConfig


def _config(config, overrides: Sequence[str]):
    """A task's experiment config from a path, a dict or a loaded config (pydantic model), overrides applied."""
    if isinstance(config, (str, Path)):
        return load_any_config(config, list(overrides))
    if isinstance(config, BaseModel):
        if not overrides:
            return config
        config = config.model_dump(mode="json")
    if not isinstance(config, Mapping):
        raise ProckdError(f"config must be a file path, a dict or a loaded config, not {type(config).__name__}")
    return build_any_config(apply_run_overrides(dict(config), list(overrides)), "<dict>")


def train(config: str | Path | Mapping[str, Any] | BaseModel, out: str | Path | None = None,
          overrides: Sequence[str] = ()) -> Path:
    """Train (or resume) one run, as ``prockd train``: the same run directory (``config.yaml``, ``metrics.jsonl``,
    checkpoints, ``final.json``, the deployed ``student.pt``), resume, lock and errors
    (:class:`~prockd.errors.ProckdError` naming the key or file). ``config``: a YAML path (``configs/...`` names a
    packaged one), a dict or a loaded config; ``overrides``: ``key=value`` strings; ``out`` replaces the config's
    ``out``. Returns the run directory; its ``final.json`` holds the results."""
    cfg = _config(config, overrides)
    result = commands(task_name(cfg)).train(cfg, str(out) if out is not None else None)
    return Path(result["run"])


def _model_config(spec: str | Mapping[str, Any] | ModelConfig, what: str) -> ModelConfig:
    if isinstance(spec, ModelConfig):
        return spec
    data = {"name": spec} if isinstance(spec, str) else dict(spec)
    try:
        return ModelConfig(**data)
    except ValidationError as e:
        raise ProckdError(f"{what} model: {format_errors(e, what)}") from None


def _module_config(model: nn.Module, options: Mapping[str, Any] | None) -> ModelConfig:
    """The config of a network passed in as a module: its class name, ``options`` for the rest (taps,
    input_size, mean, std, in_chans ...)."""
    return ModelConfig(**{"name": type(model).__name__, "pretrained": False, **dict(options or {})})


class DistillerModule(nn.Module):
    """A distillation method ready for one's own training loop (built by :func:`build_distiller`).

    ``forward(images, targets) -> (student_logits, {loss name: tensor})``: images are raw ``B x C x H x W`` batches
    in [0, 1] (each network applies its own transform), targets class indices (``-100``: an unlabelled image).
    In training mode everything the method needs happens inside, function matching's mixtures included (``preset:
    transfer``) and a preset's noisy student views (``preset: robust``: the logits are then those of the noisy
    copies); sum the losses and step an optimiser over :meth:`learnable_parameters`. The logits returned are
    those of the images passed in. The frozen teacher is never in ``state_dict`` nor the parameters.
    """

    def __init__(self, distiller: Distiller, class_names: list[str] | None = None, seed: int = 0):
        super().__init__()
        self.distiller = distiller
        self.class_names = class_names
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def teacher(self) -> Teacher | None:
        """The frozen teacher (outside the module tree)."""
        return self.distiller.teacher

    @property
    def student(self) -> Student:
        """The student wrapper (its network is ``.model``)."""
        return self.distiller.student

    def forward(self, images: torch.Tensor, targets: torch.Tensor,
                teacher_feats: dict | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(student logits of ``images``, the method's named losses) for one training batch."""
        n = len(images)
        if self.training:
            images, targets, teacher_feats = with_mixtures(self.distiller, images, targets, teacher_feats,
                                                           self.generator, images.device)
            std, p = self.distiller.view_noise()  # a preset's training views (ProC-KD's robust), as prockd train
            images, teacher_feats = noisy_student_view(self.distiller, images, teacher_feats, std, self.generator,
                                                       images.device, p=p)
        logits, losses = self.distiller(images, targets, teacher_feats=teacher_feats)
        return logits[:n], losses

    def learnable_parameters(self) -> list[nn.Parameter]:
        """What the optimiser updates: the student and the method's own modules (never the teacher)."""
        return self.distiller.learnable_parameters()

    def set_epoch(self, epoch: int, total_epochs: int | None = None) -> None:
        """Tell multi-stage methods (ReFilled) which epoch starts; others ignore it."""
        self.distiller.set_epoch(epoch, total_epochs)

    @torch.no_grad()
    def prepare(self, images: torch.Tensor, targets: torch.Tensor | None = None, seed: int = 0) -> None:
        """The data-dependent initialisation some methods need before training (ProC-KD's k-means prototypes,
        probe-then-distil's probe, OFD's margins): the teacher's features of these labelled training images."""
        if targets is not None:  # class priors (logit adjustment), with or without a teacher
            lab = targets[targets >= 0].long().cpu()
            self.distiller.set_class_counts(torch.bincount(lab, minlength=self.distiller.num_classes))
        teacher = self.distiller.teacher
        if teacher is None:
            return
        dev = next(self.distiller.parameters()).device
        memo: dict = {}

        def labelled_feats() -> dict:  # every image's teacher features, computed once and only if a method asks
            if "all" not in memo:
                parts = [teacher.extract(images[s:s + 256].to(dev)) for s in range(0, len(images), 256)]
                memo["all"] = {k: torch.cat([f[k] for f in parts]) for k in parts[0]}
            return memo["all"]

        def first_feats() -> dict:  # the first 256 images' (all of them when already computed)
            if "all" in memo:
                return {k: v[:256] for k, v in memo["all"].items()}
            return teacher.extract(images[:256].to(dev))

        labels = targets.to(dev) if targets is not None else None
        self.distiller.prepare(first_feats, seed, (lambda: (labelled_feats(), labels)) if labels is not None else None)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """The deployed student's logits (what :meth:`export` predicts)."""
        return self.distiller.predict(images)["deployed"]

    def export(self) -> nn.Module:
        """The deployable student (backbone, and for ProC-KD its FA and prototypes; no teacher, no PL)."""
        dep = self.distiller.export()
        dep.class_names = self.class_names
        return dep

    def save(self, path: str | Path, input_shape: tuple[int, int, int] | None = None) -> Path:
        """Write the deployable student to ``path`` (``student.pt`` format: :func:`load_student` and ``prockd
        predict`` / ``export`` read it); the class count and names are the module's own."""
        self.export().save(path, self.distiller.num_classes, self.class_names, input_shape)
        return Path(path)


def build_distiller(method: str, teacher: ModelSpec | None, student: ModelSpec, num_classes: int | None = None, *,
                    class_names: Sequence[str] | None = None, teacher_options: Mapping[str, Any] | None = None,
                    student_options: Mapping[str, Any] | None = None, seed: int = 0, device: str | None = None,
                    **params: Any) -> DistillerModule:
    """A distillation method (``method``: ``prockd``, ``student_only``, ``pkd_projector``, ``probe_distil`` ... any
    name of ``prockd train``'s ``method.name``) as an ``nn.Module`` for one's own training loop
    (:class:`DistillerModule`).

    ``teacher`` / ``student``: an ``nn.Module`` (a student must offer timm's ``forward_features`` /
    ``forward_head``), or a model as a config names it: a timm name (``resnet18``, ``timm/resnet18``),
    ``torchvision/NAME``, ``builtin:efficientnet_lite0``, or a dict of model keys (``{"name": ..., "checkpoint":
    "weights.safetensors", "input_size": 224}``). ``*_options``: model keys for a module passed in (``taps``,
    ``input_size``, ``mean``, ``std``). ``num_classes``: the student's classes (default: ``len(class_names)``).
    ``params``: the method's parameters, e.g. ``preset="transfer"``. The student is created with ``seed``.
    """
    cls = METHODS.get(method)  # an unknown name: near matches and the known names
    if num_classes is None:
        if class_names is None:
            raise ProckdError("build_distiller needs num_classes or class_names")
        num_classes = len(class_names)
    try:
        p = cls.Params(**params)
    except ValidationError as e:
        raise ProckdError(f"method '{method}': {format_errors(e, prefix='params', model=cls.Params)}") from None
    torch.manual_seed(seed)
    t = None
    if cls.needs_teacher:
        if teacher is None:
            raise ProckdError(f"method '{method}' needs a teacher")
        if isinstance(teacher, Teacher):
            t = teacher
        elif isinstance(teacher, nn.Module):
            t = Teacher(teacher, _module_config(teacher, teacher_options))
        else:
            tcfg = _model_config(teacher, "teacher")
            weights_source(tcfg, "teacher")  # a frozen teacher without weights is an error naming what to set
            t = Teacher(create_model(tcfg, None, "teacher"), tcfg)
    torch.manual_seed(seed)
    if isinstance(student, nn.Module):
        s_cfg = _module_config(student, student_options)
        s_model = student
    else:
        s_cfg = _model_config(student, "student")
        s_model = create_model(s_cfg, num_classes, "student")
    s = Student(s_model, s_cfg, need_embed=cls.uses_student_embed)
    dist = cls(s, t, p, num_classes)
    dev = torch.device(device) if device else torch.device("cpu")
    dist.to(dev)
    if t is not None:
        t.to(dev)
    return DistillerModule(dist, list(class_names) if class_names is not None else None, seed)


def load_student(path: str | Path, threads: int | None = None) -> Predictor:
    """A deployed student from its file alone: a run's ``student.pt`` (or :meth:`DistillerModule.save`'s file) or an
    ONNX file from ``prockd export``. ``.predict(images, topk)`` gives the top-k classes of raw images in [0, 1]
    (a tensor ``N x C x H x W``) or of image files; ``.logits(images)`` the logits."""
    return Predictor(path, threads=threads)


def compare(spec: str | Path | Mapping[str, Any] | None = None, out: str | Path = "runs/compare", *,
            suite: str | None = None, seeds: int | None = None, first_seed: int | None = None,
            workers: int | None = None, tune: bool = False,
            tune_seeds: int | None = None, tune_only: bool = False, probe_only: bool = False,
            methods: Sequence[str] | None = None, students: Sequence[str] | None = None,
            settings: Sequence[str] | None = None, train_teacher: bool = False) -> dict:
    """The paired-seed comparison of ``prockd bench compare``: methods x students x settings x seeds, the same
    student seeds for every method (``first_seed`` .. ``first_seed + seeds - 1``), mean ± std and the 95 % interval
    of each method's paired differences to student-only. ``spec``: a YAML path or a dict with the spec keys of docs/usage.md ("Compare methods on your own
    data"), or None for an embedded suite (``suite``, default glyphs). ``workers``: runs at a time (one thread
    each); ``tune``: first choose every method's main loss weights on validation, the same budget for all. Writes
    ``results.{md,csv,json}`` under ``out`` (or ``tuning.json`` / the probes with ``tune_only`` / ``probe_only``)
    and returns what it wrote to JSON."""
    overrides = {"seeds": seeds, "first_seed": first_seed, "workers": workers, "tune_seeds": tune_seeds}
    if isinstance(spec, Mapping):
        loaded = load_spec(None, overrides, suite=suite or spec.get("suite"), extra=dict(spec))
    else:
        loaded = load_spec(spec, overrides, suite=suite)
    for key, names in (("methods", methods), ("students", students), ("settings", settings)):
        if names:
            unknown = [n for n in names if n not in loaded[key]]
            if unknown:
                raise ProckdError(f"--{key} {unknown} not in the comparison (known: {', '.join(loaded[key])})")
            loaded[key] = {n: loaded[key][n] for n in names}
    return run_compare(Path(out), loaded, do_tune=tune, tune_only=tune_only, probe_only=probe_only,
                       shipped_teacher=not train_teacher)


def evaluate(run: str | Path | None = None, model: str | Path | None = None, config: str | Path | None = None,
             overrides: Sequence[str] = ()) -> dict:
    """A deployed model on its config's test sets, as ``prockd eval``: a run directory (its ``config.yaml`` and
    deployed file), or ``model`` with ``config``. Classification: top-1 (%) per test set; detection: COCO metrics."""
    if run is None and (model is None or config is None):
        raise ProckdError("evaluate needs a run directory, or model and config")
    run = Path(run) if run is not None else None
    cfg = load_any_config(config if config is not None else run / "config.yaml", list(overrides))
    task = commands(task_name(cfg))
    return task.evaluate(cfg, Path(model) if model is not None else run / task.DEPLOYED_FILE)


def export(run: str | Path, out: str | Path | None = None, onnx: str | Path | None = None,
           checkpoint: str = "selected", opset: int = 18, atol: float = 1e-3, verify_images: int = 256,
           say=print) -> dict:
    """A classification run's deployable student, as ``prockd export``: to a ``.pt`` file (``out``) and/or ONNX
    (``onnx``: dynamic batch axis, checked against PyTorch with onnxruntime on ``verify_images`` test images, largest
    logit difference at most ``atol``). ``checkpoint``: selected (the run's ``student.pt``, chosen on validation),
    best or last (rebuilt from ``checkpoints/``). Returns what was written and the parity figures."""
    if out is None and onnx is None:
        raise ProckdError("export needs out (a .pt file) and/or onnx (an .onnx file)")
    dep, cfg, task = load_run_student(Path(run), checkpoint)
    if dep.input_shape is None or dep.class_names is None:  # files written before they carried both
        task = task or build_task(cfg.data)
        dep.input_shape = dep.input_shape or task.image_shape
        dep.class_names = dep.class_names or task.class_names
    report: dict = {}
    if out is not None:
        dep.save(out, len(dep.class_names), dep.class_names)
        report["exported"] = str(out)
    if onnx is not None:
        task = task or build_task(cfg.data)
        name, ds = next(iter(task.tests.items()))
        images = next(ds.batches(verify_images))[0]
        say(f"exporting to ONNX and checking it against PyTorch on {len(images)} images of test set '{name}' ...")
        report["onnx"] = export_onnx(dep, onnx, images, opset=opset, atol=atol)
        report["onnx"]["test_set"] = name
    return report


def init_config(data: str | Path, teacher: str, student: str, path: str | Path | None = None, *,
                method: str = "prockd", preset: str | None = "robust_calibrated", force: bool = False) -> str:
    """A commented config for the image folder ``data`` (``train/<class>/``, optional ``val/``, ``test/``, optional
    ``unlabeled/``), as ``prockd init``: classes counted, the images' size and channels read, a validation split
    proposed when there is no ``val/``; checked by loading it. Written to ``path`` when given (atomically; an
    existing file only with ``force``). Returns the YAML text."""
    if path is not None:
        return write_init_config(path, data, teacher, student, method, preset, force).read_text()
    return init_config_text(data, teacher, student, method, preset)


def init_detection_config(data: str | Path, teacher: str, student: str, path: str | Path | None = None, *,
                          teacher_backbone: str | None = None, method: str = DET_METHOD,
                          preset: str | None = "mimic_light", force: bool = False) -> str:
    """A commented detection config for the folder ``data`` of COCO splits (``train/``, optional ``val/``,
    ``test/`` or ``test_*/``, each a ``.json`` + ``images/``; optional ``unlabeled/`` images), as ``prockd init
    --task detection``: classes and image sizes read, every annotation checked. ``teacher``: a detector file (with
    ``teacher_backbone``; its FPN width and box head read from it) or ``coco``. ``method`` defaults to ``cwd`` with
    the weight chosen on the detection benchmark's validation, the one row ahead of student-only there at
    convergence; ``method="prockd"`` takes ``preset`` (default ``mimic_light``, its validation choice). Written to
    ``path`` when given (atomically; an existing file only with ``force``). Returns the YAML text."""
    if path is not None:
        return write_init_det_config(path, data, teacher, student, method, preset, teacher_backbone, force).read_text()
    return init_det_config_text(data, teacher, student, method, preset, teacher_backbone)


def read_final(run: str | Path) -> dict:
    """A finished run's ``final.json``."""
    p = Path(run) / "final.json"
    if not p.is_file():
        raise ProckdError(f"{run} has no final.json: the run has not finished (run the same command to resume)")
    return json.loads(p.read_text())


__all__ = ["DistillerModule", "build_distiller", "compare", "evaluate", "export", "load_student", "read_final", "train"]


def config_reference() -> str:
    """docs/config.md: every key of both tasks' experiment configs (:func:`prockd.core.config.config_reference`) and
    every method's parameters (:func:`prockd.core.config.method_reference`)."""
    return key_reference([("Classification (`prockd train`, the default task)", ExperimentConfig),
                          ("Detection (`task: detection`)", DetExperimentConfig)]) + "\n" + \
        method_reference([("classification", METHODS), ("detection", DET_METHODS)])
