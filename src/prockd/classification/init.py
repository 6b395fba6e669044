"""``prockd init``: a commented experiment config written from a user's image folder, so a run starts from their
data (classes counted, the images' size and channels read, a validation split proposed) instead of a glyph config."""
from __future__ import annotations

from pathlib import Path

import yaml

from prockd.classification.config import ModelConfig, build_config, canonical_model_name
from prockd.classification.data import folder_geometry
from prockd.classification.models import shared_with_teacher
from prockd.core.io import IMAGE_SUFFIXES, atomic_write_text
from prockd.errors import ProckdError, class_difference

VAL_NAMES, TEST_NAMES, UNLABELED_NAMES = ("val", "valid", "validation"), ("test",), ("unlabeled", "unlabelled")


def _classes(folder: Path) -> dict[str, list[Path]]:
    """Class sub-folder -> its image files (recursively)."""
    out = {}
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            out[d.name] = files
    return out


def _first(root: Path, names: tuple[str, ...]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


SMALL_SET = 2000  # labelled images up to which the recipe of the embedded benchmark's few-label columns is proposed


def _vit_copy(student: str, teacher: str, channels: int, side: int) -> dict:
    """What ``init_from_teacher`` would copy from ``teacher`` into ``student`` (:func:`shared_with_teacher`)."""
    return shared_with_teacher(ModelConfig(name=student, in_chans=channels, input_size=side),
                               ModelConfig(name=teacher, input_size=224 if side < 224 else side))


def student_init_lines(shared: dict) -> list[str]:
    """The student's initialisation, by family (``shared``: :func:`_vit_copy`): a vision transformer that is a
    depth-reduced copy of the teacher (the paper's students) starts from the teacher's embedding and first blocks; one
    that shares nothing with it is warned about (from scratch, few labels do not train a ViT)."""
    if not shared["transformer"]:
        return []
    if shared["tensors"]:
        what = "embedding and blocks" if shared["embedding"] else "blocks (not the embedding: other channels or patch)"
        return [f"  # a vision transformer of the teacher's width: it starts from the teacher's {what}, "
                f"{shared['tensors']} tensors,",
                "  # as the paper's depth-reduced students (set kwargs: {depth: 6} for a 6-block copy of a 12-block "
                "teacher)",
                "  # measured on the glyph benchmark (ViT of 6 blocks, 104 labelled images): 74.9 % validation from "
                "the teacher's blocks, 10.1 % from scratch;",
                "  # so started, ProC-KD was level with student-only on clean test images and rkd 1-5 points above it "
                "(docs/benchmarks.md)",
                "  init_from_teacher: true"]
    return ["  # a vision transformer that shares no tensor with the teacher starts from scratch: with few labelled "
            "images it",
            "  # learns little (glyph benchmark, 104 labelled images: 10 % validation, chance 4 %); prefer a "
            "depth-reduced copy of a ViT teacher",
            "  # (same width: init_from_teacher), pretrained weights (pretrained: true) or a CNN student"]


def recipe_lines(transformer: bool, n_train: int) -> list[str]:
    """The training recipe for the student's family and the labelled set's size: the learning rate the embedded
    benchmark's student-only screens chose (AdamW 3e-3 for small CNNs, 1e-3 for ViT students, docs/benchmarks.md), 60
    epochs over 8 stored views of each image for a few-label set (<= SMALL_SET images), else 30 over 4."""
    small = n_train <= SMALL_SET
    lr = "0.001  # vision transformers: 1e-3 chosen on validation over 3e-3 and 3e-4" if transformer else \
        "0.003  # CNN students: 3e-3 chosen on validation (WRN-16-1)"
    return ["train:",
            f"  epochs: {60 if small else 30}",
            f"  batch_size: {32 if small else 64}",
            f"  lr: {lr}",
            "  augment: affine  # stored augmented views: the teacher's features of them are cached once",
            f"  aug_views: {8 if small else 4}"]


def init_config_text(data: str | Path, teacher: str, student: str, method: str = "prockd",
                     preset: str | None = "robust_calibrated", out: str | None = None) -> str:
    """The YAML text of a run on the image folder ``data``: ``data/train/<class>/...`` (or ``data/<class>/...``),
    an optional ``val/`` (else a stratified 10 % split of train is proposed), ``test/`` (required: held-out images
    of the same classes) and an optional ``unlabeled/`` folder of images without labels. Checked by loading it."""
    root = Path(data).expanduser().resolve()
    if not root.is_dir():
        raise ProckdError(f"init --data: folder not found: {root}")
    train_dir = root / "train" if (root / "train").is_dir() else root
    classes = _classes(train_dir)
    reserved = set(VAL_NAMES + TEST_NAMES + UNLABELED_NAMES)
    if train_dir == root:
        classes = {k: v for k, v in classes.items() if k not in reserved}
    if len(classes) < 2:
        raise ProckdError(f"init --data {root}: found {len(classes)} class folder(s) with images under {train_dir}; "
                          "put one sub-folder of images per class in train/ (e.g. train/cat/1.png, train/dog/2.png)")
    val_dir, test_dir, unl_dir = _first(root, VAL_NAMES), _first(root, TEST_NAMES), _first(root, UNLABELED_NAMES)
    if test_dir is None:
        raise ProckdError(f"init --data {root}: no test/ folder; put held-out images of the same classes in "
                          f"{root / 'test'}/<class>/ (test accuracy is never measured on training images)")
    for key, d in (("val", val_dir), ("test", test_dir)):
        if d is not None and sorted(_classes(d)) != sorted(classes):
            raise ProckdError(f"init --data: {d} has other classes than {train_dir} "
                              f"({class_difference(_classes(d), classes)}): every split needs the same class "
                              "sub-folders")
    files = [f for v in classes.values() for f in v]
    channels, (h, w) = folder_geometry([str(f) for f in files[:: max(1, len(files) // 500)]])
    counts = {k: len(v) for k, v in classes.items()}
    n_unl = sum(1 for f in unl_dir.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES) if unl_dir else 0
    side = max(h, w)
    t_name, s_name = canonical_model_name(teacher), canonical_model_name(student)
    shared = _vit_copy(student, teacher, channels, side)  # both networks on the meta device, once
    lines = [
        f"# prockd config for {root} (written by prockd init; every key: docs/config.md)",
        f"# {len(classes)} classes, {len(files)} training images "
        f"({', '.join(f'{k}: {n}' for k, n in list(counts.items())[:8])}{', ...' if len(counts) > 8 else ''});"
        f" images {h}x{w}, {'grey' if channels == 1 else 'RGB'}",
        "seed: 0",
        f"out: {out or 'runs/' + root.name}",
        "teacher:  # frozen; its weights must be real: builtin: ships them, or checkpoint: FILE, or pretrained: true",
        f"  name: {teacher}" + (f"  # = {t_name}" if t_name != teacher else ""),
        f"  input_size: {224 if side < 224 else side}  # what the teacher sees (lower it for speed, e.g. 96)",
        "student:  # what you deploy",
        f"  name: {student}",
        f"  in_chans: {channels}",
        f"  input_size: {side}  # the images' own size",
        *student_init_lines(shared),
        "data:",
        "  name: imagefolder",
        f"  train_dir: {train_dir}",
    ]
    if val_dir is not None:
        lines.append(f"  val_dir: {val_dir}  # checkpoints and settings are chosen on it, never on test")
    else:
        lines.append("  val_fraction: 0.1  # no val/ folder: a stratified 10 % of train selects the checkpoint")
    lines += ["  test_dirs:", f"    test: {test_dir}"]
    if unl_dir is not None:
        lines += ["  unlabeled:  # images of your domain without labels: the distillation terms see them",
                  f"    dir: {unl_dir}  # {n_unl} images, read from disk as training goes"]
    lines += [
        "method:",
        f"  name: {method}",
        "  params: {" + (f"preset: {preset}" if preset and method == "prockd" else "") + "}",
        *recipe_lines(shared["transformer"], len(files)),
        "cache:",
        "  dir: ~/.cache/prockd/features  # the frozen teacher's features, computed once per data and teacher",
        "",
    ]
    text = "\n".join(lines)
    build_config(yaml.safe_load(text), "prockd init")  # checked before anything is written
    return text


def write_init_config(path: str | Path, data: str | Path, teacher: str, student: str, method: str = "prockd",
                      preset: str | None = "robust_calibrated", force: bool = False) -> Path:
    """Write :func:`init_config_text` to ``path`` (atomically; an existing file only with ``force``)."""
    path = Path(path)
    if path.exists() and not force:
        raise ProckdError(f"init: {path} exists; pick another --config file or pass --force")
    atomic_write_text(path, init_config_text(data, teacher, student, method, preset))
    return path
