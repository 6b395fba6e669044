"""ONNX export of a deployed student (``.onnx``: raw images in [0, 1] -> logits as one graph with a dynamic batch
axis, the class names and input shape in its metadata under ``prockd.*`` keys), checked against onnxruntime on
real images (parity), and the onnxruntime session both the check and the predictor use."""
from __future__ import annotations

import glob
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from prockd.classification.deploy import DeployedStudent, default_input_shape
from prockd.errors import ProckdError

ONNX_FORMAT = "prockd-deployed-onnx-v1"


def onnx_export_raw(model: nn.Module, example: torch.Tensor, path: str, opset: int) -> str:
    """``torch.onnx.export`` with a dynamic batch axis: the dynamo exporter, else the TorchScript one.
    Returns the exporter used."""
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
        exporter = onnx_export_raw(dep, example, tmp, opset)
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
    finally:  # the temporary file and whatever the exporter wrote beside it (its external weights, ``<tmp>.data``)
        for f in glob.glob(glob.escape(tmp) + "*"):
            os.unlink(f)
