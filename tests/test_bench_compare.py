"""``prockd bench compare``: tuning on validation, paired seeds and intervals, probes, the table, continuing."""
from __future__ import annotations

import csv
import json

import yaml

from prockd.bench.compare import convergence, format_markdown, statistics_table
from prockd.cli import main
from tests.conftest import TINY_CNN, TINY_VIT


def _spec(tmp_path) -> dict:
    small = dict(TINY_VIT, kwargs=dict(TINY_VIT["kwargs"], depth=1))
    return {
        "seeds": 2, "workers": 1, "tune_seeds": 1, "tune_factors": [0.5, 2.0],
        "methods": {"student_only": {}, "prockd": {"num_prototypes": 4}, "rkd": {}},
        "students": {"vit-d2": TINY_VIT, "vit-d1": small},
        "settings": {"standard": {"corruptions": [{"kind": "fog"}]}, "long_tailed": {"imbalance": 4}},
        "data": {"name": "digits", "classes": [5, 6, 7, 8, 9], "labels_per_class": 20, "val_fraction": 0.2},
        "base": {"teacher": TINY_CNN, "train": {"epochs": 2, "batch_size": 16, "lr": 2e-3, "warmup_epochs": 0,
                                                "progress": False},
                 "cache": {"dir": str(tmp_path / "cache"), "dtype": "float32"}},
    }


