"""The main job end to end at smoke size (real Fashion-MNIST, teacher pretrained by prockd)."""
from __future__ import annotations

import json

import pytest

from prockd.data import find_fashion_mnist
from prockd.demo import format_table, run_demo


@pytest.mark.skipif(find_fashion_mnist(None) is None, reason="Fashion-MNIST is not installed (make data)")
def test_quick_demo_writes_results_table_and_plots(tmp_path, capsys):
    out = tmp_path / "demo"
    payload = run_demo(out, quick=True, cache_root=tmp_path / "cache")
    res = json.loads((out / "results.json").read_text())
    assert res == json.loads(json.dumps(payload))
    row = res["settings"]["limited"]
    assert set(row) == {"student_only", "prockd"}
    for method in row.values():
        assert 20.0 < method["test/deployed"]["mean"] <= 100.0
        assert "test_fog3/deployed" in method and method["params"] > 0
    assert "test/aug" in row["prockd"]
    assert row["prockd"]["teacher"]["teacher/test"] > 40.0  # the teacher was checked on its own task
    for f in ("curves.png", "prototypes_limited.png", "results.md"):
        assert (out / f).stat().st_size > 1000 or f == "results.md"
    printed = capsys.readouterr().out
    assert "| limited | prockd |" in printed and "ProC-KD − student" in printed
    # a second call finds every run finished and only re-summarises
    again = run_demo(out, quick=True, cache_root=tmp_path / "cache")
    assert again["settings"] == payload["settings"]


def test_format_table_marks_difference():
    row = lambda v: {"params": 1000, "seeds": [0, 1], "test/deployed": {"mean": v, "std": 0.0, "values": [v, v]}}  # noqa: E731
    md = format_table({"limited": {"student_only": row(80.0), "prockd": row(82.5)}})
    assert "+2.50 ± 0.00" in md
