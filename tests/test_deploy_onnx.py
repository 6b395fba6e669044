"""Deployment: ONNX export with parity checked by onnxruntime, predict from the deployed file alone, the deploy
benchmark; on tiny runs trained here (a ViT student with ProC-KD's FA, a CNN student)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_CNN, tiny_config
from PIL import Image

from prockd.classification.config import load_config
from prockd.classification.data import build_task
from prockd.classification.deploy import load_deployed
from prockd.classification.export import export_onnx, ort_session
from prockd.cli import main


def _train(root, name, method, **over):
    raw = tiny_config(root, method, out=str(root / name), **over)
    cfg = root / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(cfg), "--out", str(root / name), "train.epochs=2"]) == 0
    return root / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A ProC-KD run with a 2-block ViT student, a student-only ViT run and a ProC-KD run with a CNN student."""
    root = tmp_path_factory.mktemp("deploy")
    cnn_student = {**TINY_CNN, "taps": None, "fusion_size": None, "kwargs": {"channels": [8, 16, 16, 16], "stem_width": 8}}
    cnn_student.pop("taps"), cnn_student.pop("fusion_size")
    with_val = {"name": "digits", "classes": [5, 6, 7, 8, 9], "labels_per_class": 20, "val_fraction": 0.25}
    return {"prockd": _train(root, "prockd", "prockd", data=with_val), "student_only": _train(root, "student_only", "student_only"),
            "cnn": _train(root, "cnn", "prockd", student=cnn_student), "root": root}


def _test_images(run, n=64):
    task = build_task(load_config(run / "config.yaml").data)
    ds = task.tests["test"]
    return ds.images[:n].float() / 255, ds.labels[:n], task


@pytest.mark.parametrize("which", ["prockd", "cnn"])
def test_export_onnx_parity_dynamic_batch_and_metadata(runs, which, tmp_path, capsys):
    run = runs[which]
    onnx_file = tmp_path / "s.onnx"
    assert main(["export", "--run", str(run), "--onnx", str(onnx_file), "--out", str(tmp_path / "s.pt")]) == 0
    report = json.loads(capsys.readouterr().out)["onnx"]
    assert report["ok"] and report["max_abs_diff"] <= 1e-3 and report["top1_agreement"] == 1.0
    assert report["images"] > 100  # real test images, not one example
    # independent check: PyTorch deployed file vs onnxruntime at batch sizes other than the traced one
    dep = load_deployed(run / "student.pt")
    sess = ort_session(onnx_file)
    x, _, task = _test_images(run)
    for b in (1, 3, 64):
        with torch.no_grad():
            ref = dep(x[:b]).numpy()
        out = sess.run(None, {"images": x[:b].numpy()})[0]
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref, atol=1e-3, rtol=0)
        assert (out.argmax(-1) == ref.argmax(-1)).all()
    meta = sess.get_modelmeta().custom_metadata_map
    assert json.loads(meta["prockd.class_names"]) == task.class_names
    assert json.loads(meta["prockd.input_shape"]) == list(task.train.images.shape[1:])
    if which == "prockd":
        assert dep.fa is not None and dep.output == "aug"  # FA and prototypes are in the exported graph
        assert any("MatMul" in n.op_type or "Gemm" in n.op_type for n in __import__("onnx").load(onnx_file).graph.node)


class _ExportDiffers(torch.nn.Module):
    """A network whose exported graph computes something else than its eager forward (an exporter bug)."""

    def __init__(self, dep):
        super().__init__()
        self.dep = dep
        self.class_names, self.input_shape, self.output = dep.class_names, dep.input_shape, dep.output

    def forward(self, x):
        out = self.dep(x)
        return out + 1.0 if torch.onnx.is_in_onnx_export() else out


def test_parity_failure_writes_nothing(runs, tmp_path):
    from prockd.errors import ProckdError

    dep = load_deployed(runs["prockd"] / "student.pt")
    x, _, _ = _test_images(runs["prockd"])
    target = tmp_path / "bad.onnx"
    with pytest.raises(ProckdError, match="parity check failed"):
        export_onnx(_ExportDiffers(dep), target, x)
    assert list(tmp_path.iterdir()) == []


