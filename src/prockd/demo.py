"""``prockd demo``: the embedded cross-task benchmark on Fashion-MNIST (runs on 2 CPU cores).

Settings (label spaces of teacher and student are disjoint in every one):

- ``limited``: a ResNet-18 teacher (2.8 M params) trained by prockd on classes 0-4 -> a 0.31 M-param
  ViT student on classes 5-9 with 100 labels per class; also tested on shifted domains (fog, contrast,
  noise corruptions of the test set), the analogue of the paper's cross-domain columns.
- ``imagenet``: the ImageNet EfficientNet-Lite0 teacher (label space ImageNet-1k) -> the same student.
- ``lt100`` / ``lt10``: long-tailed student training sets (exponential profile, imbalance 100 / 10);
  ``lt10`` runs with ``--settings``.

Every run is a resumable run directory; an interrupted demo continues where it stopped.
"""
from __future__ import annotations

import copy
import os
import hashlib
import json
import shutil
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from prockd.config import build_config
from prockd.engine import train
from prockd.io import atomic_torch_save, atomic_write_json, atomic_write_text

FMNIST_NORM = {"mean": [0.286], "std": [0.353]}
STUDENT = {"name": "vit_tiny_patch16_224", "in_chans": 1, "input_size": 28, **FMNIST_NORM,
           "kwargs": {"img_size": 28, "patch_size": 4, "embed_dim": 64, "depth": 6, "num_heads": 4,
                      "mlp_ratio": 4.0}}
TEACHER_NET = {"name": "resnet18", "in_chans": 1, "input_size": 56, **FMNIST_NORM,
               "kwargs": {"channels": [32, 64, 128, 256], "stem_width": 32}}
TEACHER_FMNIST = {**TEACHER_NET, "kwargs": {**TEACHER_NET["kwargs"], "num_classes": 5},
                  "taps": ["layer1", "layer2", "layer3"], "fusion_size": [7, 7]}
TEACHER_LITE0 = {"name": "builtin:efficientnet_lite0", "pretrained": True, "input_size": 112,
                 "fusion_size": [7, 7]}
STUDENT_CLASSES = [5, 6, 7, 8, 9]
TEACHER_CLASSES = [0, 1, 2, 3, 4]
CORRUPTIONS = [{"kind": "fog"}, {"kind": "contrast"}, {"kind": "noise"}]
# chosen by measurement on the limited-label setting (3 seeds each, see README "What we tried")
PROCKD_PARAMS = {"num_prototypes": 24, "variant": "B", "lambda_kl": 1.0, "temperature": 1.0, "lambda_emb": 1.0}
TRAIN = {"epochs": 30, "batch_size": 32, "lr": 3e-3, "weight_decay": 0.05, "warmup_epochs": 2,
         "eval_every": 5, "progress": False}
SETTINGS = {
    "limited": {"teacher": "fmnist", "data": {"labels_per_class": 100, "corruptions": CORRUPTIONS}, "seeds": 5},
    "imagenet": {"teacher": "lite0", "data": {"labels_per_class": 100}, "seeds": 3},
    "lt100": {"teacher": "fmnist", "data": {"labels_per_class": 100, "imbalance": 100}, "seeds": 3},
    "lt10": {"teacher": "fmnist", "data": {"labels_per_class": 100, "imbalance": 10}, "seeds": 3},
}
DEFAULT_SETTINGS = ["limited", "imagenet", "lt100"]  # lt10: `prockd demo --settings lt10` (keeps the demo < 15 min)
METHOD_ROWS = [("student_only", {}), ("prockd", PROCKD_PARAMS)]


def _teacher_run_config(quick: bool) -> dict:
    data = {"name": "fashion_mnist", "classes": TEACHER_CLASSES, "labels_per_class": 600 if quick else 3000,
            "test_limit": 500 if quick else 2000}
    return {"seed": 0, "student": copy.deepcopy(TEACHER_NET), "data": data,
            "method": {"name": "student_only"},
            "train": {"epochs": 2, "batch_size": 128, "lr": 2e-3, "weight_decay": 0.05,
                      "warmup_epochs": 0.2, "progress": False}}


