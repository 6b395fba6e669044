"""The own-data walk-through (docs/own-data.md), as a user runs it: a Fashion-MNIST ImageFolder of their own
(labelled train / val / test and an unlabelled folder), ``prockd init`` for the config, the ImageNet
EfficientNet-Lite0 teacher (shipped offline) distilled into a timm ResNet-10-T named by ``timm/NAME`` with
``preset: robust_calibrated``; then eval, ONNX export and predict, through the Python API and through the CLI: the same
numbers."""
from __future__ import annotations

import json

import pytest

import prockd
from prockd.classification.folders import write_fashion_mnist_folder
from prockd.classification.data import find_fashion_mnist
from prockd.cli import main

pytestmark = pytest.mark.skipif(find_fashion_mnist(None) is None, reason="needs Fashion-MNIST (make setup)")

QUICK = ["teacher.input_size=64", "train.epochs=2", "train.aug_views=2", "train.batch_size=32", "train.num_threads=1",
         "train.progress=false", "data.num_workers=1"]


def test_own_folder_api_and_cli_give_the_same_numbers(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def _cli(*args):
        """``prockd ARGS`` in this process (the console script's own entry point; the wheel test starts the
        installed script itself): its stdout."""
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        assert code == 0, err[-2000:]
        return out

    data = write_fashion_mnist_folder(tmp_path / "my_data", train_per_class=24, val_per_class=8, test_per_class=20,
                                      unlabeled=40, log=lambda *_: None)
    # the config from the folder: classes counted, the images' own 28 px grey, val/, test/ and unlabeled/ found
    text = prockd.init_config(data, "builtin:efficientnet_lite0", "timm/resnet10t", tmp_path / "my_config.yaml")
    assert "in_chans: 1" in text and "input_size: 28" in text and "val_dir:" in text and "unlabeled:" in text
    assert "# 4 classes, 96 training images" in text
    with pytest.raises(prockd.ProckdError, match="exists"):
        prockd.init_config(data, "builtin:efficientnet_lite0", "timm/resnet10t", tmp_path / "my_config.yaml")
    over = QUICK + [f"cache.dir={tmp_path / 'cache'}"]

    api_run = prockd.train(tmp_path / "my_config.yaml", out=tmp_path / "api_run", overrides=over)
    _cli("train", "--config", tmp_path / "my_config.yaml", "--out", tmp_path / "cli_run", *over)
    cli_run = tmp_path / "cli_run"
    fa, fc = (json.loads((r / "final.json").read_text()) for r in (api_run, cli_run))
    assert fa["weights"]["teacher"].startswith("ImageNet weights shipped")
    assert fa["unlabeled"] == {"count": 40, "streamed": True, "skipped": 0}
    for key in ("val/deployed", "loss/kl", "loss/ce"):
        assert fa["final"][key] == pytest.approx(fc["final"][key], rel=1e-6), key
    assert fa["selected"] == pytest.approx(fc["selected"], rel=1e-6)

    ev_api = prockd.evaluate(api_run)
    ev_cli = json.loads(_cli("eval", "--run", cli_run))
    assert ev_api["top1"] == pytest.approx(ev_cli["top1"], rel=1e-6)
    assert ev_api["top1"]["test"] == pytest.approx(fa["selected"]["test/deployed"], abs=1e-6)

    rep = prockd.export(api_run, onnx=tmp_path / "api.onnx", say=lambda *_: None)
    assert rep["onnx"]["ok"] and rep["onnx"]["max_abs_diff"] <= 1e-3
    _cli("export", "--run", cli_run, "--onnx", tmp_path / "cli.onnx")
    assert sorted(p.name for p in tmp_path.iterdir() if ".onnx" in p.name) == ["api.onnx", "cli.onnx"]  # no sidecar

    images = sorted(str(p) for p in (data / "test").rglob("*.png"))[::10]
    top_pt = prockd.load_student(api_run / "student.pt").predict(images, topk=2)
    top_onnx = prockd.load_student(tmp_path / "api.onnx").predict(images, topk=2)
    top_cli = json.loads(_cli("predict", "--model", tmp_path / "cli.onnx", "--topk", "2", "--json", *images))
    classes = lambda top: [t[0]["class"] for t in top]  # noqa: E731
    assert classes(top_pt) == classes(top_onnx)
    cli_classes = [r["top"][0]["class"] for r in top_cli]
    assert cli_classes == classes(top_onnx)
    for a, b in zip(top_pt, top_onnx):
        assert a[0]["prob"] == pytest.approx(b[0]["prob"], abs=1e-3)
