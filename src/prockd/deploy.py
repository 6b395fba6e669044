"""The deployable student: backbone + FA + prototypes, predicting alone; saved to and reloaded from a file,
exported to ONNX with a dynamic batch axis and checked against onnxruntime, and used for top-k predictions.

Two file kinds hold a deployed student and both predict without the teacher or the training config:

- ``.pt`` (format ``prockd-deployed-v1``): the student's config, FA, prototypes, class names, input shape;
- ``.onnx``: the same network as one graph (raw images in [0, 1] -> logits), with the class names and the
  input shape in the model's metadata (``prockd.*`` keys).
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from prockd.config import ModelConfig
from prockd.errors import ProckdError
from prockd.io import atomic_torch_save
from prockd.modules import mean_prob_logits

FORMAT = "prockd-deployed-v1"
ONNX_FORMAT = "prockd-deployed-onnx-v1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")


class DeployedStudent(nn.Module):
    """Student at deployment: raw images in [0, 1] -> logits. ``output`` is plain, aug or avg.

    ``forward`` keeps autograd available (attention relevance needs gradients); wrap it in
    ``torch.no_grad()`` to predict.
    """

    def __init__(self, student, fa: nn.Module | None, prototypes: torch.Tensor | None, output: str):
        super().__init__()
        self.student = copy.deepcopy(student)
        for m in self.student.modules():  # the copy must not feed the training recorder's hooks
            m._forward_hooks.clear()
        self.student.recorder = None
        self.student.embed_path = None
        self.fa = copy.deepcopy(fa) if fa is not None else None
        if prototypes is not None:
            self.register_buffer("prototypes", prototypes.detach().clone())
        else:
            self.prototypes = None
        self.output = output if fa is not None else "plain"
        self.class_names: list[str] | None = None
        self.input_shape: tuple[int, int, int] | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits in the student's label space."""
        tok, lay, _ = self.student.features(images)
        return self.logits_from_tokens(tok, lay)

    def _paths(self, tok: torch.Tensor, lay, pre_logits: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(plain head, head after FA) on the backbone's tokens; each None when the deployed output skips it."""
        plain = None if self.output == "aug" else self.student.head(tok, lay, pre_logits=pre_logits)
        aug = None if self.output == "plain" else self.student.head(self.fa(tok, self.prototypes), lay,
                                                                    pre_logits=pre_logits)
        return plain, aug

    def logits_from_tokens(self, tok: torch.Tensor, lay) -> torch.Tensor:
        """Logits from the backbone's last tokens (FA and head; what follows the backbone at deployment)."""
        plain, aug = self._paths(tok, lay, pre_logits=False)
        if aug is None or plain is None:
            return aug if plain is None else plain
        return mean_prob_logits(plain, aug)

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """The pooled features the deployed classifier reads (``pre_logits``): after FA for the aug output,
        the concatenation of both paths for avg, the backbone's own for plain."""
        tok, lay, _ = self.student.features(images)
        return torch.cat([f for f in self._paths(tok, lay, pre_logits=True) if f is not None], dim=-1)

    def without_fa(self) -> "DeployedStudent":
        """The same backbone and head predicting from its own tokens (what FA adds is measured against it)."""
        plain = DeployedStudent(self.student, None, None, "plain")
        plain.class_names, plain.input_shape = self.class_names, self.input_shape
        return plain.eval()

    def save(self, path: str | Path, num_classes: int, class_names: list[str] | None = None,
             input_shape: tuple[int, int, int] | None = None) -> None:
        """Write a self-describing file (config + weights + class names + input shape) atomically."""
        cfg = self.student.cfg.model_dump(mode="json")
        cfg.update(pretrained=False, checkpoint=None, init_from_teacher=False)
        shape = input_shape or self.input_shape
        atomic_torch_save({
            "format": FORMAT, "student_cfg": cfg, "num_classes": num_classes, "output": self.output,
            "has_fa": self.fa is not None, "fa_scale": bool(getattr(self.fa, "scale", False)),
            "num_prototypes": 0 if self.prototypes is None else int(self.prototypes.shape[0]),
            "class_names": class_names if class_names is not None else self.class_names,
            "input_shape": list(shape) if shape else None, "state_dict": self.state_dict(),
        }, path)


def default_input_shape(dep: DeployedStudent) -> tuple[int, int, int]:
    """(C, H, W) of the images the student was trained on; the student's own input size for older files."""
    if dep.input_shape:
        return tuple(int(v) for v in dep.input_shape)
    t = dep.student.transform
    return (t.in_chans, t.size or 224, t.size or 224)


def load_deployed(path: str | Path) -> DeployedStudent:
    """Rebuild a :class:`DeployedStudent` from a file written by :meth:`DeployedStudent.save`."""
    from prockd.models import Student, create_model
    from prockd.modules import FeatureAugmentation

    p = Path(path)
    if not p.is_file():
        raise ProckdError(f"deployed student file not found: {p}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ProckdError(f"deployed student file {p} is unreadable: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ProckdError(f"{p} is not a prockd deployed-student file (format {FORMAT})")
    cfg = ModelConfig(**obj["student_cfg"])
    student = Student(create_model(cfg, obj["num_classes"], "student"), cfg, need_embed=False)
    fa, protos = None, None
    if obj["has_fa"]:
        fa = FeatureAugmentation(student.width, scale=obj["fa_scale"])
        protos = torch.zeros(obj["num_prototypes"], student.width)
    dep = DeployedStudent(student, fa, protos, obj["output"])
    dep.load_state_dict(obj["state_dict"], strict=True)
    dep.class_names = obj.get("class_names")
    dep.input_shape = tuple(obj["input_shape"]) if obj.get("input_shape") else None
    return dep.eval()


def load_run_student(run: Path, checkpoint: str = "selected"):
    """(deployed student, run config, task or None) of a run directory: its validation-selected ``student.pt``
    (task None: not built), or the student of ``checkpoints/{best,last}.pt`` rebuilt (the task built with it)."""
    from prockd.config import load_config

    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise ProckdError(f"{run} is not a prockd run directory (no config.yaml)")
    cfg = load_config(run / "config.yaml")
    if checkpoint == "selected":
        if not (run / "student.pt").is_file():
            raise ProckdError(f"{run} has no student.pt: the run has not finished (run it again to resume, or "
                              "export --checkpoint last)")
        return load_deployed(run / "student.pt"), cfg, None
    from prockd.engine import build

    ckpt = run / "checkpoints" / f"{checkpoint}.pt"
    if not ckpt.is_file():
        raise ProckdError(f"checkpoint not found: {ckpt}")
    built = build(cfg)
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        built.distiller.load_state_dict(state["distiller"])
    except Exception as e:  # noqa: BLE001
        raise ProckdError(f"checkpoint {ckpt} is unreadable: {e}") from None
    dep = built.distiller.export().eval()
    dep.class_names = built.task.class_names
    dep.input_shape = built.task.image_shape
    return dep, cfg, built.task


# --------------------------------------------------------------------------------------------- ONNX

def _onnx_export_raw(model: nn.Module, example: torch.Tensor, path: str, opset: int) -> str:
    """``torch.onnx.export`` with a dynamic batch axis: the dynamo exporter, else the TorchScript one.
    Returns the exporter used."""
    import warnings

    try:
        batch = torch.export.Dim("batch", min=1, max=65536)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), path, dynamo=True, opset_version=max(opset, 18),
                              input_names=["images"], output_names=["logits"],
                              dynamic_shapes={"images": {0: batch}}, verbose=False)
        return "dynamo"
    except Exception as first:  # noqa: BLE001 - fall back to the TorchScript exporter, say why if it fails too
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (example,), path, dynamo=False, opset_version=opset,
                                  input_names=["images"], output_names=["logits"],
                                  dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
            return "torchscript"
        except Exception as second:  # noqa: BLE001
            raise ProckdError(f"ONNX export failed with both exporters: dynamo: {type(first).__name__}: "
                              f"{str(first)[:300]}; torchscript: {type(second).__name__}: {str(second)[:300]}") from None


