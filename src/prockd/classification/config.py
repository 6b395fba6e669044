"""The classification experiment config (pydantic): one YAML file = one experiment.

Unknown keys and ill-typed values are errors that name the key and the file.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from prockd.core.config import (
    CorruptionConfig,
    MethodConfig,
    Strict,
    apply_run_overrides,
    deep_merge,
    read_config_file,
    validate,
)


def canonical_model_name(name: str) -> str:
    """A model name in prockd's form: ``timm/NAME`` and ``timm:NAME`` (as LightlyTrain's and timm's hub users write
    them) are the timm name ``NAME``; ``torchvision/NAME`` is ``torchvision:NAME``; ``builtin/NAME`` is
    ``builtin:NAME``; anything else is kept."""
    for prefix in ("timm/", "timm:"):
        if name.startswith(prefix):
            return name[len(prefix):]
    for lib in ("torchvision", "builtin"):
        if name.startswith(f"{lib}/"):
            return f"{lib}:{name[len(lib) + 1:]}"
    return name


class ModelConfig(Strict):
    """A network created by name (a timm name or ``timm/NAME``, ``torchvision:NAME`` or ``torchvision/NAME``,
    ``builtin:NAME``), with its weights from the hub (``pretrained``), from a local file (``checkpoint``: a ``.pth``
    / ``.pt`` state dict or a ``.safetensors`` file), or random.

    ``pretrained`` unset (None): ``builtin:`` models with shipped weights (``builtin:efficientnet_lite0``) load
    them, students start from random weights, and a teacher without ``checkpoint`` is an error (a frozen teacher
    with random weights is never meant; write ``pretrained: false`` to distil from one deliberately)."""

    name: str  # timm name (timm/NAME too), torchvision:NAME (or torchvision/NAME), builtin:NAME
    kwargs: dict[str, Any] = Field(default_factory=dict)  # passed to the model's constructor (depth, img_size, ...)
    # hub weights (true), random on purpose (false); unset: builtin models' shipped weights, else random for a
    # student and an error for a teacher without checkpoint
    pretrained: bool | None = None
    checkpoint: str | None = None  # local weights: .pth / .pt state dict (bare or under model/state_dict) or .safetensors
    input_size: int | None = None  # square resolution the model sees (its own transform)
    in_chans: int | None = None  # channels the model expects (grayscale data is repeated)
    mean: tuple[float, ...] | None = None  # normalisation (default: the model's pretrained_cfg, else ImageNet's)
    std: tuple[float, ...] | None = None
    taps: list[str] | None = None  # module paths whose outputs are distilled
    num_taps: int = 3  # default taps: this many evenly spaced blocks (ViT) or last stages (CNN)
    embed_tap: str | None = None  # the embedding layer (ViT: after position embedding; CNN: stem)
    fusion_size: tuple[int, int] | None = None  # common grid the taps are resampled to
    init_from_teacher: bool = False  # students only: copy embedding + first blocks from the teacher
    channels_last: bool = False  # channels-last memory format (faster convolutions on some hardware)

    @field_validator("name")
    @classmethod
    def _canonical(cls, v: str) -> str:
        return canonical_model_name(v)


class FinetuneConfig(Strict):
    """Stage 1 of fine-tune-then-distil (Vemulapalli, Yang, Ghahremani, ..., Tuzel, "Knowledge Transfer from Vision
    Foundation Models for Efficient Training of Small Task-specific Models", ICML 2024): a copy of the teacher with a
    new head of the student's classes is fine-tuned on the labelled training set (its checkpoint chosen on the
    validation split), then it is the frozen teacher every distiller reads (``teacher.finetune``; the method
    ``finetune_distil`` distils its logits). The fine-tuned teacher is cached by content (the teacher's weights, the
    labelled data, this recipe), so a comparison's seeds share one fine-tune unless ``per_seed``."""

    epochs: int = Field(30, ge=1)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(0.05, ge=0)
    batch_size: int | None = Field(None, ge=1)  # None: train.batch_size
    warmup_epochs: float = Field(1.0, ge=0)
    # module paths (prefixes of parameter names, e.g. conv1, layer1) whose parameters stay as pre-trained; [] trains
    # every layer. Their BatchNorm statistics still adapt to the task's images
    freeze: list[str] = Field(default_factory=list)
    augment: Literal["none", "flip_crop", "affine"] | None = None  # None: train.augment (the same views as stage 2)
    aug_views: int | None = Field(None, ge=0)  # None: train.aug_views
    seed: int = 0  # the fine-tune's own seed (shared by every run of a comparison)
    per_seed: bool = False  # one fine-tune per run seed instead of one shared by every seed
    dir: str | None = None  # where fine-tuned teachers are kept (None: 'finetuned' beside cache.dir)


