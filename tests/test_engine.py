"""Engine: exact resume after a kill, run-directory contents, schedule, seeding."""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from prockd.classification.config import build_config
from prockd.classification import engine
from prockd.classification.data import build_task
from prockd.classification.deploy import load_deployed
from prockd.classification.engine import build, teacher_accuracy, train
from prockd.core.loop import warmup_cosine
from tests.conftest import kill_after
from prockd.errors import ProckdError


def _cli(cfg_path: Path, out: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = env or dict(os.environ)
    return subprocess.run([sys.executable, "-m", "prockd.cli", "train", "--config", str(cfg_path), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("views", [0, 3])
def test_killed_run_resumes_to_identical_metrics(tiny, tmp_path, views):
    """A `prockd train` process killed (SIGKILL) mid-epoch, resumed, ends exactly as an uninterrupted run. The
    uninterrupted and the resumed runs train in this process (the same engine as the CLI's, one thread as the
    killed process): only the kill needs a process of its own."""
    raw = tiny()
    raw["train"].update(epochs=3, augment="flip_crop" if not views else "affine", aug_views=views, num_threads=1)
    if views:  # a validation split too: the selected checkpoint must come out the same
        raw["data"]["val_fraction"] = 0.2
        raw["data"]["labels_per_class"] = 25
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    train(build_config(raw), tmp_path / "ref", log=lambda m: None)
    # 100 images / batch 16 = 7 steps per epoch: step 10 is in the middle of epoch 2
    killed = _cli(cfg_path, tmp_path / "res", kill_after(10))
    assert killed.returncode == -9, killed.stderr
    assert (tmp_path / "res" / "checkpoints" / "last.pt").is_file()
    assert not (tmp_path / "res" / "final.json").exists()
    logs = []
    train(build_config(raw), tmp_path / "res", log=logs.append)
    assert any("resumed from" in m for m in logs), logs
    a = json.loads((tmp_path / "ref" / "final.json").read_text())
    b = json.loads((tmp_path / "res" / "final.json").read_text())
    fa = {k: v for k, v in a["final"].items() if k not in ("time_s", "wall_s")}
    fb = {k: v for k, v in b["final"].items() if k not in ("time_s", "wall_s")}
    assert fa == fb
    assert a["selected"] == b["selected"] and (a["selected"] is not None) == bool(views)
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "res" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]


def test_run_directory_contents(tiny, tmp_path):
    raw = tiny()
    summary = train(build_config(raw), tmp_path / "run", log=lambda m: None)
    run = tmp_path / "run"
    for f in ("config.yaml", "metrics.jsonl", "final.json", "student.pt", "checkpoints/best.pt", "prototypes_init.pt"):
        assert (run / f).is_file(), f
    # a finished run keeps what a user needs, not the optimiser's state (train.keep_state: false)
    assert not (run / "checkpoints" / "last.pt").exists() and "last.pt" not in summary["checkpoint_mb"]
    assert list((run / "tb").iterdir())
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["method"]["params"]["num_prototypes"] == 4
    assert resolved["train"]["optimizer"] == "adamw"  # defaults are written out too
    assert summary["deployed_params"] < summary["student_params"] + 10_000
    assert not list(run.rglob("*.tmp*"))
    raw["train"]["keep_state"] = True
    kept = train(build_config(raw), tmp_path / "kept", log=lambda m: None)
    assert (tmp_path / "kept" / "checkpoints" / "last.pt").is_file() and "last.pt" in kept["checkpoint_mb"]


def test_teacher_accuracy_logged_before_distillation(tiny, tmp_path):
    raw = tiny(teacher_eval={"data": {"name": "digits", "classes": [0, 1, 2, 3]}})
    logs = []
    summary = train(build_config(raw), tmp_path / "run", log=logs.append)
    assert "teacher/test" in summary["teacher"]
    first = [m for m in logs if not m.endswith("weights: random initialisation (teacher.pretrained: false)")
             and not m.startswith("student weights:")]
    assert first[0].startswith("teacher accuracy on its own task")  # before distillation, after the weights' source
    assert "teacher weights: random initialisation (teacher.pretrained: false)" in logs
    assert summary["weights"] == {"student": "random initialisation (student.pretrained: false)",
                                  "teacher": "random initialisation (teacher.pretrained: false)"}


def test_same_seed_same_result_other_seed_differs(tiny, tmp_path):
    raw = tiny("student_only")
    a = train(build_config(raw), tmp_path / "a", log=lambda m: None)["final"]
    b = train(build_config(raw), tmp_path / "b", log=lambda m: None)["final"]
    c = train(build_config({**raw, "seed": 1}), tmp_path / "c", log=lambda m: None)["final"]
    assert a["loss/ce"] == b["loss/ce"]
    assert a["loss/ce"] != c["loss/ce"]


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 100, 10, 1.0, 0.0) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("method", ["prockd", "student_only"])
def test_bf16_autocast_and_sgd(tiny, tmp_path, method):
    raw = tiny(method)
    raw["train"].update(amp="bf16", optimizer="sgd", lr=0.05, epochs=1, keep_state=True)
    s = train(build_config(raw), tmp_path / "run", log=lambda m: None)
    # the run trained: finite losses, SGD's momentum buffers exist, the weights moved from their initialisation
    assert all(math.isfinite(v) for k, v in s["final"].items() if k.startswith("loss/"))
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert any("momentum_buffer" in st for st in state["optimizer"]["state"].values())
    init = build(build_config(raw)).distiller.state_dict()
    moved = [k for k, v in state["distiller"].items() if k.startswith("student.") and v.is_floating_point()
             and not torch.equal(v, init[k])]
    assert moved and 0 <= s["final"]["test/deployed"] <= 100


def test_a_run_directory_belongs_to_one_process(tiny, tmp_path):
    """A second run on a directory another process holds exits 2 with one line naming the directory and the
    holder's PID, writing nothing; once the holder is killed (SIGKILL) its stale lock file blocks nothing."""
    raw = tiny()
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from prockd.core.io import run_lock; cm = run_lock(sys.argv[1]); "
         "cm.__enter__(); print('locked', flush=True); sys.stdin.read()", str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = _cli(cfg_path, out)
        assert second.returncode == 2
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and str(out) in err[0] and f"process {holder.pid}" in err[0]
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing else written
    finally:
        holder.kill()
        holder.wait()
    assert holder.returncode == -9 and (out / ".lock").read_text().strip() == str(holder.pid)  # stale file stays
    train(build_config(raw), out, log=lambda m: None)  # in this process: the lock is the engine's, not the CLI's
    assert (out / "final.json").is_file()


def test_teacher_accuracy_is_computed_once_per_teacher_and_data(tiny, tmp_path, monkeypatch):
    raw = tiny(teacher_eval={"data": {"name": "digits", "classes": [0, 1, 2, 3]}})
    b = build(build_config(raw))
    task = build_task(build_config(raw).teacher_eval.data)
    direct = teacher_accuracy(b.teacher, task, b.device)  # no cache: computed
    first = teacher_accuracy(b.teacher, task, b.device, cache_dir=tmp_path / "c")
    assert first == direct and len(list((tmp_path / "c" / "teacher_accuracy").glob("*.json"))) == 1
    calls = []
    monkeypatch.setattr(b.teacher, "predict", lambda x: calls.append(x) or None)
    assert teacher_accuracy(b.teacher, task, b.device, cache_dir=tmp_path / "c") == direct and not calls
    other = build_task(build_config(dict(raw, teacher_eval={"data": {"name": "digits", "classes": [0, 1, 2]}}))
                       .teacher_eval.data)
    monkeypatch.undo()
    teacher_accuracy(b.teacher, other, b.device, cache_dir=tmp_path / "c")  # other images: a key of their own
    assert len(list((tmp_path / "c" / "teacher_accuracy").glob("*.json"))) == 2


def test_teacher_features_of_held_out_images_are_computed_once_and_equal(tiny):
    b = build(build_config(tiny()))
    x = torch.rand(6, 1, 8, 8)
    calls = []
    real = b.teacher.extract
    b.teacher.extract = lambda *a, **k: calls.append(1) or real(*a, **k)
    first = b.teacher.extract_heldout(x, ("taps",))
    again = b.teacher.extract_heldout(x.clone(), ("taps",))
    assert len(calls) == 1 and torch.equal(first["taps"], again["taps"])
    assert torch.equal(first["taps"], real(x, ("taps",))["taps"])
    b.teacher.extract_heldout(x + 0.01, ("taps",))  # other pixels: computed
    assert len(calls) == 2


def test_with_a_validation_split_the_test_sets_are_read_once_for_the_chosen_checkpoint(tiny, tmp_path, monkeypatch):
    raw = tiny("student_only", data={"name": "digits", "classes": [5, 6, 7, 8, 9], "labels_per_class": 20,
                                     "val_fraction": 0.25})
    seen = []
    real = engine.evaluate
    monkeypatch.setattr(engine, "evaluate", lambda d, sets, *a, **k: seen.append(sorted(sets)) or real(d, sets, *a, **k))
    s = train(build_config(raw), tmp_path / "run", log=lambda m: None)
    assert seen.count(["test"]) == 1 and seen.count(["val"]) == raw["train"]["epochs"]
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", map_location="cpu", weights_only=False)
    assert s["selected"]["epoch"] == best["epoch"] + 1 and "test/deployed" in s["selected"]  # final.json: from 1
    if best["epoch"] + 1 == s["final"]["epoch"]:  # the last epoch chosen: its record holds the same test results
        assert s["final"]["test/deployed"] == s["selected"]["test/deployed"]
    else:
        assert "test/deployed" not in s["final"]
    # the selected figure is the deployed student's on the test set
    model, task = load_deployed(tmp_path / "run" / "student.pt"), build_task(build_config(raw).data)
    x, y = task.tests["test"].images.float().div(255), task.tests["test"].labels
    with torch.no_grad():
        acc = 100.0 * float((model(x).argmax(-1) == y).float().mean())
    assert acc == pytest.approx(s["selected"]["test/deployed"], abs=1e-6)


@pytest.mark.parametrize("method", ["prockd", "student_only"])
def test_a_checkpoint_without_the_derived_buffers_still_resumes(tiny, tmp_path, method):
    """An earlier prockd's last.pt lacks the class-prior buffers (recomputed from the data before every run): the
    run resumes, says so, and ends as an uninterrupted one; any other missing key is still an error."""
    raw = tiny(method)
    raw["train"].update(epochs=2, keep_state=True)  # the 1-epoch run is continued to 2 below
    logs = []
    ref = train(build_config(copy.deepcopy(raw)), tmp_path / "ref", log=lambda m: None)
    raw1 = copy.deepcopy(raw)
    raw1["train"]["epochs"] = 1
    train(build_config(raw1), tmp_path / "run", log=lambda m: None)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=False)
    derived = [k for k in state["distiller"] if k in ("log_prior", "tail")]
    assert derived
    for k in derived:
        del state["distiller"][k]
    torch.save(state, last)
    out = train(build_config(copy.deepcopy(raw)), tmp_path / "run", log=logs.append)
    assert any("not in the checkpoint" in m and "recomputed" in m for m in logs)
    assert out["final"]["test/deployed"] == ref["final"]["test/deployed"]
    del state["distiller"][next(k for k in state["distiller"] if k.startswith("student."))]
    torch.save(state, last)
    longer = copy.deepcopy(raw)
    longer["train"]["epochs"] = 3  # continued (the 2-epoch run is finished): last.pt is read
    with pytest.raises(ProckdError, match="does not fit this config.*missing"):
        train(build_config(longer), tmp_path / "run", log=lambda m: None)
