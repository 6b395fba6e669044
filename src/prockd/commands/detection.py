"""Detection's side of every ``prockd`` command that exists for both tasks (the CLI finds it through
:mod:`prockd.tasks`): train, pretrain a teacher, evaluate a deployed detector, analyse runs, the demo, the
comparison and the speed benchmark."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from prockd.bench.compare_detection import (
    ALL_METHODS,
    SUITE,
    probe_settings,
    run_detection_compare,
    setting_of,
)
from prockd.bench.speed_detection import DET_SCENARIOS, run_det_speed
from prockd.detection.analysis import run_det_analyze
from prockd.detection.config import DetExperimentConfig
from prockd.detection.deploy import load_deployed_detector
from prockd.detection.engine import open_data
from prockd.detection.engine import pretrain_teacher as pretrain_run
from prockd.detection.engine import train as train_run
from prockd.detection.evaluate import coco_metrics, detect
from prockd.detection.methods import DET_METHODS
from prockd.errors import ProckdError

DEPLOYED_FILE = "detector.pt"


def train(cfg: DetExperimentConfig, out: str | None) -> dict:
    """One run (``out`` replaces the config's); the summary's final metrics."""
    out = out or cfg.out
    summary = train_run(cfg, out)
    return {"run": out, "final": summary.get("final")}


def pretrain_teacher(cfg: DetExperimentConfig, out: str | None) -> dict:
    """A student-only run on the teacher's own task, then its ``teacher.pt``."""
    return pretrain_run(cfg, out)


def evaluate(cfg: DetExperimentConfig, model_path: Path) -> dict:
    """COCO metrics of a deployed detector file on the config's test sets."""
    model, classes = load_deployed_detector(model_path)
    data = open_data(cfg, log=lambda m: print(m, file=sys.stderr))
    if classes != data.classes:
        raise ProckdError(f"{model_path} detects {classes}, the config's data has {data.classes}")
    res = {name: coco_metrics(ds.coco_gt(), detect(model, ds, torch.device("cpu"))) for name, ds in data.tests.items()}
    return {"model": str(model_path), "metrics": res}


def analyze(args) -> Path:
    """Figs. 6-9 and 11 of finished runs (:func:`prockd.detection.analysis.run_det_analyze`)."""
    return run_det_analyze(Path(args.run), [Path(c) for c in args.compare], Path(args.out) if args.out else None,
                           images=args.images, seed=args.seed, score_thr=args.score_thr, tests=args.tests)


def demo(args) -> None:
    """The embedded detection benchmark's table (:func:`prockd.bench.compare_detection.run_detection_compare`):
    the suite's demo methods and demo seeds (2 with ``--quick``)."""
    run_detection_compare(Path(args.out or "runs/demo_detection"),
                          seeds=args.seeds or (2 if args.quick else SUITE.demo_seeds),
                          workers=args.workers, quick=args.quick)
    print(f"the demo's rows: {', '.join(SUITE.demo_methods)}; every baseline ({', '.join(SUITE.methods)}), 5 seeds: "
          "prockd bench compare --suite detection (docs/detection.md)")


def compare(args) -> None:
    """The detection suite's comparison (:func:`prockd.bench.compare_detection.run_detection_compare`): its
    methods (or ``--methods``), its seeds (or ``--seeds``), its setting (or the one ``--settings`` names); with
    ``--probe-only`` the knowledge-gap probes of every setting named (:func:`probe_settings`)."""
    settings = list(args.settings or [SUITE.setting])
    for s in settings:
        setting_of(s)  # unknown names are an error before anything runs
    if args.probe_only:
        probe_settings(Path(args.out), settings)
        return
    if len(settings) > 1:
        raise ProckdError(f"--settings: one detection setting per comparison (got {settings}); --probe-only takes "
                          "several")
    methods = tuple(args.methods or ALL_METHODS)
    known = DET_METHODS.names() + list(SUITE.variants)  # student_only is a registered method too
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ProckdError(f"--methods {unknown} not in the detection comparison (known: {', '.join(known)})")
    run_detection_compare(Path(args.out), seeds=args.seeds or SUITE.seeds, methods=methods, workers=args.workers,
                          do_tune=args.tune, tune_seeds=args.tune_seeds or 1, setting=settings[0],
                          tune_only=args.tune_only, overrides=args.overrides)


def speed(args) -> None:
    """Training-step throughput and memory ratios (:func:`prockd.bench.speed_detection.run_det_speed`)."""
    if args.scenario not in DET_SCENARIOS:
        raise ProckdError(f"unknown detection scenario '{args.scenario}' (known: {', '.join(DET_SCENARIOS)})")
    run_det_speed(args.scenario, args.device, args.steps, args.rounds, args.warmup, args.batch_size, args.amp,
                  args.threads, Path(args.out or "runs/bench_speed_detection.json"))
