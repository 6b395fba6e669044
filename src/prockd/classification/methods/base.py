"""The distiller interface shared by every method."""
from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from prockd.classification.data import MIXTURE_KEY
from prockd.classification.deploy import DeployedStudent
from prockd.connectors import MapConnector, pooled, student_map, teacher_map
from prockd.core.distiller import DistillerBase
from prockd.core.registry import Registry
from prockd.errors import ProckdError
from prockd.losses import kl_div

METHODS: Registry = Registry("method")


class MethodParams(BaseModel):
    """What every classification method's ``method.params`` holds, beside its own keys.

    ``logit_adjust: τ`` replaces every cross-entropy the method fits on the labels, the student's and any classifier
    it fits on the teacher's features (ProC-KD's teacher path ``z_pro``, probe-then-distil's probe), with Menon et
    al.'s logit-adjusted CE(z + τ log π, y) (Menon, Jayasumana, Rawat, Jain, Veit, Kumar, "Long-tail learning via
    logit adjustment", ICLR 2021), π the labelled training set's class frequencies; predictions stay the plain
    logits, so the fitted classifiers estimate balanced-class posteriors. 0: the plain CE (default). One key for
    all methods, so a long-tail comparison gives every method the same option (docs/research/method-log.md, "The long tail")."""

    model_config = ConfigDict(extra="forbid")
    logit_adjust: float = Field(0.0, ge=0)


class NoParams(MethodParams):
    """A method without parameters of its own."""


class FittedKLParams(MethodParams):
    """The parameters of a method that distils, by a KL, a classifier it fits on the labels
    (:meth:`Distiller.fitted_kl`: ProC-KD's teacher path, probe-then-distil's probe)."""

    # with logit_adjust: whether the KL towards the fitted classifier is taken on the adjusted logits (z + τ log π,
    # both sides: the soft-label form of the adjusted CE, docs/research/method-log.md "The long tail") or on the raw ones
    kl_space: Literal["adjusted", "raw"] = "adjusted"
    # τ_t: the fitted classifier's logits are divided by τ_t before the KL (the target side only; the student's logits
    # and the KL's temperature are unchanged): τ_t < 1 sharpens the target without changing its argmax. A fitted
    # target regularised to fonts it never saw (label smoothing, a probe's L2) is accurate but under-confident there
    # (docs/research/method-log.md, "The KL target's calibration"); τ_t gives back the confidence and keeps the accuracy. 1 = off
    kl_target_temperature: float = Field(1.0, gt=0)
    # with logit_adjust and kl_space adjusted: which logits τ_t divides. raw: the fitted classifier's own logits, the
    # prior added after (softmax(z / τ_t + τ log π)); under label smoothing that target is ∝ q^(1/τ_t) π^(1 - 1/τ_t),
    # tilted towards the rare classes. adjusted: the adjusted logits (softmax((z + τ log π) / τ_t)), the sharpened
    # target of a balanced set on every set. On a balanced set log π is centred to exact zeros and the two are the
    # same computation (docs/research/method-log.md, "preset: robust_calibrated", LT-10)
    kl_target_temperature_space: Literal["raw", "adjusted"] = "raw"


