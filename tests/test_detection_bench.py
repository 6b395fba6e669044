"""``prockd bench speed --task detection`` on tiny detectors: every variant timed in the same rounds, the
overhead ratios recomputed from the per-round times, the JSON written; an unknown scenario exits 2."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from prockd.bench.compare import load_spec
from prockd.bench.compare_detection import (
    ALL_METHODS,
    DEMO_METHODS,
    TUNE_FACTORS,
    config_root,
)
from prockd.bench.speed_detection import METHODS, run_det_speed
from prockd.bench.suites import get_suite, suite_task
from prockd.cli import main
from prockd.errors import ProckdError

TINY = dict(backbone="mobilenet_v2", backbone_weights="none", min_size=[64], max_size=64, fpn_channels=16,
            representation_size=32, anchor_sizes=[8, 16, 32, 64, 128], rpn_batch_per_image=32,
            rpn_pre_nms_train=100, rpn_post_nms_train=50, rpn_pre_nms_test=50, rpn_post_nms_test=20,
            box_batch_per_image=16, norm="train", trainable_layers=5)


def test_det_speed_variants_and_ratios(tmp_path):
    out = tmp_path / "speed.json"
    res = run_det_speed("embedded", device="cpu", steps=1, rounds=3, warmup=0, batch_size=2, threads=1, out=out,
                        overrides={"image": [64, 64], "student": TINY,
                                   "teacher": dict(TINY, fpn_channels=24, num_classes=5)})
    assert json.loads(out.read_text())["ratios"] == res["ratios"]
    per = res["per_round_seconds"]
    assert set(per) == set(METHODS) | {"teacher_forward", "student_only_torchvision_roi", "student_only_unfolded_bn"}
    assert all(len(v) == 3 for v in per.values())
    # the sparse pooler's speed-up: torchvision's kernels' step time over the default's, per round
    direct = statistics.median(per["student_only_torchvision_roi"][i] / per["student_only"][i] for i in range(3))
    assert abs(res["ratios"]["roi_align_speedup"] - direct) < 1e-12 and "roi_align_speedup" not in res["met"]
    direct = statistics.median(per["student_only_unfolded_bn"][i] / per["student_only"][i] for i in range(3))
    assert abs(res["ratios"]["bn_fold_speedup"] - direct) < 1e-12 and "bn_fold_speedup" not in res["met"]
    for name in METHODS:
        if name == "student_only":
            continue
        direct = statistics.median((per[name][i] - per["teacher_forward"][i] - per["student_only"][i])
                                   / (per["teacher_forward"][i] + per["student_only"][i]) for i in range(3))
        assert abs(res["ratios"][f"{name}_overhead"] - direct) < 1e-12
        assert res["met"][f"{name}_overhead"] == (direct <= 0.15)
    assert res["params"]["prockd_trainable"] > res["params"]["student_only_trainable"]  # PL / FA / fusion
    assert res["params"]["teacher"] > 0


def test_det_speed_unknown_scenario_exits_2(capsys):
    assert main(["bench", "speed", "--task", "detection", "--scenario", "nope"]) == 2
    assert "unknown detection scenario" in capsys.readouterr().err


def test_weight_scaling_choice_and_run_folders():
    from prockd.bench.common import scaled
    from prockd.bench.compare_detection import _run_dir, choose_factors
    from prockd.detection.methods import DET_METHODS

    assert scaled(DET_METHODS, "cwd", {}, 0.1) == {"weight": 1.0}  # the public weight 10, x0.1
    fgd = scaled(DET_METHODS, "fgd", {"temperature": 0.5}, 0.01)
    assert fgd["temperature"] == 0.5 and abs(fgd["alpha"] - 5e-7) < 1e-18 and abs(fgd["lambda_global"] - 5e-9) < 1e-20
    assert set(scaled(DET_METHODS, "prockd", {}, 0.1)) == {"lambda_mimic", "lambda_emb"}
    assert choose_factors({"a": {0.01: 5.0, 0.1: 7.0, 1.0: 7.0}, "b": {0.01: 9.0, 0.1: 1.0, 1.0: 2.0}}) == \
        {"a": 1.0, "b": 0.01}  # a tie keeps the larger factor
    raw = {"seed": 0, "out": "x", "method": {"name": "cwd", "params": {"weight": 1.0}}, "train": {"epochs": 12}}
    a = _run_dir(Path("o"), raw, "cwd", 0)
    assert _run_dir(Path("o"), dict(raw, seed=5, out="y"), "cwd", 0) == a  # seed and out are not the recipe
    assert _run_dir(Path("o"), dict(raw, method={"name": "cwd", "params": {"weight": 10.0}}), "cwd", 0) != a
    assert _run_dir(Path("o"), dict(raw, train={"epochs": 10}), "cwd", 0) != a


def _write_finals(root: Path, values: dict[str, list[float]], selected) -> dict[str, list[Path]]:
    """``root/<method>/seed<k>/final.json`` whose selected metrics are ``selected(method, k, value)``."""
    dirs: dict[str, list[Path]] = {}
    for m, vs in values.items():
        for s, v in enumerate(vs):
            d = root / m / f"seed{s}"
            d.mkdir(parents=True)
            sel = selected(m, s, v)
            (d / "final.json").write_text(json.dumps({"final": sel, "selected": sel}))
            dirs.setdefault(m, []).append(d)
    return dirs


def test_collect_and_table_on_written_results(tmp_path):
    """The table's statistics from final.json files with known values: mean, sample std and the paired
    Student-t interval computed here directly."""
    from scipy import stats

    from prockd.bench.compare_detection import collect, format_table

    vals = {"student_only": [80.0, 82.0, 84.0], "cwd": [81.0, 84.0, 85.5]}
    t = collect(_write_finals(tmp_path, vals, lambda m, s, v: {"epoch": 11, "val/mAP50": 90.0, "test/mAP50": v,
                                                               "test/AP50/A": v + 1, "test/AP50/C": v - 1}))
    st = t["stats"]["cwd"]["test/mAP50"]
    diffs = [a - b for a, b in zip(vals["cwd"], vals["student_only"])]
    half = stats.t.ppf(0.975, 2) * statistics.stdev(diffs) / 3 ** 0.5
    assert st["mean"] == round(statistics.fmean(vals["cwd"]), 2) and st["std"] == round(statistics.stdev(vals["cwd"]), 2)
    assert abs(st["vs_student"]["mean"] - statistics.fmean(diffs)) < 1e-3 and abs(st["vs_student"]["ci95"] - half) < 1e-3
    assert st["vs_student"]["verdict"] == ("better" if statistics.fmean(diffs) - half > 0 else "no difference")
    md = format_table(dict(t, params={"cwd": {"weight": 1.0}, "prockd@none": {"teacher_head": "none", "lambda_emb": 0.01}}))
    assert "| cwd | 84.5 | 82.5 | 83.5 ± 2.3 |" in md and "Weights: cwd weight=1" in md
    assert "prockd@none teacher_head=none, lambda_emb=0.01" in md
    assert "3 paired seeds: a check that the rows run, not evidence" in md  # fewer than 5: no claim rests on it
    five = collect(_write_finals(tmp_path / "five", {m: v + [83.0, 85.0] for m, v in vals.items()},
                                 lambda m, s, v: {"epoch": 11, "val/mAP50": 90.0, "test/mAP50": v}))
    assert "not evidence" not in format_table(five)


def test_prockd_rows_are_paired_with_the_baseline_best_on_validation(tmp_path):
    """ProC-KD rows get a second interval against the best baseline, the one with the highest mean *validation*
    mAP50 (mgd here, although fgd is higher on the test set): the interval is recomputed directly."""
    from scipy import stats

    from prockd.bench.compare_detection import collect, format_table

    test = {"student_only": [60.0, 62.0, 61.0], "mgd": [63.0, 64.0, 62.5], "fgd": [70.0, 71.0, 72.0],
            "prockd@none": [66.0, 65.0, 68.0]}
    val = {"student_only": 80.0, "mgd": 83.0, "fgd": 79.0, "prockd@none": 81.0}
    t = collect(_write_finals(tmp_path, test, lambda m, s, v: {"epoch": 19, "val/mAP50": val[m] + s,
                                                               "test/mAP50": v, "test/AP50/a": v}))
    assert t["best_baseline"] == {"name": "mgd", "val_mAP50": 84.0}
    vb = t["stats"]["prockd@none"]["test/mAP50"]["vs_best"]
    diffs = [a - b for a, b in zip(test["prockd@none"], test["mgd"])]
    half = stats.t.ppf(0.975, 2) * statistics.stdev(diffs) / 3 ** 0.5
    assert abs(vb["mean"] - statistics.fmean(diffs)) < 1e-3 and abs(vb["ci95"] - half) < 1e-3
    assert "vs_best" not in t["stats"]["fgd"]["test/mAP50"]  # baselines are not compared with each other
    md = format_table(t)
    assert "Best baseline (highest mean validation mAP50 of its selected checkpoints): mgd (84.0)" in md
    assert "Δ vs mgd (95 % CI)" in md
    assert "| prockd@none | 66.3 | 66.3 ± 1.5 | " in md and f"{statistics.fmean(diffs):+.1f} ± {half:.1f}" in md


def test_detection_is_a_suite_and_picks_its_task(capsys):
    s = get_suite("detection")
    assert s.task == "detection" and tuple(s.methods) == ALL_METHODS and tuple(s.demo_methods) == DEMO_METHODS
    assert tuple(s.tune_factors) == TUNE_FACTORS and (config_root() / "student.yaml").is_file()
    assert suite_task("detection", None) == "detection" and suite_task(None, "detection") == "detection"
    assert suite_task("glyphs", None) == suite_task(None, None) == "classification"
    with pytest.raises(ProckdError, match="detection benchmark, not classification"):
        suite_task("detection", "classification")
    with pytest.raises(ProckdError, match="prockd bench compare --suite detection"):
        load_spec(suite="detection")
    # the CLI routes --suite detection to the detection comparison: its method check answers
    assert main(["bench", "compare", "--suite", "detection", "--methods", "kd", "--out", "unused"]) == 2
    assert "not in the detection comparison" in capsys.readouterr().err


def test_detection_settings_merge_into_the_packaged_configs_and_variants_queue_their_method(tmp_path, capsys):
    from prockd.bench.compare_detection import (
        _queue_runs,
        base_params,
        embedded_configs,
        method_of,
        setting_of,
    )

    teacher, student = embedded_configs("digits_to_caps")
    assert teacher["data"]["canvas"]["charset"] == "0123456789" and student["data"]["canvas"]["charset"] == "ACEHKMRX"
    t2, s2 = embedded_configs("upper_to_lower26_2fonts")
    assert t2["data"]["canvas"]["charset"].startswith("0123456789ABC") and t2["data"]["canvas"]["train_images"] == 800
    assert s2["data"]["canvas"]["charset"] == "lower" and s2["data"]["canvas"]["train_fonts"] == 2
    assert s2["train"] == student["train"] and s2["student"] == student["student"]  # only the data differ
    with pytest.raises(ProckdError, match="unknown detection setting 'nope'.*digits_to_caps"):
        setting_of("nope")
    assert method_of("prockd@separate") == "prockd" and base_params("prockd@separate") == {"preset": "paper",
                                                                                          "teacher_head": "separate"}
    assert base_params("cwd") == {}
    todo: list = []
    dirs = _queue_runs(tmp_path, student, {"backbone": "x"}, "prockd@none", {"teacher_head": "none"}, [0, 1],
                       tmp_path / "log", todo)
    assert [r[0]["method"] for r in todo] == [{"name": "prockd", "params": {"teacher_head": "none"}}] * 2
    assert all(d.parts[-3] == "prockd@none" for d in dirs) and todo[0][0]["teacher"] == {"backbone": "x"}
    # several settings are for --probe-only; a comparison runs one
    assert main(["bench", "compare", "--suite", "detection", "--settings", "digits_to_caps", "upper_to_lower10",
                 "--out", str(tmp_path / "c")]) == 2
    assert "one detection setting per comparison" in capsys.readouterr().err


def test_student_only_convergence_from_metrics(tmp_path):
    from prockd.bench.compare_detection import convergence

    for seed, curve in enumerate([[50, 80, 90, 91, 92], [40, 70, 88, 90, 88]]):
        d = tmp_path / f"seed{seed}"
        d.mkdir()
        (d / "metrics.jsonl").write_text("".join(json.dumps({"epoch": 2 * i + 1, "val/mAP50": v}) + "\n"
                                                 for i, v in enumerate(curve)))
    # epochs 1, 3, 5, 7, 9: the last fifth starts at the first epoch >= 0.8 * 9 = 7.2, i.e. epoch 9 itself
    assert convergence([tmp_path / "seed0", tmp_path / "seed1"]) == {
        "val_gain_last_fifth": 0.0, "val_fit_last_fifth": 0.0, "per_seed_fit": [0.0, 0.0], "flat": True, "runs": 2}
    (tmp_path / "seed0" / "metrics.jsonl").write_text("".join(
        json.dumps({"epoch": e, "val/mAP50": v}) + "\n" for e, v in [(0, 10), (4, 60), (8, 70), (9, 75)]))
    assert convergence([tmp_path / "seed0"]) == {
        "val_gain_last_fifth": 5.0, "val_fit_last_fifth": 5.0, "per_seed_fit": [5.0], "flat": False, "runs": 1}


def test_convergence_fit_is_the_least_squares_change_over_the_last_fifth(tmp_path):
    """A noisy last point does not decide flatness: the fitted line over the last fifth's evaluations does
    (checked against numpy's polyfit)."""
    import numpy as np

    from prockd.bench.compare_detection import convergence

    curve = [(e, 50 + e) for e in range(0, 40, 2)] + [(41, 80.0), (43, 82.0), (45, 79.0), (47, 81.0), (49, 76.0)]
    (tmp_path / "seed0").mkdir()
    (tmp_path / "seed0" / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "val/mAP50": v}) + "\n"
                                                              for e, v in curve))
    tail = [(e, v) for e, v in curve if e >= 0.8 * 49]
    slope = np.polyfit([e for e, _ in tail], [v for _, v in tail], 1)[0]
    res = convergence([tmp_path / "seed0"])
    assert res["val_gain_last_fifth"] == -4.0  # the last point alone says "falling by 4"
    assert res["val_fit_last_fifth"] == round(slope * (tail[-1][0] - tail[0][0]), 2)
    assert res["flat"] is bool(abs(slope * (tail[-1][0] - tail[0][0])) <= 1.0)


