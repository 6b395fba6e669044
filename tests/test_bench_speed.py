"""``prockd bench speed`` prints every variant and ratio and writes them to JSON (no timing asserted)."""
from __future__ import annotations

import json

from prockd.bench.speed import run_speed
from tests.conftest import TINY_CNN, TINY_VIT


def test_bench_speed_reports_every_variant_and_ratio(tmp_path, capsys):
    teacher = dict(TINY_CNN, kwargs=dict(TINY_CNN["kwargs"], num_classes=5))
    out = tmp_path / "speed.json"
    res = run_speed("embedded", "cpu", steps=1, rounds=1, warmup=1, batch_size=8, out=out,
                    overrides={"image": [1, 8, 8], "classes": 5, "teacher": teacher, "student": TINY_VIT,
                               "prockd": {"num_prototypes": 4}})
    assert json.loads(out.read_text()) == res
    variants = {"student_only", "teacher_forward", "prockd_live", "prockd_cached", "kd_prockd", "fitnets_prockd",
                "kd_torchdistill", "fitnets_torchdistill", "teacher_finetune"}
    assert set(res["step_seconds"]) == variants and all(v > 0 for v in res["step_seconds"].values())
    assert set(res["ratios"]) == {"pl_fa_overhead", "cached_vs_student_only", "kd_vs_torchdistill",
                                  "fitnets_vs_torchdistill", "pl_peak_memory_vs_need", "finetune_step_vs_prockd_step"}
    assert "finetune_step_vs_prockd_step" not in res["met"]  # reported, no target
    assert res["pl_memory"]["need"]["saved_for_backward"] > 0 and res["pl_memory"]["peak_bytes"] > 0
    printed = capsys.readouterr().out
    assert "cached_vs_student_only" in printed and "PL peak memory" in printed
    assert "finetune_step_vs_prockd_step" in printed