def pretrained_fmnist_teacher(cache_root: Path, quick: bool, log=print) -> tuple[Path, dict]:
    """Train (once, then cached by config hash) the teacher on Fashion-MNIST classes 0-4."""
    raw = _teacher_run_config(quick)
    key = hashlib.sha1(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]
    run_dir = cache_root / "teachers" / key
    ckpt = run_dir / "teacher.pt"
    if ckpt.is_file() and (run_dir / "final.json").is_file():
        return ckpt, json.loads((run_dir / "final.json").read_text())
    log(f"pretraining the Fashion-MNIST teacher (classes 0-4) in {run_dir}")
    cfg = build_config(raw, "demo teacher")
    from prockd.engine import build

    built = build(cfg)
    summary = train(cfg, run_dir, built=built, log=log)
    atomic_torch_save({"model": built.distiller.student.model.state_dict()}, ckpt)
    atomic_write_json(run_dir / "final.json", summary)
    return ckpt, summary


def run_config(setting: str, method: str, params: dict, seed: int, teacher_ckpt: Path, cache_dir: Path,
               quick: bool) -> dict:
    """The full experiment config of one demo run."""
    s = SETTINGS[setting]
    data = {"name": "fashion_mnist", "classes": STUDENT_CLASSES, "test_limit": 1000 if quick else 2000,
            **copy.deepcopy(s["data"])}
    teacher = copy.deepcopy(TEACHER_FMNIST if s["teacher"] == "fmnist" else TEACHER_LITE0)
    teacher_eval = {}
    if s["teacher"] == "fmnist":
        teacher["checkpoint"] = str(teacher_ckpt)
        teacher_eval = {"data": {"name": "fashion_mnist", "classes": TEACHER_CLASSES,
                                 "test_limit": 500 if quick else 2000}}
    train_cfg = dict(TRAIN, epochs=3 if quick else TRAIN["epochs"], eval_every=1 if quick else TRAIN["eval_every"])
    return {"seed": seed, "teacher": teacher, "teacher_eval": teacher_eval, "student": copy.deepcopy(STUDENT),
            "data": data, "method": {"name": method, "params": copy.deepcopy(params)}, "train": train_cfg,
            "cache": {"dir": str(cache_dir / "features"), "dtype": "float16"}}


def _mean_std(vals: list[float]) -> tuple[float, float]:
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarise(results: dict) -> dict:
    """Per setting and method: mean/std over seeds of the deployed student, z_aug, shifted domains."""
    table = {}
    for setting, methods in results.items():
        table[setting] = {}
        for method, runs in methods.items():
            finals = [r["final"] for r in runs]
            row = {"seeds": [r["seed"] for r in runs], "params": runs[0]["deployed_params"],
                   "student_params": runs[0]["student_params"]}
            for key in sorted(finals[0]):
                if key.startswith("test") and "/" in key:
                    m, sd = _mean_std([f[key] for f in finals])
                    row[key] = {"mean": round(m, 3), "std": round(sd, 3), "values": [f[key] for f in finals]}
            if runs[0].get("teacher"):
                row["teacher"] = runs[0]["teacher"]
            table[setting][method] = row
    return table