class GlyphConfig(Strict):
    """Rendered glyphs over real typefaces (see :mod:`prockd.glyphs`): which characters, which fonts."""

    charset: str = "digits"  # digits | letters | upper | lower | an explicit string of characters
    font_dirs: list[str] | None = None  # default: Debian's /usr/share/fonts/{truetype,opentype}
    font_seed: int = 0  # the deterministic shuffle that gives fonts their roles
    heldout_fonts: float = Field(0.4, ge=0)  # test fonts, never trained on: a fraction (< 1) or a count
    train_fonts: int | None = Field(None, ge=1)  # labelled fonts drawn from the pool (None: the whole pool)
    val_fonts: int = Field(0, ge=0)  # carved from the labelled fonts: a validation split by font
    # further validation fonts from the pool after the labelled and the unlabelled ones (data.unlabeled.glyph_fonts):
    # a validation split of many fonts without fewer training fonts (3 fonts could not separate two methods 0.2
    # points apart; docs/research/method-log.md, "The KL target's calibration"); disjoint from every training, unlabelled and test font
    val_extra_fonts: int = Field(0, ge=0)
    copies: int = Field(2, ge=1)  # jittered renders per font x character in the training set
    test_copies: int = Field(1, ge=1)
    size: int = Field(28, ge=8)
    glyph_px: int = Field(22, ge=4)
    rotation: float = Field(11.0, ge=0)  # jitter: degrees
    scale: float = Field(0.15, ge=0, lt=1)  # jitter: relative scale
    shift: float = Field(0.10, ge=0, lt=0.5)  # jitter: fraction of the image
    handwriting_test: bool = False  # digits only: also test on scikit-learn's handwritten digits
    # cross-domain columns (families of design: upright, italic, mono, script; prockd.glyphs.font_design): the
    # labelled, validation and unlabelled fonts only of train_designs, the test fonts only of test_designs
    train_designs: list[Literal["upright", "italic", "mono", "script"]] | None = None
    test_designs: list[Literal["upright", "italic", "mono", "script"]] | None = None


class TeacherConfig(ModelConfig):
    """The frozen teacher: a :class:`ModelConfig`, optionally fine-tuned on the student's task first
    (``finetune``, :class:`FinetuneConfig`)."""

    finetune: FinetuneConfig | None = None  # fine-tune the teacher on the labelled set before distilling (stage 1)


class UnlabeledConfig(Strict):
    """An unlabelled transfer set: images of the student's domain without labels (``data.unlabeled``).

    Every step draws ``batch_size`` of them beside the labelled batch; their targets are ignored by every
    cross-entropy term, while the distillation terms (features, relations, KL to a teacher-side prediction)
    see them. Give exactly one source.
    """

    glyph_fonts: int = Field(0, ge=0)  # data.name=glyphs: the charset rendered in this many further pool fonts
    copies: int = Field(2, ge=1)  # glyphs: jittered renders per font x character
    dir: str | None = None  # any data: every image file under this folder (recursively), labels unused
    limit: int | None = Field(None, ge=1)  # at most this many images (the first ones in sorted order)
    batch_size: int | None = Field(None, ge=1)  # unlabelled images per step (None: train.batch_size)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.glyph_fonts > 0) == (self.dir is not None):
            raise ValueError("data.unlabeled needs exactly one source: glyph_fonts > 0 (glyphs) or dir (a folder "
                             "of images)")
        return self


class DataConfig(Strict):
    """A labelled image-classification task."""

    # the dataset: your own images are imagefolder (train_dir, val_dir, test_dirs)
    name: Literal["fashion_mnist", "digits", "cifar100", "imagefolder", "tensors", "glyphs"] = "fashion_mnist"
    glyphs: GlyphConfig = Field(default_factory=GlyphConfig)  # data.name=glyphs
    val_fraction: float | None = Field(None, gt=0, lt=1)  # stratified validation split carved from the training set
    root: str | None = None  # where a named dataset's files are (fashion_mnist, cifar100)
    download: bool = False  # cifar100: download when missing (needs internet)
    classes: list[int] | None = None  # subset of the source classes, relabelled 0..k-1 in this order
    labels_per_class: int | None = None  # limited labels: at most this many training images per class
    imbalance: float | None = None  # long-tailed training set: exponential profile, n_max / n_min
    corruptions: list[CorruptionConfig] = Field(default_factory=list)
    subset_seed: int = 0  # which images are kept (fixed across training seeds)
    test_limit: int | None = None  # evaluate on at most this many test images (per class-balanced order)
    train_dir: str | None = None  # imagefolder: one sub-folder of images per class
    val_dir: str | None = None  # imagefolder: a validation folder of the same classes (instead of val_fraction)
    test_dirs: dict[str, str] = Field(default_factory=dict)  # imagefolder: name -> dir
    image_size: int | None = None  # imagefolder: square size images are resized to (None: their own size)
    stream: bool = False  # imagefolder: leave the images on disk, decode them batch by batch (large sets)
    num_workers: int = Field(2, ge=0)  # loader processes decoding a streamed set's batches
    unlabeled: UnlabeledConfig | None = None  # an unlabelled transfer set of the student's domain

    @model_validator(mode="after")
    def _check_stream(self):
        if self.val_dir is not None and (self.name != "imagefolder" or self.val_fraction is not None):
            raise ValueError("data.val_dir is a validation folder of data.name=imagefolder, given instead of "
                             "data.val_fraction (not both)")
        if self.stream and self.name != "imagefolder":
            raise ValueError(f"data.stream is for data.name=imagefolder (files on disk); '{self.name}' is "
                             "loaded into memory")
        if self.unlabeled is not None and self.unlabeled.glyph_fonts and self.name != "glyphs":
            raise ValueError(f"data.unlabeled.glyph_fonts is for data.name=glyphs; '{self.name}' takes "
                             "data.unlabeled.dir (a folder of images)")
        return self