def ort_session(path: str | Path, threads: int | None = None, spin: bool = True):
    """An onnxruntime CPU session with every graph optimisation and ``threads`` intra-op threads; ``spin=False``
    stops its idle threads from busy-waiting after a call (they would steal the cores of whatever runs next)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ProckdError("ONNX needs the package 'onnxruntime' (pip install onnxruntime)") from None
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise ProckdError(f"ONNX model {path} cannot be loaded by onnxruntime: {type(e).__name__}: "
                          f"{str(e)[:300]}") from None


def check_parity(model: nn.Module, session, images: torch.Tensor, atol: float = 1e-3) -> dict:
    """Compare PyTorch and onnxruntime logits on ``images`` (whole batch, then single images to exercise the
    dynamic batch axis): max absolute difference, top-1 agreement."""
    model.eval()
    name = session.get_inputs()[0].name
    with torch.no_grad():
        ref = model(images).float().numpy()
    out = session.run(None, {name: images.numpy().astype(np.float32)})[0]
    singles = np.concatenate([session.run(None, {name: images[i:i + 1].numpy().astype(np.float32)})[0]
                              for i in range(min(4, len(images)))])
    diff = max(float(np.abs(out - ref).max()), float(np.abs(singles - ref[:len(singles)]).max()))
    agree = float((out.argmax(-1) == ref.argmax(-1)).mean())
    return {"images": int(len(images)), "max_abs_diff": diff, "top1_agreement": agree,
            "atol": atol, "ok": bool(diff <= atol and agree == 1.0)}


def export_onnx(dep: DeployedStudent, path: str | Path, images: torch.Tensor, opset: int = 18,
                atol: float = 1e-3) -> dict:
    """Export ``dep`` to ONNX (dynamic batch axis, metadata with class names and input shape), verify it with
    onnxruntime on ``images`` (real test images, raw [0, 1]) and move it into place only when the logits agree
    within ``atol`` and every top-1 is identical. Returns the report; raises :class:`ProckdError` otherwise."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dep = dep.eval()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        example = images[:2] if len(images) >= 2 else images.repeat(2, 1, 1, 1)  # batch >= 2 keeps it dynamic
        exporter = _onnx_export_raw(dep, example, tmp, opset)
        m = onnx.load(tmp)
        meta = {"prockd.format": ONNX_FORMAT, "prockd.class_names": json.dumps(dep.class_names),
                "prockd.input_shape": json.dumps(list(default_input_shape(dep))), "prockd.output": dep.output}
        del m.metadata_props[:]
        for k, v in meta.items():
            m.metadata_props.add(key=k, value=v)
        onnx.checker.check_model(m)
        onnx.save(m, tmp)
        report = check_parity(dep, ort_session(tmp), images, atol)
        report.update(exporter=exporter, opset=int(m.opset_import[0].version), file=str(path),
                      bytes=os.path.getsize(tmp))
        if not report["ok"]:
            raise ProckdError(f"ONNX parity check failed for {path}: max |logit diff| {report['max_abs_diff']:.2e} "
                              f"(limit {atol:g}), top-1 agreement {100 * report['top1_agreement']:.1f} % on "
                              f"{report['images']} test images; nothing written")
        os.replace(tmp, path)
        return report
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --------------------------------------------------------------------------------------------- predict

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
    from PIL import Image, UnidentifiedImageError

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
    """Top-k classes (name, index, probability) for each image file."""
    x = torch.stack([load_image(f, pred.input_shape) for f in files])
    logits = torch.from_numpy(pred.logits(x))
    probs = logits.softmax(-1)
    k = min(topk, probs.shape[-1])
    val, idx = probs.topk(k, dim=-1)
    return [{"image": str(f), "top": [{"class": pred.name(int(i)), "index": int(i), "prob": round(float(v), 5)}
                                      for v, i in zip(val[n], idx[n])]} for n, f in enumerate(files)]
