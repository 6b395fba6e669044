"""``prockd demo``: the embedded cross-task benchmark's core table on 2 CPU cores.

The default suite is ``glyphs`` (:mod:`prockd.bench.suites`): a ResNet teacher trained by prockd on digits and
uppercase letters over 150 real typefaces teaches WRN students the 26 lowercase letters from 3 labelled fonts;
every student is tested on 99 held-out fonts (and on fog / contrast shifted copies of them). The demo runs
student-only, the strongest practical baseline (fine-tune the teacher on the task, then distil it) and ProC-KD's
recommended preset on the suite's demo seeds (6 for glyphs) with the
honest protocol of ``prockd bench compare`` (validation-selected checkpoints, paired 95 % intervals, linear
probes of the knowledge gap), prints the table and the paths of the plots. ``--suite fmnist`` runs the earlier
Fashion-MNIST benchmark, whose measured knowledge gap is zero.

Every run is a resumable run directory; an interrupted demo continues where it stopped.
"""
from __future__ import annotations

import copy
from pathlib import Path

from prockd.bench.common import output_dirs, pretrained_teacher
from prockd.bench.compare import load_spec, run_compare
from prockd.bench.suites import get_suite


def demo_spec(suite: str = "glyphs", seeds: int | None = None, quick: bool = False) -> dict:
    """The demo's comparison spec: the suite's demo methods with their tuned parameters, its first student and
    first setting.

    ``quick`` (smoke size, for tests): 2 seeds, 3 epochs, a teacher trained for one epoch on 20 fonts, test
    sets cut to 260 images.
    """
    s = get_suite(suite)
    spec = load_spec(suite=suite, overrides={
        "methods": {m: s.tuned[m] if m in s.tuned else s.methods[m] for m in s.demo_methods},
        "students": dict([next(iter(s.students.items()))]),
        "settings": s.demo_settings or dict([next(iter(s.settings.items()))]),
        "seeds": seeds or (2 if quick else s.demo_seeds or s.seeds)})
    if quick:
        spec["quick"] = True
    return spec


def run_demo(out: Path, suite: str = "glyphs", seeds: int | None = None, quick: bool = False,
             cache_root: Path | None = None, workers: int | None = None, say=print,
             shipped_teacher: bool = True) -> dict:
    """Run the demo, print its table, write ``results.json`` / ``results.md`` / ``results.csv`` and plots
    (``shipped_teacher=False``: the suite's teacher is trained here even where the shipped one fits)."""
    spec = demo_spec(suite, seeds, quick)
    spec["workers"] = workers
    if spec.pop("quick", False):
        s = get_suite(suite)
        teacher_run = copy.deepcopy(s.teacher_run)
        teacher_run["train"]["epochs"] = 1
        teacher_eval = copy.deepcopy(s.teacher_eval)
        if teacher_run["data"]["name"] == "glyphs":
            teacher_run["data"]["glyphs"]["train_fonts"] = 20
            # the teacher's accuracy on its own task: its own split (the images its run rendered, cached), not the
            # full suite's 150 training fonts rendered only to be left unused
            teacher_eval["data"]["glyphs"] = dict(teacher_run["data"]["glyphs"])
        else:
            teacher_run["data"]["labels_per_class"] = 600
        spec["data"] = dict(spec["data"], test_limit=260)  # smoke size: 10 held-out fonts' worth of test images
        for params in spec["methods"].values():  # smoke size: a teacher fine-tune of 3 epochs
            if isinstance(params.get("teacher"), dict) and "finetune" in params["teacher"]:
                params["teacher"]["finetune"] = dict(params["teacher"]["finetune"] or {}, epochs=3)
        teacher_eval["data"]["test_limit"] = 360
        base = {"teacher": copy.deepcopy(s.teacher), "teacher_eval": teacher_eval,
                "train": dict(s.train, epochs=3, eval_every=1),
                "cache": {"dir": str(Path(cache_root or "~/.cache/prockd").expanduser() / "features")}}

        _, root, _, log = output_dirs(out, cache_root, "compare.log")
        ckpt, _ = pretrained_teacher(teacher_run, root, log, say)
        base["teacher"]["checkpoint"] = str(ckpt)
        spec["base"] = base
    return run_compare(out, spec, cache_root, say=say, shipped_teacher=shipped_teacher)