class TrainConfig(Strict):
    """Optimiser, schedule and loop settings."""

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-5, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    momentum: float = 0.9
    warmup_epochs: float = Field(2, ge=0)
    schedule: Literal["cosine", "step"] = "cosine"  # after warm-up: cosine to min_lr, or steps at milestones
    milestones: list[int] = Field(default_factory=list)  # step schedule: epochs where lr is multiplied by gamma
    gamma: float = Field(0.2, gt=0)
    clip_grad: float | None = 5.0
    amp: Literal["none", "bf16", "fp16"] = "none"
    augment: Literal["none", "flip_crop", "affine"] = "none"
    # affine augmentation: uniform rotation (degrees), relative scale and shift (fraction of the image)
    aug_rotation: float = Field(11.0, ge=0)
    aug_scale: float = Field(0.15, ge=0, lt=1)
    aug_shift: float = Field(0.10, ge=0, lt=0.5)
    # > 0: augmentation draws from this many deterministic augmented views per training image, made once
    # (the teacher cache holds the teacher's features of every view, so teacher and student see one view);
    # 0: fresh augmentation every step (the teacher then runs live on the augmented batch)
    aug_views: int = Field(0, ge=0)
    # > 0: Gaussian pixel noise of this std on the student's copy of every training image (labelled, unlabelled,
    # mixtures) after the teacher's features are fixed on the clean pixels (asymmetric views, docs/research/method-log.md,
    # "Robustness through the teacher"); without a teacher, plain noise augmentation
    student_noise: float = Field(0.0, ge=0, le=1)
    # the chance that a training image's student copy gets that noise, drawn per image and step (the others stay
    # clean, so the student meets both the clean images it is tested on and the noisy ones); 1: every image
    student_noise_p: float = Field(1.0, gt=0, le=1)
    # what the teacher sees under student_noise: "clean" (asymmetric views) or "noisy", the student's noisy copy
    # (the symmetric control: the teacher then runs live on it and the cache's features are not used)
    student_noise_teacher: Literal["clean", "noisy"] = "clean"
    eval_every: int = Field(1, ge=1)
    progress: bool = True
    num_threads: int | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun, auto is cuda:LOCAL_RANK)
    compile: bool = False  # torch.compile the student and the method's modules (in place)
    compile_backend: str = "inductor"
    # keep checkpoints/last.pt (the optimiser's and the RNG's states: what continuing a finished run with more epochs
    # needs) after the run finishes; false: a finished run keeps its deployed student, best.pt, config and logs
    keep_state: bool = False


class CacheConfig(Strict):
    """The frozen-teacher feature cache (per deterministic teacher view)."""

    enabled: bool = True
    dir: str = "~/.cache/prockd/features"
    dtype: Literal["float16", "float32"] = "float16"


class TeacherEvalConfig(Strict):
    """The teacher's own labelled task, to check and log its accuracy before distillation."""

    data: DataConfig | None = None
    imagenet_samples: bool = False  # ImageNet teachers: predictions on scikit-learn's sample images


class ExperimentConfig(Strict):
    """Everything one run needs."""

    seed: int = 0  # the run's seed (student initialisation, batch order, augmentation)
    out: str = "runs/exp"  # the run directory (prockd train --out replaces it)
    teacher: TeacherConfig | None = None
    teacher_eval: TeacherEvalConfig = Field(default_factory=TeacherEvalConfig)
    student: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)


def build_config(data: dict, source: str = "<dict>") -> ExperimentConfig:
    """Validate a raw dict; errors name the source and the offending keys (:func:`prockd.core.config.validate`)."""
    return validate(ExperimentConfig, data, source)


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> ExperimentConfig:
    """Load a YAML config file (with its ``base:`` files) or ``base``, apply overrides and validate.

    An override that switches ``method.name`` without setting ``method.params`` starts the new
    method from its default parameters (the file's parameters belong to the file's method).
    """
    data: dict = copy.deepcopy(base) if base else {}
    source = "<overrides>"
    if path is not None:
        source = str(path)
        data = deep_merge(data, read_config_file(path))
    return build_config(apply_run_overrides(data, list(overrides)), source)


