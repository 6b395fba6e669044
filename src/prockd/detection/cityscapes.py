"""Cityscapes (and Foggy Cityscapes) in the official layout -> COCO json for the 8 detection classes.

What mmdet's Cityscapes converter produces (``instancesonly_filtered_gtFine_{split}.json``), from the official
instance images: in ``gtFine/<split>/<city>/*_gtFine_instanceIds.png`` a pixel value ``v >= 1000`` belongs to
instance ``v % 1000`` of the class with label id ``v // 1000``; values below 1000 are stuff or crowd regions
("car group") and are not instances. The 8 classes are Cityscapes' instance classes that are evaluated
(caravan and trailer are instance classes marked ``ignoreInEval`` and are left out), with their official
label ids (``cityscapesscripts.helpers.labels``; a test checks this table against it when that package is
installed). A box is the extent of its instance's pixels (COCO ``[x, y, w, h]``, pixel-inclusive: ``w =
x_max - x_min + 1``), its area the pixel count. Images without any of the 8 classes are kept (a detector
may train on them as background; the loaders accept empty images).

Foggy Cityscapes reuses these annotations: with ``foggy_beta`` the image entries point at
``leftImg8bit_foggy/<split>/<city>/<stem>_leftImg8bit_foggy_beta_<beta>.png`` and the file is named
``instancesonly_filtered_gtFine_<split>_foggy<beta>.json`` (the names ``configs/detection/paper/table2_*.yaml``
read). ``file_name`` is relative to the split's image folder (``leftImg8bit/<split>`` or
``leftImg8bit_foggy/<split>``).
"""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from prockd.core.io import atomic_write_json
from prockd.errors import ProckdError

# label id -> name (official Cityscapes label ids), in mmdet's category order (category ids 1..8)
CITYSCAPES_LABEL_IDS = {24: "person", 25: "rider", 26: "car", 27: "truck", 28: "bus", 31: "train",
                        32: "motorcycle", 33: "bicycle"}
INSTANCE_SUFFIX = "_gtFine_instanceIds.png"


def image_relpath(city: str, stem: str, foggy_beta: float | None) -> str:
    """``file_name`` of one frame, relative to its split's image folder."""
    if foggy_beta is None:
        return f"{city}/{stem}_leftImg8bit.png"
    return f"{city}/{stem}_leftImg8bit_foggy_beta_{foggy_beta:g}.png"


def output_name(split: str, foggy_beta: float | None) -> str:
    """The annotation file's name (mmdet's, with ``_foggy<beta>`` for Foggy Cityscapes)."""
    return f"instancesonly_filtered_gtFine_{split}" + ("" if foggy_beta is None else f"_foggy{foggy_beta:g}") + ".json"


def instances_of(ids: np.ndarray) -> list[dict]:
    """COCO annotations (``category_id`` 1..8, ``bbox``, ``area``; no ``id`` yet) of one instance-id image."""
    cat_of = {lid: i + 1 for i, lid in enumerate(CITYSCAPES_LABEL_IDS)}
    out = []
    for v in np.unique(ids):
        v = int(v)
        if v < 1000 or v // 1000 not in cat_of:
            continue
        ys, xs = np.nonzero(ids == v)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
        out.append({"category_id": cat_of[v // 1000], "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1],
                    "area": int(len(xs)), "iscrowd": 0, "instance_value": v})
    return out


def _read_instance_image(path: str) -> tuple[tuple[int, int], list[dict]]:
    """((width, height), annotations) of one ``*_gtFine_instanceIds.png``."""
    try:
        with Image.open(path) as im:
            ids = np.asarray(im, dtype=np.int64)
            size = im.size
    except OSError as e:
        raise ProckdError(f"{path}: not a readable instance-id image ({e}); re-extract gtFine from the official "
                          f"archive") from None
    if ids.ndim != 2:
        raise ProckdError(f"{path}: an instance-id image must have one channel, got shape {ids.shape}")
    return size, instances_of(ids)


def convert_cityscapes(root: str | Path, split: str, out_dir: str | Path | None = None,
                       foggy_beta: float | None = None, workers: int = 1, log=print) -> Path:
    """Convert one split of a Cityscapes tree (``root`` holds ``gtFine/`` and ``leftImg8bit/`` or
    ``leftImg8bit_foggy/``) to COCO json; returns the written file (atomically; default folder
    ``root/annotations``). Every frame's image must exist: a missing one is an error naming it."""
    root = Path(root)
    gt = root / "gtFine" / split
    files = sorted(gt.glob(f"*/*{INSTANCE_SUFFIX}"))
    if not files:
        raise ProckdError(f"no {gt}/<city>/*{INSTANCE_SUFFIX}: point --root at the folder holding gtFine/ and "
                          f"leftImg8bit/ (the official Cityscapes archives gtFine_trainvaltest.zip, "
                          f"leftImg8bit_trainvaltest.zip{', leftImg8bit_trainvaltest_foggy.zip' if foggy_beta else ''})")
    img_root = root / ("leftImg8bit" if foggy_beta is None else "leftImg8bit_foggy") / split
    entries = []
    for f in files:
        city, stem = f.parent.name, f.name[: -len(INSTANCE_SUFFIX)]
        rel = image_relpath(city, stem, foggy_beta)
        if not (img_root / rel).is_file():
            raise ProckdError(f"{f}: its image {img_root / rel} is missing; extract the matching leftImg8bit"
                              f"{'_foggy' if foggy_beta is not None else ''} archive under {root}")
        entries.append((f, rel))
    log(f"converting {len(entries)} frames of Cityscapes '{split}'"
        f"{'' if foggy_beta is None else f' (foggy, beta {foggy_beta:g})'} ...")
    paths = [str(f) for f, _ in entries]
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            read = list(ex.map(_read_instance_image, paths, chunksize=16))
    else:
        read = [_read_instance_image(p) for p in paths]
    images, anns = [], []
    for i, ((f, rel), ((w, h), inst)) in enumerate(zip(entries, read), start=1):
        images.append({"id": i, "file_name": rel, "width": w, "height": h})
        for a in inst:
            a.pop("instance_value")
            anns.append(dict(a, id=len(anns) + 1, image_id=i))
    cats = [{"id": i + 1, "name": n, "supercategory": "human" if n in ("person", "rider") else "vehicle"}
            for i, n in enumerate(CITYSCAPES_LABEL_IDS.values())]
    out = Path(out_dir) if out_dir is not None else root / "annotations"
    out.mkdir(parents=True, exist_ok=True)
    path = out / output_name(split, foggy_beta)
    atomic_write_json(path, {"images": images, "annotations": anns, "categories": cats})
    per = {c["name"]: sum(a["category_id"] == c["id"] for a in anns) for c in cats}
    log(f"wrote {path}: {len(images)} images, {len(anns)} instances ("
        + ", ".join(f"{k} {v}" for k, v in per.items()) + ")")
    return path