def test_predict_from_pt_and_onnx_alone(runs, tmp_path, capsys):
    run = runs["prockd"]
    onnx_file = tmp_path / "s.onnx"
    assert main(["export", "--run", str(run), "--onnx", str(onnx_file)]) == 0
    x, y, task = _test_images(run, 6)
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for i in range(len(x)):
        Image.fromarray((x[i, 0].numpy() * 255).round().astype(np.uint8)).save(img_dir / f"{i}.png")
    capsys.readouterr()
    (tmp_path / "moved").mkdir()
    moved = tmp_path / "moved" / "student.pt"  # the file alone, away from its run directory
    moved.write_bytes((run / "student.pt").read_bytes())
    assert main(["predict", "--model", str(moved), str(img_dir), "--topk", "3", "--json"]) == 0
    from_pt = json.loads(capsys.readouterr().out)
    assert main(["predict", "--model", str(onnx_file), str(img_dir), "--topk", "3", "--json"]) == 0
    from_onnx = json.loads(capsys.readouterr().out)
    assert len(from_pt) == len(x)
    dep = load_deployed(moved)
    with torch.no_grad():
        expect = dep(x).softmax(-1)
    for i, (a, b) in enumerate(zip(from_pt, from_onnx)):
        assert [t["class"] for t in a["top"]] == [t["class"] for t in b["top"]]
        probs = [t["prob"] for t in a["top"]]
        assert probs == sorted(probs, reverse=True) and len(probs) == 3
        k = int(expect[i].argmax())
        assert a["top"][0]["class"] == task.class_names[k] and abs(a["top"][0]["prob"] - float(expect[i, k])) < 1e-4
    assert main(["predict", "--model", str(onnx_file), str(img_dir / "0.png")]) == 0
    assert capsys.readouterr().out.startswith(str(img_dir / "0.png") + ": ")


def test_predict_and_export_bad_input(runs, tmp_path, capsys):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    assert main(["predict", "--model", str(runs["prockd"] / "student.pt"), str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err
    assert main(["predict", "--model", str(tmp_path / "missing.onnx"), str(bad)]) == 2
    assert "missing.onnx" in capsys.readouterr().err
    assert main(["predict", "--model", str(runs["prockd"] / "student.pt"), str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["export", "--run", str(runs["prockd"])]) == 2
    assert "--onnx" in capsys.readouterr().err
    assert main(["export", "--run", str(tmp_path), "--onnx", str(tmp_path / "x.onnx")]) == 2
    assert "config.yaml" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_export_from_checkpoint_matches_selected_student(runs, tmp_path, capsys):
    run = runs["prockd"]
    assert main(["export", "--run", str(run), "--checkpoint", "best", "--out", str(tmp_path / "b.pt")]) == 0
    a, b = load_deployed(run / "student.pt"), load_deployed(tmp_path / "b.pt")
    x, _, _ = _test_images(run, 16)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))  # student.pt is the validation-selected (best) checkpoint
    assert b.class_names == a.class_names and b.input_shape == a.input_shape


def test_bench_deploy_on_a_run(runs, tmp_path):
    out = tmp_path / "deploy.json"
    assert main(["bench", "deploy", "--run", str(runs["prockd"]), "--threads", "1", "--batch", "4", "--repeats", "1",
                 "--rounds", "1", "--warmup", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    m = res["models"]
    assert set(m) == {"teacher", "student (no FA)", "deployed student"}
    dep = load_deployed(runs["prockd"] / "student.pt")
    fa_params = sum(p.numel() for p in dep.fa.parameters()) + dep.prototypes.numel()
    assert m["deployed student"]["params"] - m["student (no FA)"]["params"] == fa_params
    assert m["deployed student"]["flops"] > m["student (no FA)"]["flops"] > 0
    for name in m:
        for engine in ("pytorch", "onnxruntime"):
            assert m[name][engine]["latency_ms_b1"] > 0 and m[name][engine]["throughput_b4"] > 0
        assert m[name]["onnx_parity"]["max_abs_diff"] < 1e-3
    r = res["teacher_over_deployed"]
    assert r["params"] == pytest.approx(m["teacher"]["params"] / m["deployed student"]["params"])
    assert r["flops"] == pytest.approx(m["teacher"]["flops"] / m["deployed student"]["flops"])


def test_flops_of_a_linear_layer_are_counted_exactly():
    from prockd.bench.deploy import flops_per_image

    lin = torch.nn.Sequential(torch.nn.Flatten(1), torch.nn.Linear(12, 5))
    assert flops_per_image(lin, torch.rand(3, 2, 2)) == 2 * 12 * 5


def test_export_leaves_one_self_contained_file(tmp_path):
    """A 11 M-parameter student: the dynamo exporter writes its weights to a ``.data`` file beside the temporary
    model; the exported ``.onnx`` holds them itself and nothing else is left in the folder."""
    wide = {**TINY_CNN, "kwargs": {"channels": [64, 128, 256, 512], "stem_width": 32}}
    wide.pop("taps"), wide.pop("fusion_size")
    run = _train(tmp_path, "wide", "student_only", student=wide)
    out = tmp_path / "exported"
    out.mkdir()
    assert main(["export", "--run", str(run), "--onnx", str(out / "s.onnx")]) == 0
    assert [f.name for f in out.iterdir()] == ["s.onnx"] and (out / "s.onnx").stat().st_size > 40e6
    moved = tmp_path / "elsewhere.onnx"
    (out / "s.onnx").rename(moved)  # no sidecar needed: it loads and predicts on its own
    x, _, _ = _test_images(run, 4)
    assert ort_session(moved).run(None, {"images": x.numpy()})[0].shape == (4, 5)