def format_table(table: dict) -> str:
    """Markdown table: deployed top-1 (mean ± std over seeds), z_aug, shifted-domain columns, params."""
    lines = ["| setting | method | params | top-1 (deployed) | top-1 z_aug | fog | contrast | noise | seeds |",
             "|---|---|---|---|---|---|---|---|---|"]

    def cell(row, key):
        v = row.get(key)
        return f"{v['mean']:.2f} ± {v['std']:.2f}" if v else "–"

    for setting, methods in table.items():
        for method, row in methods.items():
            lines.append(f"| {setting} | {method} | {row['params'] / 1e6:.3f} M | {cell(row, 'test/deployed')} | "
                         f"{cell(row, 'test/aug')} | {cell(row, 'test_fog3/deployed')} | "
                         f"{cell(row, 'test_contrast3/deployed')} | {cell(row, 'test_noise3/deployed')} | "
                         f"{len(row['seeds'])} |")
        if "student_only" in methods and "prockd" in methods:
            a = methods["prockd"]["test/deployed"]["values"]
            b = methods["student_only"]["test/deployed"]["values"]
            d = [x - y for x, y in zip(a, b)]
            m, sd = _mean_std(d)
            lines.append(f"| {setting} | **ProC-KD − student** | | **{m:+.2f} ± {sd:.2f}** | | | | | |")
    return "\n".join(lines)


def plot(results: dict, out: Path) -> list[str]:
    """Training curves and the prototype distance matrices before and after learning (paper Fig. 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    n = len(results)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    for ax, (setting, methods) in zip(axes[0], results.items()):
        for method, runs in methods.items():
            hist = [r["history"] for r in runs if r.get("history")]
            if not hist:
                continue
            epochs = [h["epoch"] + 1 for h in hist[0] if "test/deployed" in h]
            accs = [[h["test/deployed"] for h in hh if "test/deployed" in h] for hh in hist]
            mean = [statistics.fmean(v) for v in zip(*accs)]
            ax.plot(epochs, mean, marker="o", ms=3, label=method)
        ax.set_title(setting)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    files.append("curves.png")
    for setting, methods in results.items():
        runs = methods.get("prockd", [])
        if not runs:
            continue
        run_dir = Path(runs[0]["run_dir"])
        init = torch.load(run_dir / "prototypes_init.pt", weights_only=True)
        learned = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["distiller"]["prototypes"]
        fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.8))
        for ax, p, title in ((axes[0], init, "initial prototypes"), (axes[1], learned, "learned prototypes")):
            im = ax.imshow(torch.cdist(p.float(), p.float()).numpy(), cmap="viridis")
            ax.set_title(f"{title} ({setting})")
            fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        name = f"prototypes_{setting}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)
    return files


def _run_job(raw: dict, run_dir: str, log_path: str, threads: int | None = 1) -> None:
    """One demo run (in a worker process): train to ``run_dir`` (resumes if it was interrupted)."""
    if threads:
        torch.set_num_threads(threads)

    def log(msg: str) -> None:
        with open(log_path, "a") as f:
            f.write(f"[{Path(run_dir).relative_to(Path(run_dir).parents[2])}] {msg}\n")

    train(build_config(raw, "demo run"), run_dir, log=log)


def run_jobs(todo: list[tuple], workers: int, desc: str) -> None:
    """Run ``_run_job(raw, run_dir, log_path)`` for each job, ``workers`` processes in parallel
    (one thread each), with a progress bar over runs."""
    bar = tqdm(total=len(todo), desc=f"{desc} ({workers} in parallel)", unit="run")
    if workers > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
            for fut in as_completed([ex.submit(_run_job, *j) for j in todo]):
                fut.result()
                bar.update()
    else:
        for j in todo:
            _run_job(*j, threads=None)
            bar.update()
    bar.close()


def _prepare_cache(raw: dict, log) -> None:
    """Build the teacher-feature cache of a run's config (teacher + training set), whatever its method."""
    from prockd.cache import TeacherCache
    from prockd.data import build_task
    from prockd.models import Teacher, create_model

    cfg = build_config(raw, "cache preparation")
    teacher = Teacher(create_model(cfg.teacher, None, "teacher"), cfg.teacher)
    TeacherCache(teacher, build_task(cfg.data).train, cfg.cache.dir, cfg.cache.dtype, log=log).prepare()


