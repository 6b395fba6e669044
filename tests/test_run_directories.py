"""Run directories and results a user can trust: a refused command changes nothing, errors are one line that names
what differs, a killed cache build leaves nothing behind, a run reads well, a finished run keeps what a user needs."""
from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from prockd.classification.config import build_config
from prockd.classification.engine import train
from prockd.cli import main
from prockd.core.io import sweep_orphans
from prockd.errors import ProckdError


def _snapshot(run: Path) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _finished(tiny, tmp_path, **train_keys) -> tuple[dict, Path, Path]:
    raw = tiny("student_only")
    raw["train"].update(epochs=2, **train_keys)
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run)]) == 0
    return raw, cfg, run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One finished 2-epoch student-only run (and its config file), trained once for the module's refusal tests: each
    test works on its own copy."""
    from tests.conftest import tiny_config

    root = tmp_path_factory.mktemp("finished")
    raw = tiny_config(root, "student_only")
    raw["train"]["epochs"] = 2
    cfg = root / "exp.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(cfg), "--out", str(root / "run")]) == 0
    return cfg, root / "run"


@pytest.mark.parametrize("override,key", [
    ("student.kwargs.depth=1", "student.kwargs.depth"),  # the model
    ("data.classes=[1,2,3,4,5]", "data.classes"),  # the data
    ("method.name=prockd", "method.name"),  # the method
    ("train.lr=0.01", "train.lr"),  # the recipe
])
def test_a_refused_resume_changes_nothing_and_names_the_keys(finished_run, tmp_path, capsys, override, key):
    """`prockd train` on a finished run with another model, data, method or recipe exits 2 with one line naming the
    differing key and saying to use a new --out; not a byte of the run directory changes (config.yaml included)."""
    cfg, template = finished_run
    run = tmp_path / "run"
    shutil.copytree(template, run)
    before = _snapshot(run)
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), "--out", str(run), override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and len(err) < 600, err
    assert key in err and "holds a run of another config" in err and "new --out" in err
    assert _snapshot(run) == before


def test_more_epochs_continue_a_run_that_kept_its_state_and_say_so(tiny, tmp_path, capsys):
    """train.epochs 2 -> 3 continues a run with train.keep_state (one line says so); without keep_state the finished
    run is refused (it kept no optimiser state); fewer epochs are refused; the same config trains nothing."""
    raw, cfg, run = _finished(tiny, tmp_path, keep_state=True)
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), "--out", str(run)]) == 0
    assert "finished (2 epochs): nothing to train" in capsys.readouterr().out
    assert main(["train", "--config", str(cfg), "--out", str(run), "train.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "continuing the run with train.epochs 2 -> 3" in out and "resumed from" in out
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    before = _snapshot(run)
    assert main(["train", "--config", str(cfg), "--out", str(run), "train.epochs=1"]) == 2
    assert "has trained 3 epochs" in capsys.readouterr().err
    assert _snapshot(run) == before
    other = tmp_path / "other"
    other.mkdir()
    _, cfg2, run2 = _finished(tiny, other)  # keep_state false (the default)
    capsys.readouterr()
    before = _snapshot(run2)
    assert main(["train", "--config", str(cfg2), "--out", str(run2), "train.epochs=3"]) == 2
    err = capsys.readouterr().err
    assert "kept no resumable state (train.keep_state: false)" in err and len(err.strip().splitlines()) == 1
    assert _snapshot(run2) == before


def test_out_on_a_folder_of_other_files_is_refused(tiny, tmp_path, capsys):
    """--out on a folder holding the user's own files exits 2 in one line and writes nothing there (no lock file)."""
    raw = tiny("student_only")
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    assert main(["train", "--config", str(cfg), "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert "is a folder of other files (notes.txt), not a prockd run" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--config", str(cfg), "--out", str(empty)]) == 0


def test_an_override_typo_names_the_override_and_params_typos_get_a_suggestion(tiny, tmp_path, capsys):
    raw = tiny("prockd")
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r"), "train.epoch=3"]) == 2
    err = capsys.readouterr().err
    assert "config error in the override 'train.epoch=3'" in err and "did you mean 'epochs'" in err
    assert not (tmp_path / "r").exists()
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r"), "method.params.num_prototype=3"]) == 2
    err = capsys.readouterr().err
    assert "'method.params.num_prototype': unknown key; did you mean 'num_prototypes'?" in err


def _folder(root: Path, splits: dict[str, list[str]]) -> None:
    rng = np.random.default_rng(0)
    for split, classes in splits.items():
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(d / f"{i}.png")


def test_a_class_mismatch_names_the_missing_and_extra_classes(tiny, tmp_path):
    """An extra test/zipper and a missing test/coat are named, even past the first classes in order."""
    _folder(tmp_path / "d", {"train": ["bag", "coat", "sneaker", "trouser", "tshirt"],
                             "test": ["bag", "sneaker", "trouser", "tshirt", "zipper"]})
    raw = tiny("student_only")
    raw["data"] = {"name": "imagefolder", "train_dir": str(tmp_path / "d" / "train"),
                   "test_dirs": {"test": str(tmp_path / "d" / "test")}}
    with pytest.raises(ProckdError) as e:
        train(build_config(raw), tmp_path / "run", log=lambda m: None)
    assert "missing ['coat'], extra ['zipper']" in str(e.value) and "\n" not in str(e.value)