def test_compare_tunes_on_validation_runs_fresh_seeds_and_continues(tmp_path, capsys):
    cfg = tmp_path / "cmp.yaml"
    cfg.write_text(yaml.safe_dump(_spec(tmp_path), sort_keys=False))
    out = tmp_path / "cmp"
    assert main(["bench", "compare", "--config", str(cfg), "--out", str(out), "--tune"]) == 0
    printed = capsys.readouterr().out
    # the banner names the user's spec (not only the suite whose defaults fill it) and how many runs go at once
    assert f"prockd bench compare: spec {cfg} over suite glyphs's defaults; 1 run at a time, one thread each" in printed
    assert "tuning: 3 methods, 2 configurations each" in printed and "5 runs, 0 already finished" in printed
    assert "= 24 runs, 0 already finished" in printed and "teacher features" in printed
    res = json.loads((out / "results.json").read_text())
    tuned = res["tuning"]
    assert set(tuned) == {"student_only", "prockd", "rkd"} and set(tuned["rkd"]["scores"]) == {"0.5", "2"}
    assert tuned["rkd"]["params"]["lambda_dist"] == 25.0 * tuned["rkd"]["factor"]
    # the tuning column has a shift: its validation copy's accuracy and the robustness screen's score are reported
    rs = tuned["rkd"]
    assert set(rs["shifted_val"]) == {"fog3"} and "shifted validation {'fog3'" in printed
    assert abs(rs["robust_score"] - (rs["scores"][f"{rs['factor']:g}"] + rs["shifted_val"]["fog3"]) / 2) < 1e-2
    # tuning seeds are not the table's seeds, and no tuning run ever read a test set
    tune_runs = list((out / "runs" / "tune").rglob("final.json"))
    assert len(tune_runs) == 5 and all("seed100" in str(p) for p in tune_runs)
    for p in tune_runs:
        hist = [json.loads(x) for x in (p.parent / "metrics.jsonl").read_text().splitlines()]
        assert all(not k.startswith("test") for h in hist[:-1] for k in h)  # only the last epoch reports tests
    st = res["settings"]["standard"]
    assert set(st["probe"]) >= {"teacher", "pixels"}
    cell = st["vit-d2"]["prockd"]
    assert cell["seeds"] == [0, 1] and len(cell["values"]) == 2
    assert set(cell["vs_student_only"]) >= {"mean", "ci95"} and cell["vs_best_baseline"]["baseline"] == "rkd"
    assert "vs_student_only" not in st["vit-d2"]["student_only"]
    assert set(res["settings"]) == {"standard", "standard:fog3", "long_tailed"}
    assert res["params"]["vit-d1"]["rkd"] < res["params"]["vit-d2"]["rkd"]  # two student sizes
    assert set(res["convergence"]["vit-d2"]) == {"standard", "long_tailed"}
    md = (out / "results.md").read_text()
    assert "| vit-d1 | prockd |" in md and "Paired differences of prockd" in md and "Linear probes" in md
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 3 * 3 and {"vs_student_only_ci95", "best_baseline"} <= set(rows[0])
    assert (out / "curves.png").stat().st_size > 1000 and (out / "prototypes.png").stat().st_size > 1000
    # an interrupted comparison: one final run lost its result; everything else is kept
    lost = next((out / "runs" / "final" / "vit-d2" / "standard").glob("rkd-*")) / "seed1" / "final.json"
    lost.unlink()
    assert main(["bench", "compare", "--config", str(cfg), "--out", str(out), "--tune"]) == 0
    printed = capsys.readouterr().out
    assert "5 runs, 5 already finished" in printed and "= 24 runs, 23 already finished" in printed
    again = json.loads((out / "results.json").read_text())
    assert again["settings"] == res["settings"]  # exact resume
    # fresh seeds only: --first-seed k runs seeds k.. and reuses the runs it shares with the earlier table
    assert main(["bench", "compare", "--config", str(cfg), "--out", str(out), "--tune", "--seeds", "1",
                 "--first-seed", "1", "--settings", "standard", "--students", "vit-d2"]) == 0
    printed = capsys.readouterr().out
    assert "x 1 seeds (1-1) = 3 runs, 3 already finished" in printed
    # the subset run adds to the table in this folder: every earlier row, column, student and seed is kept
    def rows(payload):  # the table's cells (the tiny random teacher's probes are drawn again by each call)
        return {c: {k: v for k, v in cells.items() if k != "probe"} for c, cells in payload["settings"].items()}

    merged = json.loads((out / "results.json").read_text())
    assert rows(merged) == rows(res)
    assert "results keep the earlier comparison's rows" not in printed  # the same rows: nothing kept aside
    assert main(["bench", "compare", "--config", str(cfg), "--out", str(out), "--tune", "--seeds", "1",
                 "--methods", "student_only", "prockd"]) == 0
    printed = capsys.readouterr().out
    assert "results keep the earlier comparison's rows in" in printed and "(rkd;" in printed
    subset = json.loads((out / "results.json").read_text())
    assert rows(subset) == rows(res) and "| vit-d2 | rkd |" in (out / "results.md").read_text()
    cfg.write_text(yaml.safe_dump(dict(_spec(tmp_path), first_seed=-1), sort_keys=False))
    assert main(["bench", "compare", "--config", str(cfg), "--out", str(out)]) == 2
    assert "'first_seed' must be a non-negative integer, not -1" in capsys.readouterr().err


def _row(**seeds):
    return {"params": 1e6, "columns": {"standard": {int(k[1:]): v for k, v in seeds.items()}}, "curves": {}}


def test_statistics_pair_seeds_and_name_the_best_baseline():
    table = {"s": {"student_only": _row(s0=80, s1=82, s2=81), "b": _row(s0=90, s1=91, s2=89),
                   "c": _row(s0=85, s1=85, s2=86), "prockd": _row(s0=86, s1=88, s2=87)}}
    st = statistics_table(table)["s"]["standard"]
    assert st["prockd"]["mean"] == 87 and st["prockd"]["vs_student_only"]["mean"] == 6
    assert st["prockd"]["vs_student_only"]["ci95"] == 0.0  # the same +6 on every seed
    assert st["prockd"]["vs_best_baseline"]["baseline"] == "b" and st["prockd"]["vs_best_baseline"]["mean"] == -3
    assert st["b"]["vs_best_baseline"]["baseline"] == "c"
    md = format_markdown({"s": statistics_table(table)["s"]}, {"s": {m: 1e6 for m in table["s"]}},
                         {"standard": {"teacher": 95.0, "pixels": 60.0}})
    assert "**90.00 ± 1.00**" in md and "<u>87.00 ± 1.00</u>" in md
    assert "+6.00 [+6.00, +6.00]" in md and "(b)" in md and "| standard | 95.00 | 60.00 | +35.00 |" in md


