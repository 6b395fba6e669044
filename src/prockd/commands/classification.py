"""Classification's side of every ``prockd`` command that exists for both tasks (the CLI finds it through
:mod:`prockd.tasks`): train, pretrain a teacher, evaluate a deployed student, analyse runs, the demo, the
speed benchmark (the comparison is :func:`prockd.compare`)."""
from __future__ import annotations

from pathlib import Path

from prockd.bench.demo import run_demo
from prockd.bench.speed import SCENARIOS, run_speed
from prockd.classification.analysis import run_analyze
from prockd.classification.config import ExperimentConfig
from prockd.classification.data import build_task
from prockd.classification.deploy import confusion, load_deployed, plot_confusion
from prockd.classification.models import count_params
from prockd.classification.engine import build
from prockd.classification.engine import pretrain_teacher as pretrain_run
from prockd.classification.engine import train as train_run
from prockd.errors import ProckdError

DEPLOYED_FILE = "student.pt"


def train(cfg: ExperimentConfig, out: str | None) -> dict:
    """One run (``out`` replaces the config's); the summary's final metrics."""
    if out:
        cfg = cfg.model_copy(update={"out": out})
    summary = train_run(cfg, cfg.out, built=build(cfg))
    return {"run": cfg.out, "final": summary["final"]}


def pretrain_teacher(cfg: ExperimentConfig, out: str | None) -> dict:
    """A student-only run on the teacher's own task, then its ``teacher.pt``."""
    return pretrain_run(cfg, out)


def evaluate(cfg: ExperimentConfig, model_path: Path) -> dict:
    """A deployed student file on the config's test sets: top-1 (%), per-class accuracy and a confusion matrix per
    test set (``confusion_<test>.png`` beside the file), and the deployed model's parameter count beside the named
    student network's (what the method adds at deployment, e.g. ProC-KD's FA and prototypes)."""
    if not model_path.is_file():
        raise ProckdError(f"deployed student not found: {model_path}")
    task = build_task(cfg.data)
    model = load_deployed(model_path)
    names = model.class_names or task.class_names
    out: dict = {"model": str(model_path), "top1": {}, "per_class": {}, "confusion": {}}
    for name, ds in task.tests.items():
        m = confusion(model, ds, len(names))
        out["top1"][name] = 100.0 * float(m.diag().sum()) / max(1, int(m.sum()))
        out["per_class"][name] = {c: round(100.0 * float(m[i, i]) / max(1, int(m[i].sum())), 2)
                                  for i, c in enumerate(names)}
        png = model_path.parent / f"confusion_{name}.png"
        plot_confusion(m, names, png, f"{model_path.name} on {name}: top-1 {out['top1'][name]:.2f} %")
        out["confusion"][name] = str(png)
    deployed, own = count_params(model), count_params(model.student)
    out["params"] = {"deployed": deployed, "student_network": own, "added_by_the_method": deployed - own,
                     "added_share": round((deployed - own) / max(1, own), 4)}
    return out


def analyze(args) -> Path:
    """Figs. 4, 5 and 10 of finished runs (:func:`prockd.classification.analysis.run_analyze`)."""
    return run_analyze(Path(args.run), [Path(c) for c in args.compare], Path(args.out) if args.out else None,
                       images=args.images, classes=args.classes, attention=args.attention, seed=args.seed)


def demo(args) -> None:
    """The embedded benchmark's core table (:func:`prockd.bench.demo.run_demo`)."""
    run_demo(out=Path(args.out or "runs/demo"), suite=args.suite or "glyphs", seeds=args.seeds, quick=args.quick,
             workers=args.workers, shipped_teacher=not args.train_teacher)


def speed(args) -> None:
    """Training-step throughput and memory ratios (:func:`prockd.bench.speed.run_speed`)."""
    if args.scenario not in SCENARIOS:
        raise ProckdError(f"unknown scenario '{args.scenario}' (known: {', '.join(SCENARIOS)})")
    run_speed(args.scenario, args.device, args.steps, args.rounds, args.warmup, args.batch_size, args.amp,
              args.threads, Path(args.out or "runs/bench_speed.json"))
