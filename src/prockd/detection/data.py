"""Detection datasets read from disk: COCO json and VOC XML, checked before anything is trained.

Every annotation file is validated when the dataset is opened: an empty or unreadable file, a missing
image file, an unknown category, a box of zero or negative size or a box outside its image raise a
:class:`~prockd.errors.ProckdError` naming the file and the entry (the CLI prints it, exits 2 and writes
nothing). Images are read lazily, one per item, by ``DataLoader`` workers: a dataset never has to fit in
memory. Labels are ``1..K`` in the order of ``classes`` (0 is torchvision's background); categories not
in ``classes`` are dropped; crowd boxes are kept for evaluation only.
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from prockd.core.distributed import loader_context
from prockd.errors import ProckdError

BOX_TOLERANCE = 1.0  # pixels a box may stick out of its image (rounding in converters); clipped


@dataclass
class DetRecord:
    """One image and its boxes (``xyxy`` pixels, labels ``1..K``, crowd flags)."""

    file: str
    width: int
    height: int
    image_id: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    crowd: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))


def check_box(x0: float, y0: float, x1: float, y1: float, w: int, h: int, where: str) -> tuple[float, ...]:
    """A valid ``xyxy`` box inside a ``w x h`` image (clipped within :data:`BOX_TOLERANCE`), else an error
    naming ``where``."""
    if not all(np.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ProckdError(f"{where}: box has a non-finite coordinate ({x0}, {y0}, {x1}, {y1})")
    if x1 <= x0 or y1 <= y0:
        raise ProckdError(f"{where}: box has zero or negative size (x {x0}..{x1}, y {y0}..{y1}); fix or remove it")
    t = BOX_TOLERANCE
    if x0 < -t or y0 < -t or x1 > w + t or y1 > h + t:
        raise ProckdError(f"{where}: box (x {x0}..{x1}, y {y0}..{y1}) lies outside its {w}x{h} image; fix or "
                          "remove it")
    return max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1)


class DetectionSet(Dataset):
    """Records + class names; items are ``(image float 3 x H x W in [0, 1], target dict)``."""

    def __init__(self, records: list[DetRecord], classes: list[str], source: str,
                 supercategories: dict[str, str] | None = None):
        self.records = records
        self.classes = classes
        self.source = source
        self.supercategories = supercategories or {}  # class -> supercategory (COCO json; Fig. 11's Sim curve)

    def __len__(self) -> int:
        return len(self.records)

    def subset(self, n: int | None) -> "DetectionSet":
        """The first ``n`` images (all when ``n`` is None)."""
        return self if n is None else DetectionSet(self.records[:n], self.classes, self.source, self.supercategories)

    def load_image(self, i: int) -> torch.Tensor:
        """Image ``i`` as a float tensor ``3 x H x W`` in [0, 1]."""
        r = self.records[i]
        try:
            with Image.open(r.file) as im:
                arr = np.asarray(im.convert("RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise ProckdError(f"{self.source}: image {r.file} is unreadable ({e})") from None
        if arr.shape[0] != r.height or arr.shape[1] != r.width:
            raise ProckdError(f"{self.source}: image {r.file} is {arr.shape[1]}x{arr.shape[0]} but the annotation "
                              f"file says {r.width}x{r.height}")
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)

    def target(self, i: int) -> dict:
        """Training target of image ``i`` (crowd boxes left out)."""
        r = self.records[i]
        keep = ~r.crowd
        return {"boxes": torch.as_tensor(r.boxes[keep], dtype=torch.float32).reshape(-1, 4),
                "labels": torch.as_tensor(r.labels[keep], dtype=torch.int64), "image_id": r.image_id}

    def __getitem__(self, i: int):
        return self.load_image(i), self.target(i)

    def coco_gt(self) -> dict:
        """The split as a COCO ground-truth dict (category ids ``1..K`` = labels)."""
        images, anns = [], []
        for r in self.records:
            images.append({"id": r.image_id, "file_name": Path(r.file).name, "width": r.width, "height": r.height})
            for b, lab, c in zip(r.boxes, r.labels, r.crowd):
                w, h = float(b[2] - b[0]), float(b[3] - b[1])
                anns.append({"id": len(anns) + 1, "image_id": r.image_id, "category_id": int(lab),
                             "bbox": [float(b[0]), float(b[1]), w, h], "area": w * h, "iscrowd": int(c)})
        cats = [{"id": i + 1, "name": n, "supercategory": self.supercategories.get(n, n)}
                for i, n in enumerate(self.classes)]
        return {"images": images, "annotations": anns, "categories": cats}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ProckdError(f"annotation file not found: {path}")
    try:
        text = path.read_text()
    except OSError as e:
        raise ProckdError(f"annotation file {path} is unreadable ({e})") from None
    if not text.strip():
        raise ProckdError(f"annotation file {path} is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProckdError(f"annotation file {path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("categories"), list):
        raise ProckdError(f"annotation file {path} is not COCO json (needs 'images' and 'categories' lists)")
    return data


def _class_index(names: list[str], classes: list[str] | None, name_map: dict[str, str], source: str) -> list[str]:
    """The class order: ``classes`` when given (each must occur in the file), else the file's own order."""
    mapped = [name_map.get(n, n) for n in names]
    if classes is None:
        return list(dict.fromkeys(mapped))
    missing = [c for c in classes if c not in mapped]
    if missing:
        raise ProckdError(f"{source}: classes {missing} are not categories of this file (it has: "
                          f"{', '.join(sorted(set(mapped)))}); fix data.classes or data.name_map")
    return list(classes)