def test_student_only_rows_with_their_own_recipe_are_references_not_baselines():
    """``student_only@NAME`` rows: every other row is paired with the best student-only row too, and none of them is
    a best baseline."""
    table = {"s": {"student_only": _row(s0=70, s1=72), "student_only@noise": _row(s0=80, s1=81),
                   "b": _row(s0=78, s1=79), "prockd": _row(s0=86, s1=88)}}
    st = statistics_table(table)["s"]["standard"]
    assert st["prockd"]["vs_student_only"]["mean"] == 16
    assert st["prockd"]["vs_best_student_only"] == {"mean": 6.5, "ci95": st["prockd"]["vs_best_student_only"]["ci95"],
                                                   "n": 2, "reference": "student_only@noise"}
    assert st["prockd"]["vs_best_baseline"]["baseline"] == "b" and st["b"]["vs_best_student_only"]["mean"] == -2
    assert "vs_best_baseline" not in st["student_only@noise"] and st["student_only"]["vs_best_student_only"]["mean"] == -9.5
    md = format_markdown(statistics_table(table), {"s": {m: 1e6 for m in table["s"]}})
    assert "| s | best student-only | +6.50 [" in md and "(student_only@noise)" in md


def test_convergence_is_the_validation_gain_over_the_last_fifth():
    curve = [(e, 50 + e) for e in range(1, 11)]  # +1 point per epoch: epochs 8 -> 10 add 2 points
    table = {"s": {"student_only": {"curves": {"standard": [curve, curve]}}}}
    assert convergence(table) == {"s": {"standard": {"val_gain_last_fifth": 2.0, "runs": 2}}}


def test_unknown_names_are_one_line_errors(capsys):
    assert main(["bench", "compare", "--settings", "nope"]) == 2
    assert "--settings ['nope'] not in the comparison" in capsys.readouterr().err
    assert main(["bench", "compare", "--suite", "nope"]) == 2
    assert "unknown benchmark suite 'nope'" in capsys.readouterr().err
    assert main(["demo", "--suite", "nope"]) == 2


def test_labelled_variants_of_one_method_and_a_validation_screen(tmp_path, capsys):
    """``NAME@VARIANT`` rows run the registry's NAME with their own parameters; ``--tune-only`` stops after the
    tuning runs (validation only) and writes ``tuning.json``; every ProC-KD row gets its paired differences
    and no ProC-KD row is anyone's best baseline."""
    spec = _spec(tmp_path)
    spec.update(tune_factors=[1.0], students={"vit-d2": TINY_VIT}, settings={"standard": {}},
                methods={"student_only": {}, "prockd": {"num_prototypes": 4},
                         "prockd@t4": {"num_prototypes": 4, "temperature": 4.0}, "rkd": {}})
    cfg = tmp_path / "screen.yaml"
    cfg.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "screen"
    assert main(["bench", "compare", "--config", str(cfg), "--out", str(out), "--tune-only"]) == 0
    res = json.loads((out / "tuning.json").read_text())
    assert set(res["tuning"]) == {"student_only", "prockd", "prockd@t4", "rkd"}
    assert res["tuning"]["prockd@t4"]["params"]["temperature"] == 4.0
    run = out / "runs" / "tune" / "vit-d2" / "standard" / "prockd@t4" / "x1" / "seed1000"
    assert yaml.safe_load((run / "config.yaml").read_text())["method"]["name"] == "prockd"
    assert not (out / "runs" / "final").exists() and not (out / "results.json").exists()
    table = {"s": {"student_only": _row(s0=80, s1=82), "b": _row(s0=90, s1=91), "prockd": _row(s0=86, s1=88),
                   "prockd@x": _row(s0=95, s1=96)}}
    st = statistics_table(table)["s"]["standard"]
    assert st["prockd"]["vs_best_baseline"]["baseline"] == "b" and st["prockd@x"]["vs_best_baseline"]["baseline"] == "b"
    assert "vs_best_baseline" not in st["b"]  # its only other rows are ProC-KD's: no baseline to compare with
    md = format_markdown(statistics_table(table), {"s": {m: 1e6 for m in table["s"]}})
    assert "Paired differences of prockd " in md and "Paired differences of prockd@x " in md