_KILL_IN_CACHE_BUILD = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import yaml
from prockd.classification import cache
from prockd.classification.config import build_config
from prockd.classification.engine import train
real = cache._RowFile.write
def write_then_die(self, idx, rows):  # the test's own kill: SIGKILL once the first rows are on disk
    real(self, idx, rows)
    os.kill(os.getpid(), signal.SIGKILL)
cache._RowFile.write = write_then_die
train(build_config(yaml.safe_load(open({cfg!r}))), {out!r})
"""


def test_a_killed_cache_build_leaves_nothing_that_survives_the_next_start(tiny, tmp_path):
    """A run killed (SIGKILL) while it builds its teacher-feature cache leaves a half-written folder; the next start
    removes it (and says so), builds the cache and trains. Temporaries of a live process are left alone."""
    raw = tiny("fitnets")
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    code = _KILL_IN_CACHE_BUILD.format(tests=str(Path(__file__).parent), cfg=str(cfg), out=str(tmp_path / "run"))
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    cache_dir = tmp_path / "cache"
    orphans = [p for p in cache_dir.iterdir() if ".tmp-" in p.name]
    assert len(orphans) == 1 and any(orphans[0].iterdir())
    live = cache_dir / f"other.tmp-{os.getpid()}"  # this process is alive: its temporary stays
    live.mkdir()
    logs = []
    train(build_config(raw), tmp_path / "run", log=logs.append)
    assert any("left half-written by process" in m for m in logs), logs
    assert [p.name for p in cache_dir.iterdir() if ".tmp-" in p.name] == [live.name]
    assert sweep_orphans(cache_dir) == 0


def test_a_run_reads_well(tiny, tmp_path, capsys):
    """The epoch line leads with the deployed student's validation top-1; final.json counts epochs from 1 like the
    console; the run draws its own curves; `prockd eval` gives per-class accuracy, a confusion matrix and the
    deployed parameter count beside the student network's."""
    raw = tiny("prockd")
    raw["data"].update(val_fraction=0.2, labels_per_class=25)
    raw["train"]["progress"] = True
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run)]) == 0
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if x.startswith("epoch ")]
    assert len(lines) == 3 and all(x.split(": ", 1)[1].startswith("validation top-1 ") for x in lines)
    assert "that prockd adds at deployment" in out
    final = json.loads((run / "final.json").read_text())
    assert final["final"]["epoch"] == 3 and 1 <= final["selected"]["epoch"] <= 3
    assert (run / "curves.png").stat().st_size > 1000
    assert main(["eval", "--run", str(run)]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert set(ev["per_class"]["test"]) == {"5", "6", "7", "8", "9"} or len(ev["per_class"]["test"]) == 5
    per = list(ev["per_class"]["test"].values())
    assert abs(sum(per) / len(per) - ev["top1"]["test"]) < 15  # balanced classes: the mean is near top-1
    assert Path(ev["confusion"]["test"]).stat().st_size > 1000
    p = ev["params"]
    assert p["deployed"] == final["deployed_params"] and p["student_network"] == final["student_params"]
    assert p["added_by_the_method"] == p["deployed"] - p["student_network"] > 0


def test_comparison_workers_print_nothing_to_the_console(tiny, tmp_path, capsys):
    """A comparison run's own output (its progress bars, its messages) goes to the comparison's log."""
    from prockd.bench.common import _run_job

    raw = tiny("student_only")
    raw["train"]["progress"] = True
    log = tmp_path / "compare.log"
    _run_job(raw, str(tmp_path / "run"), str(log), threads=None)
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err == ""
    assert "epoch 3/3" in log.read_text()
    assert os.environ.get("TQDM_DISABLE") is None  # the comparison's own bar is not disabled after the run


def test_results_say_when_intervals_cannot_decide_and_the_gap_is_small():
    from prockd.bench.compare import reading_notes, statistics_table

    def row(**v):
        return {"params": 1e6, "columns": {"standard": {int(k[1:]): x for k, x in v.items()}}, "curves": {}}

    stats = statistics_table({"s": {"student_only": row(s0=50, s1=80), "prockd": row(s0=90, s1=60)}})
    notes = reading_notes(stats, {"standard": {"teacher": 91.0, "pixels": 89.75}})
    text = " ".join(notes)
    assert "2 paired seeds" in text and "wider than ±5 points" in text and "only +1.25 points from" in text


def test_a_comparison_keeps_deployed_students_not_optimiser_state(tiny, tmp_path):
    """A finished run (a comparison's too) keeps student.pt, best.pt, its config and logs, not last.pt."""
    raw = copy.deepcopy(tiny("prockd"))
    train(build_config(raw), tmp_path / "run", log=lambda m: None)
    names = {str(p.relative_to(tmp_path / "run")) for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert {"student.pt", "checkpoints/best.pt", "config.yaml", "metrics.jsonl", "final.json"} <= names
    assert "checkpoints/last.pt" not in names