def output_dirs(out: Path, cache_root: Path | None, log_name: str):
    """(out, cache_root, log_path, log function) of a benchmark writing under ``out`` (created)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache_root = Path(cache_root or Path("~/.cache/prockd").expanduser())
    log_path = out / log_name

    def log(msg: str) -> None:
        with open(log_path, "a") as f:
            f.write(msg + "\n")

    return out, cache_root, log_path, log


def run_demo(out: Path, seeds: int | None = None, quick: bool = False, settings: list[str] | None = None,
             cache_root: Path | None = None, workers: int | None = None) -> dict:
    """Run the benchmark, print the table, write ``results.json``, ``results.md`` and plots under ``out``."""
    out, cache_root, log_path, log = output_dirs(out, cache_root, "demo.log")
    workers = workers or min(2, os.cpu_count() or 1)
    names = settings or (["limited"] if quick else DEFAULT_SETTINGS)
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        from prockd.errors import ProckdError

        raise ProckdError(f"unknown demo setting(s) {unknown} (known: {', '.join(SETTINGS)})")
    t0 = time.perf_counter()
    print(f"prockd demo: settings {names}; logs in {log_path}", flush=True)
    teacher_ckpt, teacher_summary = pretrained_fmnist_teacher(cache_root, quick, log)
    print(f"teacher (Fashion-MNIST classes 0-4): top-1 {teacher_summary['final'].get('test/deployed', 0):.2f} % "
          f"on its own test split, {teacher_summary['student_params'] / 1e6:.2f} M params", flush=True)
    jobs = []
    for setting in names:
        n = seeds or (1 if quick else SETTINGS[setting]["seeds"])
        for seed in range(n):
            for method, params in METHOD_ROWS:
                jobs.append((setting, method, params, seed))
    results: dict = {s: {} for s in names}
    todo = []
    for setting, method, params, seed in jobs:
        run_dir = out / "runs" / setting / method / f"seed{seed}"
        if not (run_dir / "final.json").is_file():
            if run_dir.exists() and not (run_dir / "checkpoints" / "last.pt").is_file():
                shutil.rmtree(run_dir)
            raw = run_config(setting, method, params, seed, teacher_ckpt, cache_root, quick)
            build_config(raw, f"demo {setting}/{method}")  # validate before anything starts
            todo.append((raw, str(run_dir), str(log_path)))
    if todo:
        # prepare the teacher caches once, then run jobs in parallel, one thread each
        for setting in names:
            raw = run_config(setting, "prockd", PROCKD_PARAMS, 0, teacher_ckpt, cache_root, quick)
            _prepare_cache(raw, log)
        run_jobs(todo, workers, "demo runs")
    for setting, method, params, seed in jobs:
        run_dir = out / "runs" / setting / method / f"seed{seed}"
        summary = json.loads((run_dir / "final.json").read_text())
        hist = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        summary.update(history=hist, run_dir=str(run_dir))
        results[setting].setdefault(method, []).append(summary)
    table = summarise(results)
    md = format_table(table)
    plots = plot(results, out)
    elapsed = time.perf_counter() - t0
    payload = {"settings": table, "teacher_fmnist": {"test_top1": teacher_summary["final"].get("test/deployed"),
                                                      "params": teacher_summary["student_params"]},
               "elapsed_s": round(elapsed, 1), "quick": quick, "plots": plots,
               "protocol": {"student": STUDENT, "teacher_fmnist": TEACHER_FMNIST, "teacher_imagenet": TEACHER_LITE0,
                            "train": TRAIN, "prockd": PROCKD_PARAMS, "settings": {k: SETTINGS[k] for k in names}}}
    atomic_write_json(out / "results.json", payload)
    atomic_write_text(out / "results.md", md + "\n")
    print(md)
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'} and {', '.join(plots)} in {elapsed / 60:.1f} min")
    return payload
