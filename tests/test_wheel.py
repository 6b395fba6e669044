"""prockd as a user installs it: a wheel built from this tree, installed in a fresh virtual environment and run
from a folder outside the repository, with an empty home (no caches).

The fresh environment gets prockd from the wheel alone; its dependencies (torch, timm, ...) are those of the
environment running the tests, reached through a ``.pth`` line (installing torch afresh would need the network).
A ``.pth`` line adds a folder to ``sys.path`` without processing the ``.pth`` files inside it, so the editable
install of the source tree that the test environment holds is not seen: the test checks where prockd came from.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(prockd executable, environment, working folder) of a fresh venv holding the wheel."""
    root = tmp_path_factory.mktemp("wheel")
    dist = root / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist),
                            str(REPO)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    assert "deprecat" not in (build.stdout + build.stderr).lower(), "the build warns: " + build.stderr[-2000:]
    wheel = next(dist.glob("prockd-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "prockd/configs/detection/embedded/teacher.yaml" in names
    assert "prockd/configs/detection/embedded/tuned.yaml" in names
    assert any(n.startswith("prockd/bench/teachers/") and n.endswith(".pt") for n in names)  # the shipped teacher
    assert not any(n.startswith(("tests/", "src/")) for n in names)

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "_prockd_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   timeout=300)
    work = root / "elsewhere"
    work.mkdir()
    home = root / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HOME=str(home), PATH=f"{venv / 'bin'}:{env.get('PATH', '')}", OMP_NUM_THREADS="1")
    yield venv / "bin" / "prockd", env, work
    shutil.rmtree(root, ignore_errors=True)  # the venv and the demos' caches under the empty HOME


def test_wheel_holds_the_package_not_the_source_tree(installed):
    exe, env, work = installed
    where = _run([str(exe.parent / "python"), "-c", "import prockd, prockd.core.config as c; "
                  "print(prockd.__file__); print(c.packaged_configs())"], work, env).stdout.split()
    assert not where[0].startswith(str(REPO)), where
    assert (Path(where[1]) / "glyphs_lower.yaml").is_file()


def test_detection_demo_runs_from_the_wheel(installed):
    exe, env, work = installed
    res = _run([str(exe), "demo", "--task", "detection", "--quick", "--out", "det", "--workers", "1"], work, env)
    assert "mAP50" in res.stdout + res.stderr
    results = json.loads((work / "det" / "results.json").read_text())
    assert results


def test_classification_demo_runs_from_the_wheel(installed):
    """The main job end to end at smoke size, as installed: real rendered glyphs, a teacher pretrained by prockd
    (the quick demo trains its own), the core table, probes and plots."""
    exe, env, work = installed
    res = _run([str(exe), "demo", "--quick", "--out", "cls", "--workers", "1"], work, env)
    res_json = json.loads((work / "cls" / "results.json").read_text())
    std = res_json["settings"]["standard"]
    assert set(res_json["settings"]) == {"standard"}
    assert std["probe"]["teacher"] > std["probe"]["pixels"] - 30  # both probes ran on the real glyphs
    cells = std["wrn16-1"]
    assert set(cells) == {"student_only", "finetune_distil@views", "prockd@robust_calibrated"}
    assert all(0 <= c["mean"] <= 100 and c["seeds"] == [0, 1] for c in cells.values())
    assert "ci95" in cells["prockd@robust_calibrated"]["vs_student_only"]
    assert res_json["costs"]["wrn16-1"]["finetune_distil@views"]["finetunes"] == 1  # one fine-tune, counted once
    printed = res.stdout
    assert "pretraining the benchmark teacher" in printed and "epoch 1/1" in printed  # teacher progress shown
    assert "| wrn16-1 | prockd@robust_calibrated |" in printed and "curves.png" in printed
    assert "prototypes.png" in printed and "wall time per run" in printed
    assert "time by phase: teacher" in printed and "final runs (6, 1 at a time)" in printed
    assert all((work / "cls" / f).is_file() for f in ("results.md", "results.csv", "curves.png", "prototypes.png"))
    # a second call keeping the finished runs: tests/test_bench_compare.py (the same run_compare, in-process)
