"""Bad input: one clear line naming the culprit, exit code 2, no traceback, nothing written."""
from __future__ import annotations

from pathlib import Path

import yaml

from prockd.cli import main


def _write(tmp_path: Path, cfg: dict) -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _run_fails(capsys, args, pattern, out_dir: Path):
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("prockd: error:"), err
    assert "Traceback" not in err[0]
    import re

    assert re.search(pattern, err[0]), err[0]
    assert not out_dir.exists(), "nothing may be written to the run directory"


def test_unknown_key_names_key_and_file(tiny, tmp_path, capsys):
    cfg = tiny()
    cfg["train"]["lrr"] = 0.1
    p = _write(tmp_path, cfg)
    _run_fails(capsys, ["train", "--config", str(p)], rf"{p}.*'train\.lrr': unknown key", tmp_path / "run")


def test_unknown_method_param(tiny, tmp_path, capsys):
    cfg = tiny()
    cfg["method"]["params"]["num_protos"] = 3
    p = _write(tmp_path, cfg)
    _run_fails(capsys, ["train", "--config", str(p)], r"'method\.params\.num_protos': unknown key", tmp_path / "run")


def test_wrong_type_from_override(tiny, tmp_path, capsys):
    p = _write(tmp_path, tiny())
    _run_fails(capsys, ["train", "--config", str(p), "train.epochs=abc"], r"'train\.epochs'", tmp_path / "run")


def test_missing_config_file(tmp_path, capsys):
    _run_fails(capsys, ["train", "--config", str(tmp_path / "nope.yaml")], r"config file not found: .*nope\.yaml",
               tmp_path / "run")


def test_missing_dataset(tiny, tmp_path, capsys):
    p = _write(tmp_path, tiny())
    _run_fails(capsys, ["train", "--config", str(p), "data.name=cifar100", f"data.root={tmp_path / 'nodata'}"],
               r"CIFAR-100 not found under .*nodata", tmp_path / "run")
    _run_fails(capsys, ["train", "--config", str(p), "data.name=fashion_mnist", f"data.root={tmp_path / 'nodata'}"],
               r"Fashion-MNIST not found \(looked in .*nodata\)", tmp_path / "run")


def test_unknown_timm_model(tiny, tmp_path, capsys):
    p = _write(tmp_path, tiny())
    _run_fails(capsys, ["train", "--config", str(p), "student.name=vit_tinyy_patch16_224"],
               r"unknown timm model name 'vit_tinyy_patch16_224'; did you mean vit_tiny_patch16_224", tmp_path / "run")


def test_bad_tap_path(tiny, tmp_path, capsys):
    p = _write(tmp_path, tiny())
    _run_fails(capsys, ["train", "--config", str(p), "teacher.taps=[layer1, layer9]"],
               r"tap path 'layer9' does not exist in the teacher.*Near matches", tmp_path / "run")


def test_unreadable_checkpoint(tiny, tmp_path, capsys):
    bad = tmp_path / "teacher.pt"
    bad.write_bytes(b"this is not a checkpoint")
    p = _write(tmp_path, tiny())
    _run_fails(capsys, ["train", "--config", str(p), f"teacher.checkpoint={bad}"],
               r"teacher checkpoint .*teacher\.pt is unreadable", tmp_path / "run")


def test_unknown_method(tiny, tmp_path, capsys):
    p = _write(tmp_path, tiny())
    _run_fails(capsys, ["train", "--config", str(p), "method.name=prokd"], r"unknown method 'prokd'; did you mean prockd",
               tmp_path / "run")


def test_bad_override_syntax(tiny, tmp_path, capsys):
    p = _write(tmp_path, tiny())
    _run_fails(capsys, ["train", "--config", str(p), "train.lr"], r"not of the form key=value", tmp_path / "run")


def test_out_naming_a_file_is_one_line(tiny, tmp_path, capsys):
    p = _write(tmp_path, tiny())
    (tmp_path / "taken").write_text("a file of the user's")
    for out in (tmp_path / "taken", tmp_path / "taken" / "run"):  # the file itself, or a folder inside it
        _run_fails(capsys, ["train", "--config", str(p), "--out", str(out)],
                   rf"run directory {out}: {tmp_path / 'taken'} is a file, not a folder", tmp_path / "nothing")
    assert (tmp_path / "taken").read_text() == "a file of the user's"