class Distiller(DistillerBase):
    """One classification distillation method (:class:`prockd.core.distiller.DistillerBase`).
    ``forward(images, targets) -> (student logits, {loss name: loss})``.

    ``images`` are raw batches in [0, 1]; each network applies its own transform. The frozen teacher
    is held outside the module tree (never in ``state_dict`` nor ``learnable_parameters``).
    ``teacher_feats`` may carry precomputed teacher features (the feature cache).
    """

    Params: ClassVar[type[BaseModel]] = NoParams
    # logit methods (KD, DKD) compare class i of the teacher with class i of the student
    needs_shared_label_space: ClassVar[bool] = False
    # whether the method distils a teacher fine-tuned on the task (finetune_distil): the engine runs stage 1
    # (teacher.finetune, its defaults when the section is absent) before building it
    needs_finetune: ClassVar[bool] = False
    # whether the method reads the student's embedding-layer output (a hook on its embedding tap)
    uses_student_embed: ClassVar[bool] = False
    # what a live teacher pass must produce (None: taps, logits and embedding)
    teacher_keys: ClassVar[tuple[str, ...] | None] = None
    deployed_prefixes: ClassVar[tuple[str, ...] | None] = ("student.",)  # :meth:`export`: the student alone
    # buffers set from the data before every run (set_class_counts): a checkpoint without them still resumes
    derived_buffers: ClassVar[tuple[str, ...]] = ("log_prior",)

    def __init__(self, student, teacher, params: BaseModel, num_classes: int):
        super().__init__(student, teacher, params, num_classes)
        if self.needs_shared_label_space:
            t_classes = teacher.num_outputs
            if not getattr(params, "shared_label_space", False) or t_classes != num_classes:
                raise ProckdError(
                    f"method '{self.name}' needs teacher and student to share one label space (teacher has "
                    f"{t_classes} classes, the student task {num_classes}); this is a cross-task config: use "
                    "prockd or a feature/relation baseline (fitnets, rkd, ab, ofd, ...), or set "
                    "method.params.shared_label_space=true when teacher class i is student class i")
        # the labelled set's class log-frequencies (set_class_counts), for the logit-adjusted CE (logit_adjust)
        self.register_buffer("log_prior", torch.zeros(num_classes))

    def view_noise(self, std: float = 0.0, p: float = 1.0) -> tuple[float, float]:
        """(std, chance) of the asymmetric views' pixel noise on the student's copy of each training image: the
        recipe's (``train.student_noise`` / ``student_noise_p``, given here), unless the method's parameters carry
        their own ``student_noise`` (a preset that includes its training views: ProC-KD's ``robust``)."""
        own = getattr(self.params, "student_noise", None)
        if own is None:
            return std, p
        return own, getattr(self.params, "student_noise_p", None) or 1.0

    def function_matching(self) -> str:
        """``none``, ``mixup`` or ``cutmix``: whether every step also feeds mixtures of the batch's images with
        no label (function matching, Beyer et al., "Knowledge distillation: a good teacher is patient and
        consistent", CVPR 2022): CE ignores them, the distillation terms see them, the teacher runs live on
        exactly those pixels. The ``function_matching`` parameter of the methods that distil logits."""
        return getattr(self.params, "function_matching", "none")

    def wants_mixture_rows(self) -> bool:
        """Whether :func:`~prockd.classification.engine.with_mixtures` should mark which rows of a batch are function
        matching's mixtures (``teacher_feats["mixture"]``, so that a method can tell them from unlabelled images:
        both have the target ``IGNORE``); off for every method but the one option that reads it."""
        return False

    def teacher_features(self, images: torch.Tensor, teacher_feats: dict | None) -> dict:
        """Precomputed features when given, else a live frozen-teacher forward (a dict holding only the row marks
        of :meth:`wants_mixture_rows` gets the live features added)."""
        if teacher_feats is not None and set(teacher_feats) - {MIXTURE_KEY}:
            return teacher_feats
        live = self.teacher.extract(images, self.teacher_keys)
        return {**live, **teacher_feats} if teacher_feats is not None else live

    def pooled_features(self, images: torch.Tensor, teacher_feats: dict | None):
        """(student logits, student pre-logits features ``B x D_s``, teacher taps averaged over the grid
        ``B x sum(C_t)``, both in float32): the inputs of the methods that compare global features."""
        tok, lay, _ = self.student.features(images)
        z_s = self.student.head(tok, lay)
        s = self.student.head(tok, lay, pre_logits=True).float()
        t = pooled(self.teacher_features(images, teacher_feats)["taps"], self.teacher.tap_layout).float()
        return z_s, s, t

    def prepare(self, teacher_feats, seed: int = 0, labelled=None) -> None:
        """Data-dependent initialisation; ``teacher_feats()`` returns teacher features of the first training
        images, ``labelled()`` (teacher features, labels) of every labelled training item (each stored view);
        each is only called by methods that need it (default: nothing to do)."""

    @torch.no_grad()
    def set_class_counts(self, counts: torch.Tensor) -> None:
        """The labelled training set's images per class (``num_classes`` counts), given before :meth:`prepare`:
        their log-frequencies ``log π`` for the logit-adjusted CE (:meth:`ce`), centred (a softmax ignores a constant,
        so a balanced set gets exact zeros: logit adjustment leaves its run bit-identical); a class without images
        counts 1."""
        counts = counts.double().clamp_min(1).cpu()
        log_prior = (counts / counts.sum()).log()
        self.log_prior.copy_((log_prior - log_prior.mean()).to(self.log_prior))

    def logit_adjustment(self, dtype: torch.dtype = torch.float32) -> torch.Tensor | float:
        """``τ log π`` (``num_classes``) of ``logit_adjust``, or ``0.0`` when it is off."""
        tau = getattr(self.params, "logit_adjust", 0.0)
        return tau * self.log_prior.to(dtype) if tau else 0.0

    def ce(self, logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
        """The method's cross-entropy on labels: ``CE(z + τ log π, y)`` with ``τ = logit_adjust`` (Menon et al.,
        ICLR 2021; the plain CE when 0); targets ``IGNORE`` (unlabelled images) are left out. ``smoothing``: label
        smoothing ε (Szegedy et al., CVPR 2016), the target ``(1 - ε) onehot(y) + ε / C``."""
        return F.cross_entropy(logits + self.logit_adjustment(logits.dtype), targets, label_smoothing=smoothing)

    def fitted_kl(self, target: torch.Tensor, student: torch.Tensor, temperature: float) -> torch.Tensor:
        """``T² KL(softmax(target / T) ‖ softmax(student / T))`` towards a classifier the method fitted on the labels
        (ProC-KD's ``z_pro``, probe-then-distil's probe); the target's raw logits are first divided by
        ``kl_target_temperature`` (τ_t, 1 = unchanged; with ``kl_target_temperature_space: adjusted`` the target's
        adjusted logits are). With ``logit_adjust`` and ``kl_space: adjusted`` both sides are shifted by ``τ log π``:
        the soft-label form of the logit-adjusted CE, whose gradient on a class's logit is damped by that class's
        frequency just as the adjusted CE's is (with ``kl_space: raw`` the head classes' images push the rare
        classes' logits down at full strength)."""
        adj = self.logit_adjustment(torch.float32)
        if torch.is_tensor(adj) and getattr(self.params, "kl_space", "raw") == "adjusted":
            if getattr(self.params, "kl_target_temperature_space", "raw") == "adjusted":
                target = self.kl_target_logits(target.float() + adj)
            else:
                target = self.kl_target_logits(target).float() + adj
            student = student.float() + adj
        else:
            target = self.kl_target_logits(target)
        return kl_div(target, student, temperature)

    def kl_target_logits(self, z: torch.Tensor) -> torch.Tensor:
        """A fitted classifier's logits as :meth:`fitted_kl` distils them: divided by ``kl_target_temperature`` (τ_t,
        the target side only; τ_t < 1 sharpens, same argmax), unchanged at 1 or for a method without the key."""
        tau_t = getattr(self.params, "kl_target_temperature", 1.0)
        return z if tau_t == 1.0 else z.float() / tau_t

    def forward(self, images: torch.Tensor, targets: torch.Tensor, teacher_feats: dict | None = None):
        """Training forward: (student logits, dict of named losses)."""
        raise NotImplementedError

    @torch.no_grad()
    def diagnostics(self, images: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Diagnostics on held-out images with a live teacher (logged as ``val/<name>``); default: none."""
        return {}

    @torch.no_grad()
    def kl_target(self, images: torch.Tensor) -> torch.Tensor | None:
        """Logits of the teacher-side classifier this method's KL distils (ProC-KD's ``z_pro``, probe-then-distil's
        probe) on held-out images, with a live teacher; None for a method without one."""
        return None

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Evaluation logits by output name; ``"deployed"`` is what :meth:`export` predicts."""
        logits = self.student(images)
        return {"deployed": logits, "plain": logits}

    def export(self) -> nn.Module:
        """The deployable student (no teacher, no training-only modules)."""
        return DeployedStudent(self.student, None, None, "plain")


class FeatureDistiller(Distiller):
    """A feature-map baseline: ``L = CE(z_s, y) + λ · loss(r(S), T)``.

    ``S`` is the student's last feature map, ``r`` a :class:`~prockd.connectors.MapConnector` to the
    teacher's width, ``T`` the teacher's taps (concatenated on the fusion grid) resampled to the
    student's grid. Subclasses set ``connector`` and implement :meth:`feature_loss`.
    """

    connector_kind: ClassVar[str] = "conv1x1"
    loss_name: ClassVar[str] = "feat"

    def __init__(self, student, teacher, params: BaseModel, num_classes: int):
        super().__init__(student, teacher, params, num_classes)
        self.t_width = sum(teacher.tap_widths)
        self.connector = MapConnector(student.width, self.t_width, self.connector_kind)

    def feature_maps(self, images, teacher_feats):
        """(student logits, connected student map ``B x C_t x h x w``, teacher map on the student grid)."""
        tok, lay, _ = self.student.features(images)
        z_s = self.student.head(tok, lay)
        s = self.connector(student_map(tok, lay))
        tf = self.teacher_features(images, teacher_feats)
        t = teacher_map(tf["taps"], self.teacher.tap_layout, (lay.h, lay.w), dtype=s.dtype)
        return z_s, s, t

    def feature_loss(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The method's loss between the connected student map and the teacher map."""
        raise NotImplementedError

    def forward(self, images, targets, teacher_feats=None):
        """(z_s, {"ce", loss_name})."""
        z_s, s, t = self.feature_maps(images, teacher_feats)
        return z_s, {"ce": self.ce(z_s, targets),
                     self.loss_name: self.params.weight * self.feature_loss(s, t)}
