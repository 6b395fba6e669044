"""``prockd bench compare``: a small comparison end to end, the table's marks, and continuing."""
from __future__ import annotations

import csv
import json

import yaml

from prockd.bench.compare import format_markdown, standings
from prockd.cli import main
from tests.conftest import TINY_CNN, TINY_VIT


def _spec(tmp_path) -> dict:
    small = dict(TINY_VIT, kwargs=dict(TINY_VIT["kwargs"], depth=1))
    return {
        "seeds": 2, "workers": 1,
        "methods": {"student_only": {}, "prockd": {"num_prototypes": 4}, "rkd": {}},
        "students": {"vit-d2": TINY_VIT, "vit-d1": small},
        "settings": {"standard": {"corruptions": [{"kind": "fog"}]}, "long_tailed": {"imbalance": 4}},
        "data": {"name": "digits", "classes": [5, 6, 7, 8, 9], "labels_per_class": 16},
        "base": {"teacher": TINY_CNN, "train": {"epochs": 2, "batch_size": 16, "lr": 2e-3, "warmup_epochs": 0,
                                                "progress": False},
                 "cache": {"dir": str(tmp_path / "cache"), "dtype": "float32"}},
    }


def test_compare_end_to_end_and_continues(tmp_path, capsys):
    cfg = tmp_path / "cmp.yaml"
    cfg.write_text(yaml.safe_dump(_spec(tmp_path), sort_keys=False))
    out = tmp_path / "cmp"
    assert main(["bench", "compare", "--config", str(cfg), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "= 24 runs, 0 already finished" in printed
    res = json.loads((out / "results.json").read_text())
    assert res["runs"] == 24
    rows = res["table"]["vit-d2"]
    assert set(rows) == {"student_only", "prockd", "rkd"}
    assert set(rows["prockd"]["columns"]) == {"standard", "shifted:fog", "long_tailed"}
    assert all(len(v) == 2 for v in rows["rkd"]["columns"].values())  # two seeds per cell
    assert res["table"]["vit-d1"]["rkd"]["params"] < rows["rkd"]["params"]  # two student sizes
    assert "vs_best_baseline" in res["standings"]["vit-d2"]["standard"]
    md = (out / "results.md").read_text()
    assert md.count("**") >= 2 * 3 * 2 and "<u>" in md and "| vit-d1 | prockd |" in md
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6 and "standard_mean" in table[0] and "shifted:fog_std" in table[0]
    # an interrupted comparison: one run lost its result, another was never started
    first = out / "runs" / "vit-d2" / "standard" / "rkd" / "seed1"
    (first / "final.json").unlink()
    stamp = (out / "runs" / "vit-d1" / "long_tailed" / "prockd" / "seed0" / "final.json").stat().st_mtime_ns
    assert main(["bench", "compare", "--config", str(cfg), "--out", str(out)]) == 0
    assert "= 24 runs, 23 already finished" in capsys.readouterr().out
    assert (first / "final.json").is_file()
    assert (out / "runs" / "vit-d1" / "long_tailed" / "prockd" / "seed0" / "final.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "results.json").read_text())["table"] == res["table"]  # exact resume


def test_markdown_marks_best_and_second_per_student_block():
    def row(*vals):
        return {"params": 1e6, "columns": {"standard": list(vals)}}

    table = {"s": {"a": row(80, 82), "b": row(90, 90), "c": row(85, 85)}, "t": {"a": row(1, 1), "b": row(2, 2)}}
    md = format_markdown(table)
    assert "**90.00 ± 0.00**" in md and "<u>85.00 ± 0.00</u>" in md and "| s | a | 1.000 M | 81.00 ± 1.41 |" in md
    assert "**2.00 ± 0.00**" in md and "<u>1.00 ± 0.00</u>" in md
    st = standings({"s": {"prockd": row(86), "student_only": row(70), "b": row(90)}})
    assert st["s"]["standard"]["best_baseline"] == "b" and st["s"]["standard"]["vs_best_baseline"] == -4
    assert st["s"]["standard"]["vs_student_only"] == 16
