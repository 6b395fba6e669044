"""Example image folders made from data on this machine: Fashion-MNIST written out as a user's own ImageFolder
(``train/``, ``val/``, ``test/`` with one sub-folder per class) and an unlabelled folder of further images, in
nested sub-folders and several file formats. The own-data walk-through (docs/own-data.md), its test and
``prockd bench memory`` start from them."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from prockd.classification.config import DataConfig
from prockd.classification.data import FASHION_MNIST_CLASSES, load_fashion_mnist
from prockd.core.io import sweep_orphans
from prockd.errors import ProckdError

UNLABELED_FORMATS = ("png", "jpg", "webp", "tiff", "bmp")  # the unlabelled folder cycles through these


def _slug(name: str) -> str:
    return name.lower().replace("/", "_").replace(" ", "_")


def write_fashion_mnist_folder(root: str | Path, classes: tuple[int, ...] = (0, 1, 2, 3), train_per_class: int = 60,
                               val_per_class: int = 15, test_per_class: int = 50, unlabeled: int = 200,
                               size: int | None = None, rgb: bool = False, seed: int = 0, log=print) -> Path:
    """Write Fashion-MNIST's ``classes`` as an ImageFolder under ``root``: ``train/`` and ``val/`` (disjoint images of
    Fashion-MNIST's training split), ``test/`` (its test split), PNG files, and ``unlabeled/`` (``unlabeled`` further
    training-split images of the same classes, labels dropped, spread over sub-folders and
    :data:`UNLABELED_FORMATS`). ``size`` resizes (default: the own 28 px), ``rgb`` writes 3 channels. Written under a
    temporary name and renamed into place: a folder that exists with the same request is reused."""
    root = Path(root).expanduser()
    request = {"classes": list(classes), "train": train_per_class, "val": val_per_class, "test": test_per_class,
               "unlabeled": unlabeled, "size": size, "rgb": rgb, "seed": seed, "version": 1}
    stamp = root / "prockd-folder.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == request:
        return root
    if root.exists() and any(root.iterdir()):
        raise ProckdError(f"{root} exists and is not a folder this function wrote with the same request; "
                          "pick another folder or remove it")
    xtr, ytr, xte, yte, _ = load_fashion_mnist(DataConfig(name="fashion_mnist"))
    rng = np.random.default_rng(seed)
    pick = {c: rng.permutation(np.flatnonzero(ytr == c)) for c in classes}
    need = train_per_class + val_per_class + -(-unlabeled // max(1, len(classes)))
    short = [c for c in classes if len(pick[c]) < need]
    if short:
        raise ProckdError(f"Fashion-MNIST has fewer than {need} training images of classes {short}; ask for fewer")
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    sweep_orphans(root.parent)  # a killed writer's half-written folder does not survive this start
    shutil.rmtree(tmp, ignore_errors=True)

    def save(img: np.ndarray, path: Path) -> None:
        im = Image.fromarray(img[0])
        if size is not None and size != im.size[0]:
            im = im.resize((size, size), Image.BICUBIC)
        if rgb:
            im = im.convert("RGB")
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path)

    try:
        for c in classes:
            name = _slug(FASHION_MNIST_CLASSES[c])
            for k, i in enumerate(pick[c][:train_per_class]):
                save(xtr[i], tmp / "train" / name / f"{k:05d}.png")
            for k, i in enumerate(pick[c][train_per_class:train_per_class + val_per_class]):
                save(xtr[i], tmp / "val" / name / f"{k:05d}.png")
            for k, i in enumerate(np.flatnonzero(yte == c)[:test_per_class]):
                save(xte[i], tmp / "test" / name / f"{k:05d}.png")
        rest = np.concatenate([pick[c][train_per_class + val_per_class:] for c in classes])
        for k, i in enumerate(rng.permutation(rest)[:unlabeled]):
            fmt = UNLABELED_FORMATS[k % len(UNLABELED_FORMATS)]
            save(xtr[i], tmp / "unlabeled" / f"batch{k // 1000:03d}" / f"{k:06d}.{fmt}")
            if (k + 1) % 2000 == 0:
                log(f"  unlabelled images written: {k + 1}/{unlabeled}")
        (tmp / "prockd-folder.json").write_text(json.dumps(request))
        if root.exists():
            root.rmdir()
        os.rename(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
