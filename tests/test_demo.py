"""The main job's spec and its shipped teacher (the demo end to end at smoke size, real rendered glyphs and a teacher
pretrained by prockd, runs from the installed wheel: tests/test_wheel.py)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

from prockd.bench.demo import demo_spec
from prockd.glyphs import find_fonts


def test_demo_spec_is_the_core_table():
    spec = demo_spec()
    assert list(spec["methods"]) == ["student_only", "finetune_distil@views", "prockd@robust_calibrated"]
    assert spec["seeds"] == 6 and spec["methods"]["prockd@robust_calibrated"]["preset"] == "robust_calibrated"
    assert spec["methods"]["finetune_distil@views"]["teacher"] == {"finetune": {}}
    assert list(spec["students"]) == ["wrn16-1"] and list(spec["settings"]) == ["standard"]
    assert spec["settings"]["standard"] == {"corruptions": []}  # the clean column only (docs/benchmarks.md)
    assert spec["data"]["glyphs"]["charset"] == "lower"


def test_the_vit_suites_demo_runs_its_vit_student_with_the_vit_recipe():
    """``prockd demo --suite glyphs_vit``: the ViT-d6 student initialised from the ViT teacher, AdamW 1e-3, every row's
    config valid (the student entry's recipe leaves the model section)."""
    from prockd.bench import compare
    from prockd.classification.config import build_config

    spec = demo_spec("glyphs_vit")
    assert list(spec["students"]) == ["vit-d6"]
    base = compare.suite_base(spec, "teacher.pt", Path(tempfile.mkdtemp()))
    for m, p in spec["methods"].items():
        cfg = build_config(compare.run_config(spec, base, "vit-d6", "standard", m, p, 0), "test")
        assert cfg.student.init_from_teacher and cfg.train.lr == 1e-3 and cfg.teacher.name == "vit_tiny_patch16_224"


@pytest.mark.parametrize("suite, floor", [("glyphs", 95), ("glyphs_vit", 89)])
def test_the_shipped_teacher_belongs_to_the_suites_teacher_recipe(suite, floor):
    from prockd.bench.common import SHIPPED_TEACHERS, teacher_key
    from prockd.bench.suites import get_suite
    from prockd.classification.config import build_config
    from prockd.classification.models import Teacher, create_model

    s = get_suite(suite)
    path = SHIPPED_TEACHERS / f"{teacher_key(s.teacher_run)}.pt"
    assert path.is_file(), f"the {suite} teacher's recipe changed: run scripts/ship_teacher.py --suite {suite}"
    shipped = torch.load(path, map_location="cpu", weights_only=False)
    assert shipped["summary"]["final"]["test/deployed"] > floor and len(shipped["fonts"]) >= 100
    assert {"model", "fonts", "summary", "provenance"} <= set(shipped)
    torch.save(shipped["model"], Path(tmp := tempfile.mkdtemp()) / "t.pt")
    cfg = build_config({"student": {"name": "builtin:wrn_16_1", "in_chans": 1, "input_size": 28},
                        "teacher": dict(s.teacher, checkpoint=f"{tmp}/t.pt"), "data": {"name": "digits"},
                        "method": {"name": "student_only"}}, "test")
    Teacher(create_model(cfg.teacher, None, "teacher"), cfg.teacher)  # the frozen teacher's config loads it


@pytest.mark.skipif(len(find_fonts()) < 40, reason="the Debian font packages are not installed (make data)")
def test_the_shipped_teacher_is_used_only_on_the_fonts_it_was_trained_on(tmp_path, monkeypatch):
    from prockd.bench import common
    from prockd.bench.suites import get_suite
    from prockd.classification.config import build_config
    from prockd.classification.models import Teacher, create_model

    s = get_suite("glyphs")
    shipped = torch.load(common.SHIPPED_TEACHERS / f"{common.teacher_key(s.teacher_run)}.pt", map_location="cpu",
                         weights_only=False)
    said = []
    if common.glyph_font_digests(s.teacher_run) == shipped["fonts"]:  # this machine has the Debian fonts it knows
        ckpt, summary = common.pretrained_teacher(s.teacher_run, tmp_path / "a", say=said.append)
        assert "the one shipped with prockd" in said[0] and summary == shipped["summary"]
        cfg = build_config({"student": {"name": "builtin:wrn_16_1", "in_chans": 1, "input_size": 28},
                            "teacher": dict(s.teacher, checkpoint=str(ckpt)), "data": {"name": "digits"},
                            "method": {"name": "student_only"}}, "test")
        teacher = Teacher(create_model(cfg.teacher, None, "teacher"), cfg.teacher)  # strict load into the recipe
        assert all(torch.equal(v, shipped["model"][k]) for k, v in teacher.model.state_dict().items())
        # --train-teacher replaces an installed shipped teacher by training one (stubbed: the real training is the
        # quick demo's); an installed teacher is otherwise kept
        trained = []

        def pretrain(cfg, run_dir, lg):
            trained.append(run_dir)
            run_dir.mkdir(parents=True)
            (run_dir / "final.json").write_text(json.dumps(shipped["summary"]))

        monkeypatch.setattr(common, "pretrain_teacher", pretrain)
        common.pretrained_teacher(s.teacher_run, tmp_path / "a", say=said.append)
        assert not trained
        common.pretrained_teacher(s.teacher_run, tmp_path / "a", say=said.append, shipped=False)
        assert trained == [ckpt.parent] and not (ckpt.parent / "shipped.json").exists()
        monkeypatch.undo()
    # other fonts: the shipped teacher is not used, nothing is written, the reason is said
    monkeypatch.setattr(common, "glyph_font_digests", lambda raw: shipped["fonts"][1:] + ["0" * 40])
    said.clear()
    assert not common.install_shipped_teacher(s.teacher_run, tmp_path / "b" / "run", say=said.append)
    assert "trained on other fonts" in said[0] and not (tmp_path / "b").exists()


def test_the_shipped_detection_teacher_is_installed_only_on_its_fonts(tmp_path, monkeypatch):
    """The detection suite's teacher ships with prockd (its first run skips training it): it belongs to the default
    setting's teacher recipe, is installed bitwise where the fonts are those it was trained on, else trained."""
    from prockd.bench import compare_detection as cd
    from prockd.bench.common import SHIPPED_TEACHERS
    from prockd.detection.config import build_det_config
    from prockd.detection.models import build_detector

    teacher_raw, _ = cd.embedded_configs()
    teacher_raw["data"]["canvas"]["cache_dir"] = str(tmp_path / "data")
    path = SHIPPED_TEACHERS / f"{cd.shipped_key(teacher_raw)}.pt"
    assert path.is_file(), "the detection teacher's recipe changed: run scripts/ship_teacher.py --suite detection"
    shipped = torch.load(path, map_location="cpu", weights_only=False)
    assert shipped["summary"]["selected"]["test/mAP50"] > 80 and len(shipped["classes"]) == 36
    cfg = build_det_config(teacher_raw, "test")
    build_detector(cfg.student, 36).load_state_dict(shipped["model"])  # strict: the recipe's detector
    said = []
    run_dir = tmp_path / "cache" / "det_teachers" / "x"
    if cd.found_font_digests() == shipped["fonts"]:
        assert cd.install_shipped_det_teacher(teacher_raw, run_dir, said.append)
        assert "shipped with prockd" in said[-1]
        saved = torch.load(run_dir / "teacher.pt", weights_only=False)
        assert all(torch.equal(v, shipped["model"][k]) for k, v in saved["model"].items())
        assert not cd.install_shipped_det_teacher(teacher_raw, run_dir, said.append)  # already there: kept
    monkeypatch.setattr(cd, "found_font_digests", lambda: shipped["fonts"][1:] + ["0" * 40])
    other = tmp_path / "other"
    assert not cd.install_shipped_det_teacher(teacher_raw, other, said.append)
    assert "other fonts" in said[-1] and not other.exists()