def read_coco(images: str | Path, annotations: str | Path, classes: list[str] | None = None,
              name_map: dict[str, str] | None = None) -> DetectionSet:
    """A COCO-json split (boxes ``[x, y, w, h]``), validated entry by entry."""
    ann_path, img_dir = Path(annotations), Path(images)
    data = _read_json(ann_path)
    name_map = name_map or {}
    src = str(ann_path)
    cat_name, sup = {}, {}
    for c in data["categories"]:
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise ProckdError(f"{src}: category entry {c!r} needs 'id' and 'name'")
        cat_name[c["id"]] = name_map.get(c["name"], c["name"])
        if c.get("supercategory"):
            sup[cat_name[c["id"]]] = str(c["supercategory"])
    order = _class_index([c["name"] for c in data["categories"]], classes, name_map, src)
    label_of = {n: i + 1 for i, n in enumerate(order)}
    if not img_dir.is_dir():
        raise ProckdError(f"{src}: image folder not found: {img_dir}")
    recs: dict[int, DetRecord] = {}
    for im in data["images"]:
        try:
            iid, fname, w, h = im["id"], im["file_name"], int(im["width"]), int(im["height"])
        except (KeyError, TypeError, ValueError):
            raise ProckdError(f"{src}: image entry {im!r} needs 'id', 'file_name', 'width', 'height'") from None
        f = img_dir / fname
        if not f.is_file():
            raise ProckdError(f"{src}: image {iid} ('{fname}') not found: {f}")
        recs[iid] = DetRecord(str(f), w, h, int(iid))
    boxes: dict[int, list] = {i: [] for i in recs}
    for a in data.get("annotations", []):
        aid = a.get("id", "?") if isinstance(a, dict) else "?"
        where = f"{src}: annotation {aid}"
        try:
            iid, cid, (x, y, w, h) = a["image_id"], a["category_id"], a["bbox"]
            x, y, w, h = float(x), float(y), float(w), float(h)
        except (KeyError, TypeError, ValueError):
            raise ProckdError(f"{where} needs 'image_id', 'category_id' and 'bbox' [x, y, w, h]") from None
        if iid not in recs:
            raise ProckdError(f"{where}: image_id {iid} is not in 'images'")
        if cid not in cat_name:
            raise ProckdError(f"{where}: unknown category_id {cid} (categories: {sorted(cat_name)})")
        r = recs[iid]
        box = check_box(x, y, x + w, y + h, r.width, r.height, f"{where} (image '{Path(r.file).name}')")
        name = cat_name[cid]
        if name in label_of:
            boxes[iid].append((*box, label_of[name], bool(a.get("iscrowd", 0))))
    return DetectionSet([_fill(recs[i], boxes[i]) for i in recs], order, src, sup)


def _fill(r: DetRecord, rows: list) -> DetRecord:
    if rows:
        arr = np.asarray(rows, dtype=np.float64)
        r.boxes = arr[:, :4].astype(np.float32)
        r.labels = arr[:, 4].astype(np.int64)
        r.crowd = arr[:, 5].astype(bool)
    return r


