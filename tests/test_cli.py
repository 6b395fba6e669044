"""CLI happy path: train, export, eval, pretrain-teacher, on digits."""
from __future__ import annotations

import json

import yaml

from prockd.cli import main


def test_train_export_eval(tiny, tmp_path, capsys):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump(tiny()))
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run), "train.epochs=2"]) == 0
    assert (run / "student.pt").is_file()
    assert main(["export", "--run", str(run), "--checkpoint", "best", "--out", str(tmp_path / "best.pt")]) == 0
    capsys.readouterr()
    assert main(["eval", "--run", str(run)]) == 0
    res = json.loads(capsys.readouterr().out)
    final = json.loads((run / "final.json").read_text())["final"]
    assert abs(res["top1"]["test"] - final["test/deployed"]) < 1e-6  # the file predicts like the run did
    assert main(["eval", "--model", str(tmp_path / "best.pt"), "--config", str(cfg)]) == 0


def test_pretrain_teacher_then_distill_from_it(tiny, tmp_path, capsys):
    raw = tiny("student_only")
    raw.pop("teacher")
    raw["student"] = {**raw["student"], "name": "resnet18",
                      "kwargs": {"channels": [8, 16, 16, 16], "stem_width": 8}, "input_size": 16}
    raw["data"]["classes"] = [0, 1, 2, 3]
    cfg = tmp_path / "teacher.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["pretrain-teacher", "--config", str(cfg), "--out", str(tmp_path / "t"), "train.epochs=1"]) == 0
    ckpt = tmp_path / "t" / "teacher.pt"
    assert ckpt.is_file()
    dist = tiny()
    dist["teacher"]["checkpoint"] = str(ckpt)
    dist["teacher_eval"] = {"data": {"name": "digits", "classes": [0, 1, 2, 3]}}
    cfg2 = tmp_path / "d.yaml"
    cfg2.write_text(yaml.safe_dump(dist))
    assert main(["train", "--config", str(cfg2), "--out", str(tmp_path / "d"), "train.epochs=1"]) == 0
    summary = json.loads((tmp_path / "d" / "final.json").read_text())
    teacher_acc = json.loads((tmp_path / "t" / "final.json").read_text())["final"]["test/deployed"]
    assert abs(summary["teacher"]["teacher/test"] - teacher_acc) < 1e-6  # the weights really loaded
