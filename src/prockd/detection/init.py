"""``prockd init --task detection``: a commented detection config written from a user's folder of COCO splits, so a
run starts from their data (classes and image sizes read, every annotation checked) instead of the canvases."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from prockd.core.checkpoint import read_state_dict
from prockd.core.io import IMAGE_SUFFIXES, atomic_write_text
from prockd.detection.config import build_det_config
from prockd.detection.engine import open_data
from prockd.errors import ProckdError

VAL_NAMES, UNLABELED_NAMES = ("val", "valid", "validation"), ("unlabeled", "unlabelled")

# the detection method the embedded benchmark recommends at convergence, with its weight chosen there on validation
# (configs/detection/embedded/tuned.yaml): CWD, 0.1 per level
DET_METHOD = "cwd"
CWD_WEIGHT = 0.1


def coco_split(folder: Path) -> tuple[Path, Path]:
    """(images folder, annotation file) of a split folder: its one ``.json`` file, and its ``images/`` sub-folder
    (else the split folder itself holds the images)."""
    jsons = sorted(folder.glob("*.json"))
    if len(jsons) != 1:
        raise ProckdError(f"init --data: {folder} needs exactly one COCO annotation file (*.json), found "
                          f"{len(jsons)}; put its images in {folder / 'images'}/")
    images = folder / "images" if (folder / "images").is_dir() else folder
    return images, jsons[0]


def _image_side(ims: list[dict], ann: Path) -> tuple[int, int]:
    """(median short side, median long side) of a COCO file's images (its ``width`` / ``height`` entries)."""
    if not ims:
        raise ProckdError(f"init --data: {ann} lists no images")
    short = sorted(min(int(i["width"]), int(i["height"])) for i in ims)
    long = sorted(max(int(i["width"]), int(i["height"])) for i in ims)
    return short[len(short) // 2], long[len(long) // 2]


def _teacher_lines(teacher: str, teacher_backbone: str | None) -> list[str]:
    if teacher == "coco":
        return ["teacher:  # frozen: torchvision's COCO Faster R-CNN R-50-FPN (downloaded once from the hub)",
                "  backbone: resnet50", "  weights: coco"]
    p = Path(teacher).expanduser()
    if not p.is_file():
        raise ProckdError(f"init --teacher: detector file not found: {p} (give a detector checkpoint, e.g. a "
                          "prockd pretrain-teacher teacher.pt, or 'coco')")
    if not teacher_backbone:
        raise ProckdError("init --teacher FILE needs --teacher-backbone NAME: the backbone its weights belong to "
                          "(e.g. resnext101_32x8d, resnet50, builtin:efficientnet_lite0)")
    state = read_state_dict(p, "init --teacher detector")
    shape = {k: state[k].shape[0] for k in ("backbone.fpn.inner_blocks.0.0.weight", "roi_heads.box_head.fc6.weight")
             if k in state}
    if len(shape) < 2:
        raise ProckdError(f"init --teacher {p}: not a Faster R-CNN + FPN state dict (no FPN or box head tensors)")
    return ["teacher:  # frozen; a detector of its own label space (its class count is read from the file)",
            f"  backbone: {teacher_backbone}", f"  checkpoint: {p.resolve()}",
            "  backbone_weights: none",
            f"  fpn_channels: {shape['backbone.fpn.inner_blocks.0.0.weight']}  # read from the file",
            f"  representation_size: {shape['roi_heads.box_head.fc6.weight']}",
            *(["  norm: train  # its BatchNorm layers were trained (read from the file)"]
              if any(k.endswith("num_batches_tracked") for k in state) else []),
            "  # strongest practical baseline: fine-tune it on your classes first, then distil it (method cwd):",
            "  # finetune: {epochs: 12, lr: 0.0006}"]


def init_det_config_text(data: str | Path, teacher: str, student: str, method: str = DET_METHOD,
                         preset: str | None = "mimic_light", teacher_backbone: str | None = None,
                         out: str | None = None) -> str:
    """The YAML text of a detection run on the folder ``data``: ``train/`` (a COCO json + ``images/``), optional
    ``val/`` (checkpoints are chosen on it), ``test/`` or ``test_*/`` (held-out splits, at least one) and an optional
    ``unlabeled/`` folder of images without boxes (the distillers' transfer set). ``teacher``: a detector file
    (with ``teacher_backbone``) or ``coco``. Checked by opening every split (each annotation validated)."""
    root = Path(data).expanduser().resolve()
    if not (root / "train").is_dir():
        raise ProckdError(f"init --data {root}: no train/ folder; put a COCO annotation file and images/ in "
                          f"{root / 'train'}/")
    tr_img, tr_ann = coco_split(root / "train")
    tests = {p.name: coco_split(p) for p in sorted(root.iterdir()) if p.is_dir()
             and (p.name == "test" or p.name.startswith("test_"))}
    if not tests:
        raise ProckdError(f"init --data {root}: no test/ folder; put held-out images of the same classes with their "
                          f"COCO file in {root / 'test'}/ (detection metrics are never measured on training images)")
    val = next((root / n for n in VAL_NAMES if (root / n).is_dir()), None)
    unl = next((root / n for n in UNLABELED_NAMES if (root / n).is_dir()), None)
    coco = json.loads(tr_ann.read_text())
    cats = [c["name"] for c in coco.get("categories", [])]
    n_train = len(coco.get("images") or [])
    short, long = _image_side(coco.get("images") or [], tr_ann)
    min_size, max_size = min(short, 800), min(max(long, short), 1333)
    lines = [
        f"# prockd detection config for {root} (written by prockd init --task detection; every key: docs/config.md)",
        f"# {len(cats)} classes ({', '.join(cats[:8])}{', ...' if len(cats) > 8 else ''}), {n_train} training "
        f"images, median {short}x{long} px",
        "task: detection",
        "seed: 0",
        f"out: {out or 'runs/' + root.name}",
        *_teacher_lines(teacher, teacher_backbone),
        "student:  # what you deploy: Faster R-CNN + FPN on this backbone",
        f"  backbone: {student}",
        "  backbone_weights: imagenet  # builtin: backbones ship theirs; others come from the hub",
        f"  min_size: [{min_size}]",
        f"  max_size: {max_size}",
        "data:",
        "  name: files",
        f"  train: {{images: {tr_img}, annotations: {tr_ann}}}",
    ]
    if val is not None:
        v_img, v_ann = coco_split(val)
        lines.append(f"  val: {{images: {v_img}, annotations: {v_ann}}}  # checkpoints are chosen on it, never on test")
    else:
        lines.append("  # no val/ folder: the last epoch is reported (add val/ to choose the checkpoint on it)")
    lines.append("  tests:")
    lines += [f"    {n}: {{images: {i}, annotations: {a}}}" for n, (i, a) in tests.items()]
    if unl is not None:
        n_unl = sum(1 for f in unl.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        lines += ["  unlabeled:  # images of your domain without boxes: every distiller's terms see them",
                  f"    dir: {unl}  # {n_unl} images"]
    params = {"prockd": f"preset: {preset}" if preset else "", "cwd": f"weight: {CWD_WEIGHT}"}.get(method, "")
    lines += [
        "# measured at convergence on the embedded benchmark (1 labelled font + unlabelled canvases, 5 seeds, mAP50 "
        "over student-only):",
        "# cwd +2.7 +- 2.3 (ahead), prockd (preset mimic_light) +0.3 +- 3.4 (level) (docs/detection.md)",
        "method:",
        f"  name: {method}",
        "  params: {" + params + "}" + ("  # per FPN level: x0.01 of the public 10, chosen on the benchmark's "
                                        "validation" if method == "cwd" else ""),
        *(["  # ProC-KD instead: name: prockd, params: {preset: mimic_light}"] if method != "prockd" else []),
        *DET_RECIPE,
        "",
    ]
    text = "\n".join(lines)
    raw = yaml.safe_load(text)
    cfg = build_det_config(raw, "prockd init")
    open_data(cfg, log=lambda _m: None)
    return text


# the embedded benchmark's student recipe (docs/detection.md): AdamW 6e-4, batch 4, a step at four fifths
DET_RECIPE = ["train:",
              "  epochs: 30",
              "  batch_size: 4",
              "  optimizer: adamw",
              "  lr: 0.0006  # chosen on the embedded benchmark's validation split over 3e-4 and 1.2e-3",
              "  weight_decay: 0.0001",
              "  warmup_iters: 100",
              "  milestones: [24]",
              "  clip_grad: 10.0"]


def write_init_det_config(path: str | Path, data: str | Path, teacher: str, student: str, method: str = DET_METHOD,
                          preset: str | None = "mimic_light", teacher_backbone: str | None = None,
                          force: bool = False) -> Path:
    """Write :func:`init_det_config_text` to ``path`` (atomically; an existing file only with ``force``)."""
    path = Path(path)
    if path.exists() and not force:
        raise ProckdError(f"init: {path} exists; pick another --config file or pass --force")
    atomic_write_text(path, init_det_config_text(data, teacher, student, method, preset, teacher_backbone))
    return path