def test_probe_only_stops_after_the_teacher_and_the_probes(tmp_path, capsys):
    spec = _spec(tmp_path)
    spec.update(students={"vit-d2": TINY_VIT}, settings={"standard": {}})
    cfg = tmp_path / "probe.yaml"
    cfg.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "probe"
    assert main(["bench", "compare", "--config", str(cfg), "--out", str(out), "--probe-only"]) == 0
    probes = json.loads((out / "probes.json").read_text())
    assert "standard" in json.dumps(probes) and "teacher features" in capsys.readouterr().out
    assert not (out / "runs" / "final").exists() and not (out / "runs" / "tune").exists()
    assert not (out / "results.json").exists()


def _death_signal_after_initializer() -> int:
    import ctypes

    from prockd.bench.common import die_with_parent

    die_with_parent()
    sig = ctypes.c_int(0)
    ctypes.CDLL(None).prctl(2, ctypes.byref(sig))  # PR_GET_PDEATHSIG
    return sig.value


def test_run_workers_die_with_the_comparison():
    """A comparison's run workers ask the kernel for SIGTERM when their parent dies (PR_SET_PDEATHSIG), so
    killing ``prockd bench compare`` leaves no worker running on (read back with PR_GET_PDEATHSIG)."""
    import multiprocessing as mp
    import signal
    import sys
    from concurrent.futures import ProcessPoolExecutor

    import pytest

    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
        assert ex.submit(_death_signal_after_initializer).result() == int(signal.SIGTERM)


def test_a_comparison_queues_its_longest_runs_first(tmp_path):
    """ProC-KD, then distillers with function matching (a live teacher every step), then other distillers, then
    student-only; within a rank the seeds keep their order (a stable sort)."""
    from prockd.bench.compare import expected_cost, run_config

    spec = _spec(tmp_path)
    spec["methods"] = {"student_only": {}, "rkd": {}, "probe_distil": {"function_matching": "cutmix"},
                       "prockd": {"num_prototypes": 4}}
    jobs = [(run_config(spec, spec["base"], "vit-d2", "standard", m, p, seed), m, seed)
            for seed in (0, 1) for m, p in spec["methods"].items()]
    assert [expected_cost(raw) for raw, _, _ in jobs[:4]] == [0, 1, 2, 3]
    jobs.sort(key=lambda j: expected_cost(j[0]), reverse=True)
    assert [(m, s) for _, m, s in jobs] == [("prockd", 0), ("prockd", 1), ("probe_distil", 0), ("probe_distil", 1),
                                            ("rkd", 0), ("rkd", 1), ("student_only", 0), ("student_only", 1)]


def test_shifted_validation_averages_the_chosen_checkpoints_shifted_validation_accuracy(tmp_path):
    """The robustness screen's inputs: each shifted validation copy's accuracy of the chosen checkpoint, averaged
    over the finished runs (an unfinished run and the test keys are not read)."""
    from prockd.bench.compare import shifted_validation

    runs = []
    for k, (fog, con) in enumerate([(70.0, 50.0), (80.0, 60.0)]):
        rd = tmp_path / f"seed{k}"
        rd.mkdir()
        (rd / "final.json").write_text(json.dumps({"selected": {
            "epoch": 3, "val/deployed": 90.0, "val_fog3/deployed": fog, "val_fog3/plain": 0.0,
            "val_contrast3/deployed": con, "test_fog3/deployed": 1.0, "test/deployed": 2.0}}))
        runs.append(rd)
    runs.append(tmp_path / "unfinished")
    assert shifted_validation(runs) == {"fog3": 75.0, "contrast3": 55.0}
    assert shifted_validation(runs[2:]) == {}
