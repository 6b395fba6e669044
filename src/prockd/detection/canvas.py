"""The embedded detection benchmark's data: canvases of real typefaces' glyphs with known boxes.

Each canvas is ``size x size`` (grayscale stored as PNG): a low-frequency background, 2-5 labelled glyphs
(one class per character of ``charset``) at random positions and sizes, drawn from the split's fonts, and a
few unlabelled distractor glyphs (clutter). The box of a glyph is the bounding box of its ink, so the
ground truth is exact. Fonts get roles as in :mod:`prockd.glyphs`: held-out test fonts are never trained
on. Shifted domains: ``fog`` (the Foggy Cityscapes analogue: low-frequency haze, :func:`prockd.shifts.corrupt`)
and ``dusk`` (the Diverse-Weather analogue: darker, lower contrast, sensor noise).

A split is written as ``images/*.png`` + ``annotations.json`` (COCO) into a cache folder keyed by the
config and the font files, atomically (a temp folder renamed into place), and read back through the same
streaming COCO path as real datasets.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFont

from prockd.core.io import sweep_orphans
from prockd.detection.config import CanvasConfig
from prockd.errors import ProckdError
from prockd.glyphs import Jitter, charset, find_fonts, font_design, font_roles, render_glyph
from prockd.shifts import CorruptionConfig, corrupt


def _rng(*parts) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha1(json.dumps(parts).encode()).digest()[:8], "little"))


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / max(union, 1e-9)


def shift_domain(img: np.ndarray, kind: str, severity: int, seed: int) -> np.ndarray:
    """A shifted copy of a uint8 ``H x W`` canvas: ``fog`` (haze) or ``dusk`` (dark, low contrast, noisy)."""
    if kind == "none":
        return img
    x = torch.from_numpy(img)[None, None]
    if kind == "fog":
        return corrupt(x, CorruptionConfig(kind="fog", severity=severity), seed)[0, 0].numpy()
    g = torch.Generator().manual_seed(seed)
    f = x.float() / 255.0
    f = f * [0.7, 0.6, 0.5, 0.42, 0.35][severity - 1] + 0.04
    f = f + torch.randn(f.shape, generator=g) * [0.02, 0.04, 0.06, 0.08, 0.1][severity - 1]
    return (f.clamp(0, 1) * 255).round().to(torch.uint8)[0, 0].numpy()


def render_canvas(fonts, chars: str, distractors: str, cfg: CanvasConfig, rng: np.random.Generator):
    """(uint8 ``size x size`` canvas, list of (xyxy box, class index))."""
    s = cfg.size
    coarse = rng.uniform(0, 70, (4, 4)).astype(np.float32)
    bg = torch.nn.functional.interpolate(torch.from_numpy(coarse)[None, None], (s, s), mode="bicubic",
                                         align_corners=False)[0, 0].numpy()
    canvas = np.clip(bg + rng.normal(0, 6, (s, s)), 0, 255)
    boxes: list = []
    n_obj = int(rng.integers(cfg.objects[0], cfg.objects[1] + 1))
    n_dis = int(rng.integers(0, 3)) if distractors else 0
    todo = [(int(rng.integers(len(chars))), True) for _ in range(n_obj)] + \
           [(int(rng.integers(len(distractors))), False) for _ in range(n_dis)]
    placed: list = []
    jitter = Jitter(rotation=8.0, scale=0.0, shift=0.0)
    for c, labelled in todo:
        ch = chars[c] if labelled else distractors[c]
        font = fonts[int(rng.integers(len(fonts)))]
        px = int(rng.integers(cfg.glyph_px[0], cfg.glyph_px[1] + 1))
        glyph = render_glyph(font, ch, size=px + 4, glyph_px=px, jitter=jitter, rng=rng, oversample=2)
        ys, xs = np.nonzero(glyph > 40)
        if len(xs) == 0:
            continue
        crop = glyph[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32)
        h, w = crop.shape
        if h >= s or w >= s:
            continue
        for _ in range(30):
            x0, y0 = int(rng.integers(0, s - w + 1)), int(rng.integers(0, s - h + 1))
            box = (x0, y0, x0 + w, y0 + h)
            if all(_iou(box, p) < 0.02 for p in placed):
                break
        else:
            continue
        level = rng.uniform(150, 255)
        region = canvas[y0:y0 + h, x0:x0 + w]
        canvas[y0:y0 + h, x0:x0 + w] = np.maximum(region, crop * level / 255.0)
        placed.append(box)
        if labelled:
            boxes.append((box, c))
    return np.clip(canvas, 0, 255).round().astype(np.uint8), boxes


def font_splits(cfg: CanvasConfig, chars: str, unlabeled_fonts: int = 0) -> dict[str, list[Path]]:
    """Fonts of each role: ``train``, ``val`` (from the pool, disjoint) and ``test`` (held out); with
    ``unlabeled_fonts`` also ``unlabeled``: the next pool fonts after the training and validation ones."""
    fonts = find_fonts(None)  # fonts covering digits and Latin letters: the same roles whatever the charset
    need = cfg.heldout_fonts + cfg.train_fonts + cfg.val_fonts + unlabeled_fonts
    if len(fonts) < need:
        raise ProckdError(f"the canvases need {need} fonts covering digits and Latin letters but only "
                          f"{len(fonts)} were found; run scripts/get_fonts.sh or lower the font counts"
                          + (" (data.unlabeled.canvas_fonts among them)" if unlabeled_fonts else ""))
    held, pool = font_roles(fonts, cfg.heldout_fonts, cfg.font_seed)
    if cfg.train_designs or cfg.test_designs:  # a cross-design column: roles first, then each role's designs
        pool = [f for f in pool if not cfg.train_designs or font_design(f) in cfg.train_designs]
        held = [f for f in held if not cfg.test_designs or font_design(f) in cfg.test_designs]
        short = cfg.train_fonts + cfg.val_fonts + unlabeled_fonts - len(pool)
        if short > 0 or not held:
            raise ProckdError(f"data.canvas: train_designs={cfg.train_designs} / test_designs={cfg.test_designs} "
                              f"leave {len(pool)} pool fonts for {cfg.train_fonts + cfg.val_fonts + unlabeled_fonts} "
                              f"training / validation / unlabelled ones and {len(held)} test fonts; lower the counts "
                              "or widen the designs")
    start = cfg.train_fonts + cfg.val_fonts
    roles = {"train": pool[:cfg.train_fonts], "val": pool[cfg.train_fonts:start], "test": held}
    if unlabeled_fonts:
        roles["unlabeled"] = pool[start:start + unlabeled_fonts]
    return roles


UNLABELED_ID = 1_000_000_000  # unlabelled images' ids start here: the teacher cache never mixes them with labelled ones


def build_unlabeled_canvases(cfg: CanvasConfig, fonts: int, n: int, log=print) -> list[tuple[Path, int]]:
    """Write (once, cached) ``n`` canvases of the student's characters in ``fonts`` further pool fonts (the
    transfer set of ``data.unlabeled.canvas_fonts``): the same scenes as the labelled splits draw, no boxes
    written. Returns (image file, image id) pairs, ids from :data:`UNLABELED_ID`."""
    chars = charset(cfg.charset)
    roles = font_splits(cfg, chars, fonts)
    key_src = {"v": 1, "cfg": cfg.model_dump(mode="json", exclude={"cache_dir"}), "n": n,
               "fonts": [(str(f), f.stat().st_size) for f in roles["unlabeled"]]}
    key = hashlib.sha1(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cfg.cache_dir).expanduser() / f"unlabeled-{key}"
    files = [(root / "images" / f"{i:05d}.png", UNLABELED_ID + i) for i in range(n)]
    if (root / "done").is_file():
        return files
    log(f"rendering {n} unlabelled canvases ({fonts} fonts, no boxes) -> {root}")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    sweep_orphans(root.parent, log)
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    loaded = [ImageFont.truetype(str(f), 96) for f in roles["unlabeled"]]
    for i in range(n):
        img, _ = render_canvas(loaded, chars, cfg.distractors, cfg, _rng(key, "unlabeled", i))
        img = shift_domain(img, cfg.train_shift, cfg.severity, seed=i)
        Image.fromarray(img, mode="L").save(tmp / "images" / f"{i:05d}.png")
    (tmp / "done").write_text(json.dumps(key_src))
    try:
        os.replace(tmp, root)
    except OSError:
        if not (root / "done").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return files


def split_names(cfg: CanvasConfig) -> tuple[list[str], list[str]]:
    """(split names written, test split names): ``train``, ``val``, ``test`` / ``test_fog`` / ``test_dusk``."""
    tests = ["test" if k == "none" else f"test_{k}" for k in cfg.test_shifts]
    return ["train"] + (["val"] if cfg.val_fonts else []) + tests, tests


def build_canvases(cfg: CanvasConfig, log=print) -> dict[str, tuple[Path, Path]]:
    """Write (once, cached) every split; returns split name -> (images folder, annotations file)."""
    chars = charset(cfg.charset)
    roles = font_splits(cfg, chars)
    key_src = {"v": 1, "cfg": cfg.model_dump(mode="json", exclude={"cache_dir"}),
               "fonts": {k: [(str(f), f.stat().st_size) for f in v] for k, v in roles.items()}}
    key = hashlib.sha1(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cfg.cache_dir).expanduser() / key
    names, _ = split_names(cfg)
    out = {n: (root / n / "images", root / n / "annotations.json") for n in names}
    if all(a.is_file() for _, a in out.values()):
        return out
    loaded = {k: [ImageFont.truetype(str(f), 96) for f in v] for k, v in roles.items()}
    cats = [{"id": i + 1, "name": c, "supercategory": "glyph"} for i, c in enumerate(chars)]
    for name in names:
        if out[name][1].is_file():
            continue
        role = name.split("_")[0]
        shift = cfg.train_shift if role in ("train", "val") else (name.split("_")[1] if "_" in name else "none")
        n = {"train": cfg.train_images, "val": cfg.val_images, "test": cfg.test_images}[role]
        log(f"rendering {n} canvases of split '{name}' ({len(roles[role])} fonts, shift {shift}) -> {root / name}")
        tmp = root / f".{name}.tmp-{os.getpid()}"
        sweep_orphans(root, log)  # a killed render's half-written split does not survive this start
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "images").mkdir(parents=True)
        images, anns = [], []
        for i in range(n):
            rng = _rng(key, role, i)  # the same scene in every shifted copy of a test split
            img, boxes = render_canvas(loaded[role], chars, cfg.distractors, cfg, rng)
            img = shift_domain(img, shift, cfg.severity, seed=i)
            fname = f"{i:05d}.png"
            Image.fromarray(img, mode="L").save(tmp / "images" / fname)
            images.append({"id": i + 1, "file_name": fname, "width": cfg.size, "height": cfg.size})
            for (x0, y0, x1, y1), c in boxes:
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c + 1,
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
        (tmp / "annotations.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
        try:
            os.replace(tmp, root / name)  # atomic; only complete splits are ever in place
        except OSError:
            if not out[name][1].is_file():  # not another process's identical, complete copy
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    return out