def test_rendered_tuned_file_reads_back_as_the_chosen_params():
    """``--tune`` writes ``tuned.yaml``: the chosen weights of every row (variants included) and the validation
    scores as comments; YAML reads it back to exactly the chosen params."""
    import yaml

    from prockd.bench.compare_detection import render_tuned

    tuning = {"factors": [0.01, 0.1, 1.0], "tune_seeds": 1,
              "val_mAP50": {"cwd": {"0.01": 70.0, "0.1": 71.5, "1.0": 60.0},
                            "prockd@none": {"0.01": 66.0, "0.1": 64.0, "1.0": 50.0}},
              "chosen": {"cwd": {"factor": 0.1, "params": {"weight": 1.0}},
                         "prockd@none": {"factor": 0.01, "params": {"teacher_head": "none", "lambda_mimic": 0.01,
                                                                     "lambda_emb": 0.01}}}}
    text = render_tuned("some_setting", tuning)
    assert yaml.safe_load(text)["params"] == {m: c["params"] for m, c in tuning["chosen"].items()}
    assert "#   cwd: x0.01 70.0, x0.1 71.5, x1.0 60.0  -> x0.1" in text
    assert "--settings some_setting --tune --tune-seeds 1" in text


def test_detection_schedule_warmup_steps_and_cosine():
    """mmdet's schedule (linear warm-up from ``warmup_factor``, then steps or a cosine to ``min_lr``) against a
    direct computation of each phase."""
    import math

    import torch

    from prockd.core.loop import lr_factor

    # steps: warm-up over 10 iterations from 0.001, then x0.1 at iteration 40
    assert lr_factor(0, 10, 0.001, [40], 0.1) == 0.001
    assert abs(lr_factor(5, 10, 0.001, [40], 0.1) - (0.001 + 0.999 * 0.5)) < 1e-12
    assert lr_factor(39, 10, 0.001, [40], 0.1) == 1.0 and abs(lr_factor(40, 10, 0.001, [40], 0.1) - 0.1) < 1e-12
    # cosine over 100 iterations to a floor of 0.01 (milestones ignored)
    for s in (20, 50, 77, 100, 130):
        want = 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / 100)))
        assert abs(lr_factor(s, 10, 0.001, [40], 0.1, 100, 0.01) - want) < 1e-12
    # warm-up applies on top of the cosine's value
    assert abs(lr_factor(2, 10, 0.5, [], 0.1, 100, 0.0) - (0.5 + 0.5 * 0.2) * 0.5 * (1 + math.cos(math.pi * 0.02))) < 1e-12
    # the detection hooks build it from the config: cosine over epochs x steps, floor min_lr / lr
    from prockd.detection.config import DetTrainConfig
    from prockd.detection.engine import DetectionHooks

    class H:
        cfg = type("C", (), {"train": DetTrainConfig(epochs=5, lr=0.1, min_lr=0.001, schedule="cosine",
                                                     warmup_iters=0)})()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = DetectionHooks.scheduler(H(), opt, 4)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert abs(lrs[0] - 0.1) < 1e-12 and abs(lrs[10] - (0.001 + 0.099 * 0.5 * (1 + math.cos(math.pi * 0.5)))) < 1e-12
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_queue_is_seed_by_seed_with_distillers_first():
    """An interrupted table holds whole paired seeds; within a seed the longer distiller runs go first."""
    from prockd.bench.compare_detection import queue_order

    todo = [({"seed": s, "method": {"name": m}}, f"{m}/{s}", "log") for m in ("student_only", "cwd", "prockd")
            for s in range(3)]
    order = [job[1] for job in queue_order(todo)]
    assert order == ["cwd/0", "prockd/0", "student_only/0", "cwd/1", "prockd/1", "student_only/1",
                     "cwd/2", "prockd/2", "student_only/2"]


def test_set_overrides_are_checked_before_the_teacher_and_change_the_run_folders(tmp_path, capsys):
    """``--set`` changes every student run's recipe (a longer schedule gets new run folders); a bad key fails
    before any teacher is trained, naming it; classification comparisons refuse it."""
    from prockd.bench.compare_detection import _run_dir, embedded_configs
    from prockd.cli import main
    from prockd.core.config import apply_overrides

    out = tmp_path / "c"
    assert main(["bench", "compare", "--suite", "detection", "--out", str(out), "--set", "train.epoch=60"]) == 2
    err = capsys.readouterr().err
    assert "epoch" in err and "--set train.epoch=60" in err
    assert not (out / "compare.log").exists()  # nothing trained, nothing written
    assert main(["bench", "compare", "--out", str(out), "--set", "train.epochs=60"]) == 2
    assert "--set applies to the detection comparison" in capsys.readouterr().err
    _, student = embedded_configs()
    longer = apply_overrides(student, ["train.epochs=60", "train.milestones=[48]"])
    assert longer["train"]["epochs"] == 60 and longer["train"]["milestones"] == [48]
    assert _run_dir(out, longer, "student_only", 0) != _run_dir(out, student, "student_only", 0)