def read_voc(root: str | Path, split: str, classes: list[str] | None = None,
             name_map: dict[str, str] | None = None) -> DetectionSet:
    """A VOC split (``root/ImageSets/Main/<split>.txt``, ``Annotations/*.xml``, ``JPEGImages``); ``difficult``
    boxes are kept as crowd (ignored) boxes, as VOC evaluation ignores them."""
    root = Path(root)
    name_map = name_map or {}
    ids_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not ids_file.is_file():
        raise ProckdError(f"VOC split file not found: {ids_file}")
    ids = [line.split()[0] for line in ids_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise ProckdError(f"VOC split file {ids_file} lists no images")
    parsed = []
    for n, sid in enumerate(ids):
        xml = root / "Annotations" / f"{sid}.xml"
        if not xml.is_file():
            raise ProckdError(f"{ids_file}: annotation file of '{sid}' not found: {xml}")
        try:
            tree = ET.parse(xml).getroot()
        except (ET.ParseError, OSError) as e:
            raise ProckdError(f"annotation file {xml} is unreadable XML ({e})") from None
        fname = (tree.findtext("filename") or f"{sid}.jpg").strip()
        img = root / "JPEGImages" / fname
        if not img.is_file():
            raise ProckdError(f"{xml}: image not found: {img}")
        try:
            w, h = int(float(tree.findtext("size/width"))), int(float(tree.findtext("size/height")))
        except (TypeError, ValueError):
            raise ProckdError(f"{xml}: <size> needs <width> and <height>") from None
        objs = []
        for k, o in enumerate(tree.findall("object")):
            name = name_map.get((o.findtext("name") or "").strip(), (o.findtext("name") or "").strip())
            where = f"{xml}: object {k} ('{name}')"
            try:
                b = [float(o.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax")]
            except (TypeError, ValueError):
                raise ProckdError(f"{where} needs <bndbox> with xmin, ymin, xmax, ymax") from None
            objs.append((name, check_box(*b, w, h, where), (o.findtext("difficult") or "0").strip() == "1", where))
        parsed.append((img, w, h, objs))
    names = [o[0] for _, _, _, objs in parsed for o in objs]
    order = sorted(set(names)) if classes is None else list(classes)  # a split may lack some classes
    known = set(order)
    recs = []
    for n, (img, w, h, objs) in enumerate(parsed):
        rows = []
        for name, box, diff, where in objs:
            if name not in known:
                if classes is None:
                    continue
                raise ProckdError(f"{where}: unknown category '{name}' (classes: {', '.join(order)}); add it to "
                                  "data.classes or map it with data.name_map")
            rows.append((*box, order.index(name) + 1, diff))
        recs.append(_fill(DetRecord(str(img), w, h, n + 1), rows))
    return DetectionSet(recs, order, str(ids_file))


def open_split(split, classes: list[str] | None, name_map: dict[str, str]) -> DetectionSet:
    """A :class:`~prockd.detection.config.DetSplitConfig` opened as a dataset."""
    if split.format == "coco":
        return read_coco(Path(split.images).expanduser(), Path(split.annotations).expanduser(), classes, name_map)
    return read_voc(Path(split.root).expanduser(), split.split, classes, name_map)


def unlabeled_set(files: list[tuple[str | Path, int]], classes: list[str], source: str) -> DetectionSet:
    """Images without boxes (``data.unlabeled``) as a :class:`DetectionSet`: (file, image id) pairs, each file's
    size read from its header (an unreadable file is an error naming it, before training)."""
    recs = []
    for f, iid in files:
        try:
            with Image.open(f) as im:
                w, h = im.size
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise ProckdError(f"{source}: image {f} is unreadable ({e})") from None
        recs.append(DetRecord(str(f), w, h, int(iid)))
    if not recs:
        raise ProckdError(f"{source}: no unlabelled images")
    return DetectionSet(recs, classes, source)


def collate(batch):
    """A list of (image, target) pairs -> (list of images, list of targets), sizes may differ."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def make_loader(ds: DetectionSet, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
                workers: int = 2, rank: int = 0, world: int = 1) -> DataLoader:
    """A ``DataLoader`` over ``ds``: a deterministic permutation per (seed, epoch) when shuffling, sharded over
    ``world`` ranks (every rank gets the same number of images; short shards repeat their first images)."""
    n = len(ds)
    if shuffle:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
    else:
        order = list(range(n))
    if world > 1:
        per = -(-n // world)
        order = (order + order[: per * world - n])[rank::world]

    return DataLoader(ds, batch_size=batch_size, sampler=order, num_workers=workers, collate_fn=collate,
                      persistent_workers=False, drop_last=False, multiprocessing_context=loader_context(workers))


def hflip(images: list[torch.Tensor], targets: list[dict], g: torch.Generator) -> tuple[list, list]:
    """Random horizontal flip (probability 1/2 per image) of images and their boxes; a flipped image's target
    says ``flipped: True`` (the teacher cache's key)."""
    out_i, out_t = [], []
    for im, t in zip(images, targets):
        if bool(torch.rand((), generator=g) < 0.5):
            w = im.shape[-1]
            im = im.flip(-1)
            b = t["boxes"].clone()
            b[:, [0, 2]] = w - t["boxes"][:, [2, 0]]
            t = dict(t, boxes=b, flipped=True)
        out_i.append(im)
        out_t.append(t)
    return out_i, out_t
