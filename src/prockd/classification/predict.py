"""Top-k predictions of a deployed student from its file alone (``student.pt`` or an exported ``.onnx``) on
image files and folders."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from prockd.core.io import IMAGE_SUFFIXES
from prockd.classification.deploy import default_input_shape, load_deployed
from prockd.classification.export import ONNX_FORMAT, ort_session
from prockd.errors import ProckdError


class Predictor:
    """A deployed student from a ``.pt`` or ``.onnx`` file: raw images -> logits, with class names and input
    shape read from the file alone."""

    def __init__(self, path: str | Path, threads: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise ProckdError(f"model file not found: {self.path}")
        if self.path.suffix.lower() == ".onnx":
            self.session = ort_session(self.path, threads)
            meta = self.session.get_modelmeta().custom_metadata_map
            if meta.get("prockd.format") != ONNX_FORMAT:
                raise ProckdError(f"{self.path} is an ONNX model without prockd metadata; export it with "
                                  "'prockd export --run DIR --onnx FILE'")
            self.class_names = json.loads(meta.get("prockd.class_names", "null"))
            self.input_shape = tuple(json.loads(meta["prockd.input_shape"]))
            self.model = None
        else:
            self.model = load_deployed(self.path)
            self.session = None
            self.class_names = self.model.class_names
            self.input_shape = default_input_shape(self.model)

    def logits(self, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """Logits ``N x classes`` for raw images ``N x C x H x W`` in [0, 1]."""
        outs = []
        for s in range(0, len(images), batch_size):
            x = images[s:s + batch_size].float()
            if self.session is not None:
                outs.append(self.session.run(None, {self.session.get_inputs()[0].name: x.numpy()})[0])
            else:
                with torch.no_grad():
                    outs.append(self.model(x).float().numpy())
        return np.concatenate(outs) if outs else np.zeros((0, len(self.class_names or [])), np.float32)

    def predict(self, images: torch.Tensor | Sequence[str | Path], topk: int = 5) -> list[list[dict]]:
        """Top-k classes of each image, best first: ``[{"class": name, "index": k, "prob": p}, ...]`` per image.
        ``images``: raw ``N x C x H x W`` in [0, 1] (the file's input shape), or image files (read, converted to
        the model's channels and resized as ``prockd predict`` does)."""
        if not isinstance(images, torch.Tensor):
            images = torch.stack([load_image(Path(f), self.input_shape) for f in images])
        probs = torch.from_numpy(self.logits(images)).softmax(-1)
        k = min(topk, probs.shape[-1])
        val, idx = probs.topk(k, dim=-1)
        return [[{"class": self.name(int(i)), "index": int(i), "prob": round(float(v), 5)} for v, i in zip(vr, ir)]
                for vr, ir in zip(val, idx)]

    def name(self, k: int) -> str:
        """Class name of index ``k`` (the index itself when the file has no names)."""
        return self.class_names[k] if self.class_names else str(k)


def image_files(inputs: list[str]) -> list[Path]:
    """The image files named by ``inputs`` (files, or folders searched recursively), in a stable order."""
    files: list[Path] = []
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ProckdError(f"folder {p} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise ProckdError(f"image or folder not found: {p}")
    return files


def load_image(path: Path, shape: tuple[int, int, int]) -> torch.Tensor:
    """One image file as ``C x H x W`` in [0, 1]: grey or RGB as the model's channels, resized to its input."""
    c, h, w = shape
    try:
        with Image.open(path) as im:
            im = im.convert("L" if c == 1 else "RGB")
            if im.size != (w, h):
                im = im.resize((w, h), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise ProckdError(f"{path} is not a readable image: {e}") from None
    t = torch.from_numpy(arr.copy())
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    if t.shape[0] != c:
        raise ProckdError(f"{path}: the model expects {c} channels")
    return t


def predict_files(pred: Predictor, files: list[Path], topk: int = 5) -> list[dict]:
    """Top-k classes (name, index, probability) for each image file (:meth:`Predictor.predict`)."""
    return [{"image": str(f), "top": top} for f, top in zip(files, pred.predict(files, topk))]
