"""Command line: ``prockd init | train | eval | export | predict | analyze | pretrain-teacher | demo | convert |
bench compare | bench speed | bench deploy | bench memory``.

Bad input (config, data, model name, tap path, checkpoint) prints one line naming the culprit and
exits with code 2; nothing is written to the run directory.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from prockd.errors import ProckdError

# every command imports what it needs inside its function (torch, timm and torchvision take seconds to import):
# help and config errors print at once


def _cmd_train(args) -> int:
    from prockd.tasks import load_any_config

    cfg = load_any_config(args.config, args.overrides)  # light: a bad config is reported before torch loads
    import prockd.api as api

    run = api.train(cfg, args.out)
    print(json.dumps({"run": str(run), "final": api.read_final(run).get("final")}, indent=2))
    return 0


def _cmd_init(args) -> int:
    import prockd.api as api
    from prockd.detection.init import DET_METHOD

    if args.task == "detection":
        preset = "mimic_light" if args.preset is None else (args.preset or None)
        text = api.init_detection_config(args.data, args.teacher, args.student, args.config,
                                         teacher_backbone=args.teacher_backbone, method=args.method or DET_METHOD,
                                         preset=preset, force=args.force)
    else:
        preset = "robust_calibrated" if args.preset is None else (args.preset or None)
        text = api.init_config(args.data, args.teacher, args.student, args.config, method=args.method or "prockd",
                               preset=preset, force=args.force)
    print(f"wrote {args.config}:\n{text}" if args.config else text, end="")
    return 0


def _cmd_pretrain_teacher(args) -> int:
    from prockd.tasks import commands, load_any_config, task_name

    cfg = load_any_config(args.config, list(args.overrides) + ["method.name=student_only", "method.params={}"])
    print(json.dumps(commands(task_name(cfg)).pretrain_teacher(cfg, args.out), indent=2))
    return 0


def _cmd_eval(args) -> int:
    if args.run is None and (args.model is None or args.config is None):
        raise ProckdError("eval needs --run DIR, or --model FILE with --config FILE")
    import prockd.api as api

    print(json.dumps(api.evaluate(args.run, model=args.model, config=args.config, overrides=args.overrides), indent=2))
    return 0


def _cmd_export(args) -> int:
    if not args.out and not args.onnx:
        raise ProckdError("export needs --out FILE.pt and/or --onnx FILE.onnx")
    import prockd.api as api

    report = api.export(args.run, out=args.out, onnx=args.onnx, checkpoint=args.checkpoint, opset=args.opset,
                        atol=args.atol, verify_images=args.verify_images,
                        say=lambda m: print(m, file=sys.stderr))
    print(json.dumps(report, indent=2))
    return 0


def _cmd_predict(args) -> int:
    import prockd.api as api
    from prockd.classification.predict import image_files, predict_files

    pred = api.load_student(args.model, threads=args.threads)
    files = image_files(args.inputs)
    results = predict_files(pred, files, args.topk)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            tops = ", ".join(f"{t['class']} {100 * t['prob']:.1f}%" for t in r["top"])
            print(f"{r['image']}: {tops}")
    return 0


def _cmd_analyze(args) -> int:
    from prockd.tasks import commands, run_task

    out = commands(run_task(Path(args.run))).analyze(args)
    print(json.dumps({"index": str(out)}))
    return 0


def _cmd_bench_deploy(args) -> int:
    from prockd.bench.deploy import SCENARIOS, run_deploy_bench

    if args.scenario not in SCENARIOS:
        raise ProckdError(f"unknown scenario '{args.scenario}' (known: {', '.join(SCENARIOS)})")
    run_deploy_bench(args.scenario, run=Path(args.run) if args.run else None, threads=args.threads,
                     batch=args.batch, repeats=args.repeats, rounds=args.rounds, warmup=args.warmup,
                     onnx=not args.no_onnx,
                     out=Path(args.out) if args.out else None)
    return 0


def _cmd_bench_memory(args) -> int:
    from prockd.bench.memory import run_memory_bench

    counts = tuple(int(v) for v in args.images.split(","))
    run_memory_bench(counts, out=args.out, size=args.size, workers=args.workers)
    return 0


def _cmd_demo(args) -> int:
    from prockd.bench.suites import suite_task
    from prockd.tasks import commands

    commands(suite_task(args.suite, args.task)).demo(args)
    return 0


def _cmd_bench_compare(args) -> int:
    from prockd.bench.suites import suite_task

    task = suite_task(args.suite, args.task)
    if task != "classification":
        from prockd.tasks import commands

        if args.first_seed:
            raise ProckdError("--first-seed applies to the classification comparison; the detection suite's seeds "
                              "are 0..--seeds-1")
        commands(task).compare(args)
        return 0
    if getattr(args, "overrides", None):
        raise ProckdError("--set applies to the detection comparison; a classification comparison's recipe is its "
                          "YAML spec (--config FILE, keys 'base' / 'train')")
    import prockd.api as api

    api.compare(args.config, args.out, suite=args.suite, seeds=args.seeds, first_seed=args.first_seed,
                workers=args.workers,
                tune=args.tune, tune_only=args.tune_only, probe_only=args.probe_only, tune_seeds=args.tune_seeds,
                methods=args.methods, students=args.students, settings=args.settings,
                train_teacher=args.train_teacher)
    return 0


def _cmd_convert(args) -> int:
    from prockd.detection.cityscapes import convert_cityscapes

    written = [str(convert_cityscapes(args.root, split, args.out, args.foggy_beta, args.workers))
               for split in args.splits]
    print(json.dumps({"written": written}, indent=2))
    return 0


def _cmd_bench_speed(args) -> int:
    from prockd.tasks import commands

    commands(args.task).speed(args)
    return 0


def make_parser() -> argparse.ArgumentParser:
    """The argument parser."""
    p = argparse.ArgumentParser(prog="prockd", description="Prototype-guided cross-task knowledge distillation")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train one run from a YAML config")
    t.add_argument("--config", required=True)
    t.add_argument("--out", default=None, help="run directory (default: the config's 'out')")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=0.001")
    t.set_defaults(fn=_cmd_train)
    it = sub.add_parser("init", help="write a commented config from your image folder (train/ val/ test/ unlabeled/)")
    it.add_argument("--data", required=True, help="folder with train/<class>/ (or <class>/), test/, optional val/, "
                                                  "unlabeled/")
    it.add_argument("--teacher", required=True, help="e.g. builtin:efficientnet_lite0, timm/vit_base_patch16_224")
    it.add_argument("--student", required=True, help="e.g. timm/resnet10t")
    it.add_argument("--method", default=None,
                    help="default: the task's recommended method (classification: prockd; detection: cwd, the one "
                         "row ahead of student-only at convergence on the detection benchmark)")
    it.add_argument("--preset", default=None,
                    help="ProC-KD's preset (default: the task's recommended one, robust_calibrated / mimic_light; "
                         "classification: robust, transfer, paper; detection: paper; '' for none)")
    it.add_argument("--task", choices=["classification", "detection"], default="classification",
                    help="detection: --data holds COCO splits train/ val/ test/ (a .json + images/ each), "
                         "optional unlabeled/")
    it.add_argument("--teacher-backbone", default=None,
                    help="detection: the backbone of the --teacher detector file (e.g. resnext101_32x8d)")
    it.add_argument("--config", default=None, help="file to write (default: print the config)")
    it.add_argument("--force", action="store_true", help="overwrite --config")
    it.set_defaults(fn=_cmd_init)
    pt = sub.add_parser("pretrain-teacher", help="train a teacher on its own labelled task")
    pt.add_argument("--config", required=True)
    pt.add_argument("--out", default=None)
    pt.add_argument("overrides", nargs="*")
    pt.set_defaults(fn=_cmd_pretrain_teacher)
    e = sub.add_parser("eval", help="evaluate a deployed student on a config's test sets")
    e.add_argument("--run", default=None)
    e.add_argument("--model", default=None)
    e.add_argument("--config", default=None)
    e.add_argument("overrides", nargs="*")
    e.set_defaults(fn=_cmd_eval)
    x = sub.add_parser("export", help="the deployable student of a run to a .pt file and/or ONNX (parity-checked)")
    x.add_argument("--run", required=True)
    x.add_argument("--checkpoint", choices=["selected", "best", "last"], default="selected",
                   help="selected: the run's student.pt (chosen on validation); best / last: rebuilt from checkpoints/")
    x.add_argument("--out", default=None, help="deployed-student file (.pt)")
    x.add_argument("--onnx", default=None, help="ONNX file: dynamic batch axis, checked with onnxruntime")
    x.add_argument("--opset", type=int, default=18)
    x.add_argument("--atol", type=float, default=1e-3, help="largest |logit difference| the ONNX check accepts")
    x.add_argument("--verify-images", type=int, default=256, help="test images of the parity check")
    x.set_defaults(fn=_cmd_export)
    pr = sub.add_parser("predict", help="top-k classes of images from a deployed file (.pt or .onnx) alone")
    pr.add_argument("--model", required=True, help="a deployed student: student.pt of a run, or an exported .onnx")
    pr.add_argument("inputs", nargs="+", help="image files or folders")
    pr.add_argument("--topk", type=int, default=5)
    pr.add_argument("--threads", type=int, default=None)
    pr.add_argument("--json", action="store_true", help="print JSON instead of one line per image")
    pr.set_defaults(fn=_cmd_predict)
    an = sub.add_parser("analyze", help="the paper's analysis figures of finished runs (classification: Fig. 4, 5, "
                                        "10; detection: Figs. 6-9 and 11)")
    an.add_argument("--run", required=True, help="the run to analyse (a ProC-KD run for Fig. 5)")
    an.add_argument("--compare", nargs="*", default=[], help="baseline runs drawn beside it")
    an.add_argument("--out", default=None, help="figure folder (default: RUN/analysis)")
    an.add_argument("--images", type=int, default=4, help="test images in the attention figure")
    an.add_argument("--classes", type=int, default=10, help="classes in the feature t-SNE (0: all)")
    an.add_argument("--attention", choices=["grad-rollout", "lrp"], default="grad-rollout",
                    help="Chefer et al. 2021: gradient-weighted rollout (ICCV) or LRP relevance (CVPR)")
    an.add_argument("--seed", type=int, default=0)
    an.add_argument("--score-thr", type=float, default=0.5, help="detection: boxes drawn at this score or above")
    an.add_argument("--tests", nargs="*", default=None, help="detection: test sets to draw (default: all)")
    an.set_defaults(fn=_cmd_analyze)
    d = sub.add_parser("demo", help="the embedded cross-task benchmark's core table (default suite: glyphs)")
    d.add_argument("--task", choices=["classification", "detection"], default=None,
                   help="classification (default) or detection (= --suite detection)")
    d.add_argument("--out", default=None, help="default: runs/demo (runs/demo_detection for --task detection)")
    d.add_argument("--suite", default=None, help="glyphs (default), glyphs_vit (a ViT teacher, ViT and CNN "
                   "students), fmnist (zero knowledge gap) or detection")
    d.add_argument("--seeds", type=int, default=None)
    d.add_argument("--workers", type=int, default=None)
    d.add_argument("--quick", action="store_true", help="a smoke-sized run")
    d.add_argument("--train-teacher", action="store_true",
                   help="glyphs: train the benchmark teacher on this machine instead of using the shipped one")
    d.set_defaults(fn=_cmd_demo)
    cv = sub.add_parser("convert", help="a dataset's official layout to the COCO json prockd reads")
    cv.add_argument("dataset", choices=["cityscapes"])
    cv.add_argument("--root", required=True, help="the folder holding gtFine/ and leftImg8bit/ (or leftImg8bit_foggy/)")
    cv.add_argument("--splits", nargs="+", default=["train", "val"])
    cv.add_argument("--foggy-beta", type=float, default=None,
                    help="Foggy Cityscapes: point at the *_foggy_beta_<beta>.png images (the usual split: 0.02)")
    cv.add_argument("--out", default=None, help="annotation folder (default: ROOT/annotations)")
    cv.add_argument("--workers", type=int, default=2)
    cv.set_defaults(fn=_cmd_convert)
    b = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    bc = b.add_parser("compare", help="methods x seeds x settings x students, the paper's Table-1 shape")
    bc.add_argument("--task", choices=["classification", "detection"], default=None,
                    help="classification (default) or detection (= --suite detection)")
    bc.add_argument("--suite", default=None, help="embedded benchmark suite: glyphs (default), glyphs_vit (a ViT "
                    "teacher), fmnist or detection")
    bc.add_argument("--config", default=None, help="YAML comparison spec (keys replace the suite's)")
    bc.add_argument("--out", default="runs/compare")
    bc.add_argument("--seeds", type=int, default=None, help="final seeds per cell (default 5)")
    bc.add_argument("--first-seed", type=int, default=None,
                    help="the final table's first seed (default 0): fresh seeds without rerunning earlier ones")
    bc.add_argument("--workers", type=int, default=None)
    bc.add_argument("--methods", nargs="*", default=None, help="a subset of the spec's methods")
    bc.add_argument("--students", nargs="*", default=None, help="a subset of the spec's students")
    bc.add_argument("--settings", nargs="*", default=None, help="a subset of the spec's settings")
    bc.add_argument("--tune", action="store_true",
                    help="first choose every method's main loss weights on validation, same budget for all")
    bc.add_argument("--tune-seeds", type=int, default=None, help="seeds per tuning configuration (default 2)")
    bc.add_argument("--probe-only", action="store_true",
                    help="stop after the teacher and the knowledge-gap probes of each setting (no student runs)")
    bc.add_argument("--tune-only", action="store_true",
                    help="stop after the tuning runs (a validation screen: tuning.json, no test set read)")
    bc.add_argument("--train-teacher", action="store_true",
                    help="glyphs: train the benchmark teacher on this machine instead of using the shipped one")
    bc.add_argument("--set", nargs="+", default=None, metavar="KEY=VALUE", dest="overrides",
                    help="detection: overrides of every student run's config, e.g. train.epochs=60 "
                         "'train.milestones=[48]' (new run folders; classification: use --config)")
    bc.set_defaults(fn=_cmd_bench_compare)
    bs = b.add_parser("speed", help="training-step throughput and memory ratios, side by side in one run")
    bs.add_argument("--task", choices=["classification", "detection"], default="classification")
    bs.add_argument("--scenario", default="embedded", help="embedded (CPU-sized) or paper (classification: ViT-B -> "
                                                           "ViT-B-6, 224 px; detection: X-101 -> R-50, 1024x2048)")
    bs.add_argument("--device", default="auto")
    bs.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    bs.add_argument("--rounds", type=int, default=9, help="interleaved rounds; the median is reported")
    bs.add_argument("--warmup", type=int, default=3)
    bs.add_argument("--batch-size", type=int, default=None)
    bs.add_argument("--amp", choices=["none", "bf16", "fp16"], default=None)
    bs.add_argument("--threads", type=int, default=None)
    bs.add_argument("--out", default=None, help="JSON file (default: runs/bench_speed[_detection].json)")
    bs.set_defaults(fn=_cmd_bench_speed)
    bd = b.add_parser("deploy", help="parameters, FLOPs, latency and throughput: teacher vs student vs deployed, "
                                      "PyTorch and onnxruntime, side by side")
    bd.add_argument("--scenario", default="embedded",
                    help="embedded (the glyph teacher, WRN-16-1 + FA), vit (tiny ViTs), paper (ViT-B -> ViT-B-6, 224 px)")
    bd.add_argument("--run", default=None, help="a finished run: its teacher and deployed student instead")
    bd.add_argument("--threads", type=int, default=None, help="threads for PyTorch and onnxruntime (default: all)")
    bd.add_argument("--batch", type=int, default=32, help="throughput batch")
    bd.add_argument("--repeats", type=int, default=None, help="timed calls per measurement and round")
    bd.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    bd.add_argument("--warmup", type=int, default=2, help="untimed calls per measurement first")
    bd.add_argument("--no-onnx", action="store_true")
    bd.add_argument("--out", default="runs/bench_deploy.json")
    bd.set_defaults(fn=_cmd_bench_deploy)
    bm = b.add_parser("memory", help="peak RSS of one epoch with a small and a large unlabelled folder, side by side")
    bm.add_argument("--images", default="1000,10000", help="unlabelled-folder sizes, increasing (comma-separated)")
    bm.add_argument("--size", type=int, default=64, help="image side in pixels (the folder is written at it)")
    bm.add_argument("--workers", type=int, default=2, help="loader processes decoding the unlabelled images")
    bm.add_argument("--out", default="runs/bench_memory")
    bm.set_defaults(fn=_cmd_bench_memory)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = make_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ProckdError as e:
        print(f"prockd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prockd: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
