"""The main job end to end at smoke size: real rendered glyphs, a teacher pretrained by prockd, the core table."""
from __future__ import annotations

import json

import pytest

from prockd.bench.demo import demo_spec, run_demo
from prockd.glyphs import find_fonts


def test_demo_spec_is_the_core_table():
    spec = demo_spec()
    assert list(spec["methods"]) == ["student_only", "rkd", "pkd_projector", "prockd", "prockd@transfer"]
    assert spec["seeds"] == 5 and spec["methods"]["prockd@transfer"]["preset"] == "transfer"
    assert list(spec["students"]) == ["wrn16-1"] and list(spec["settings"]) == ["standard"]
    assert spec["data"]["glyphs"]["charset"] == "lower"


@pytest.mark.skipif(len(find_fonts()) < 40, reason="the Debian font packages are not installed (make data)")
def test_quick_demo_writes_table_probes_and_plots(tmp_path, capsys):
    out = tmp_path / "demo"
    payload = run_demo(out, quick=True, cache_root=tmp_path / "cache", workers=1)
    res = json.loads((out / "results.json").read_text())
    assert res["settings"] == json.loads(json.dumps(payload["settings"]))
    std = res["settings"]["standard"]
    assert std["probe"]["teacher"] > std["probe"]["pixels"] - 30  # both probes ran on the real glyphs
    cells = std["wrn16-1"]
    assert set(cells) == {"student_only", "rkd", "pkd_projector", "prockd", "prockd@transfer"}
    assert all(0 <= c["mean"] <= 100 and c["seeds"] == [0, 1] for c in cells.values())
    assert "ci95" in cells["prockd"]["vs_student_only"] and "standard:fog3" in res["settings"]
    printed = capsys.readouterr().out
    assert "pretraining the benchmark teacher" in printed and "epoch 1/1" in printed  # teacher progress shown
    assert "| wrn16-1 | prockd |" in printed and "| wrn16-1 | prockd@transfer |" in printed and "curves.png" in printed and "prototypes.png" in printed
    again = run_demo(out, quick=True, cache_root=tmp_path / "cache", workers=1)  # finished runs are kept
    assert again["settings"] == payload["settings"]
