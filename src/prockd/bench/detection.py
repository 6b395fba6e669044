"""The embedded detection benchmark (``prockd demo --task detection``, ``prockd bench compare --task detection``).

A teacher detector trained by prockd on one label space (the 10 digits over 100 fonts: the "COCO" of the
analogue; trained once, cached by its config's hash) teaches students a disjoint label space (8 capital
letters) from 4 training fonts and 160 canvases; students are tested on 40 held-out fonts, clean and foggy
(Table 2's two blocks). Every method runs on the same paired seeds; the table shows per-class AP50 and
mAP50 (mean ± std over seeds) of the validation-selected checkpoint, and each method's paired difference
to student-only with its 95 % interval.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

from prockd.bench.common import mean_std, output_dirs, paired_ci, run_jobs, verdict
from prockd.config import read_config_file
from prockd.io import atomic_write_json, atomic_write_text

CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs" / "detection" / "embedded"
DEMO_METHODS = ("student_only", "cwd", "mgd", "fgd", "skd_zhang_ma", "prockd")
ALL_METHODS = DEMO_METHODS + ("fbkd", "pkd_pearson", "ssim_kd")


def _configs() -> tuple[dict, dict]:
    """(teacher raw config, student raw config) of the embedded benchmark."""
    root = CONFIG_DIR if CONFIG_DIR.is_dir() else Path("configs/detection/embedded")
    return read_config_file(root / "teacher.yaml"), read_config_file(root / "student.yaml")


def quick_sizes(teacher: dict, student: dict) -> None:
    """Smoke sizes (tests): tiny splits, one epoch, a few steps."""
    teacher["data"]["canvas"].update(train_images=16, val_images=8, test_images=8, train_fonts=8)
    teacher["train"].update(epochs=1, max_steps=2)
    student["data"]["canvas"].update(train_images=16, val_images=8, test_images=8)
    student["train"].update(epochs=2, max_steps=None)
    for raw in (teacher, student):
        raw["data"]["num_workers"] = 0


def det_teacher(teacher_raw: dict, cache_root: Path, log, say) -> tuple[Path, dict]:
    """Train (once, cached by the config's hash) the benchmark's teacher detector; (checkpoint, summary)."""
    from prockd.detection.config import build_det_config
    from prockd.detection.engine import pretrain_teacher

    key = hashlib.sha1(json.dumps(teacher_raw, sort_keys=True).encode()).hexdigest()[:16]
    run_dir = cache_root / "det_teachers" / key
    ckpt = run_dir / "teacher.pt"
    if ckpt.is_file() and (run_dir / "final.json").is_file():
        return ckpt, json.loads((run_dir / "final.json").read_text())
    cfg = build_det_config(teacher_raw, "benchmark teacher")
    say(f"pretraining the benchmark's teacher detector ({cfg.train.epochs} epochs, "
        f"{cfg.data.canvas.train_images} canvases of '{cfg.data.canvas.charset}') in {run_dir}")
    pretrain_teacher(cfg, run_dir, log=lambda m: (log(m), say(m)))
    return ckpt, json.loads((run_dir / "final.json").read_text())


def run_detection_compare(out: Path, seeds: int = 3, methods: tuple[str, ...] = DEMO_METHODS,
                          workers: int | None = None, quick: bool = False, cache_root: Path | None = None,
                          params: dict | None = None, say=print) -> dict:
    """Teacher (cached), every method x seed (parallel, resumable), the table; writes ``results.{json,md}``."""
    from prockd.bench.common import default_workers

    out, cache_root, log_path, log = output_dirs(out, cache_root, "compare.log")
    teacher_raw, student_raw = _configs()
    if quick:
        quick_sizes(teacher_raw, student_raw)
    for raw in (teacher_raw, student_raw):
        raw["data"]["canvas"]["cache_dir"] = str(cache_root / "data" / "canvas")
    ckpt, t_summary = det_teacher(teacher_raw, cache_root, log, say)
    t_sel = t_summary.get("selected") or {}
    say(f"teacher detector: {ckpt} (its own held-out-font test mAP50 {t_sel.get('test/mAP50', float('nan')):.1f})")
    teacher_section = copy.deepcopy(teacher_raw["student"])
    teacher_section.update(checkpoint=str(ckpt), backbone_weights="none")
    todo = []
    for m in methods:
        for s in range(seeds):
            run_dir = out / m / f"seed{s}"
            if (run_dir / "final.json").is_file():
                continue
            raw = copy.deepcopy(student_raw)
            raw.update(seed=s, out=str(run_dir), method={"name": m, "params": (params or {}).get(m, {})})
            raw["train"] = dict(raw["train"], progress=False)
            if m != "student_only":
                raw["teacher"] = teacher_section
            todo.append((raw, str(run_dir), str(log_path)))
    from prockd.detection.engine import open_data
    from prockd.detection.config import build_det_config

    open_data(build_det_config(dict(student_raw, teacher=None)), log=say)  # render the canvases once, not per worker
    say(f"{len(todo)} runs to go ({len(methods)} methods x {seeds} seeds); log: {log_path}")
    run_jobs(todo, workers or default_workers(), "detection runs")
    table = collect(out, methods, seeds)
    table["teacher"] = {"checkpoint": str(ckpt), "selected": t_sel}
    md = format_table(table)
    atomic_write_json(out / "results.json", table)
    atomic_write_text(out / "results.md", md)
    say(md)
    return table


def collect(out: Path, methods, seeds: int) -> dict:
    """Per method: per-seed selected metrics of each test set; mean ± std; paired difference to student-only."""
    res: dict = {"methods": {}, "seeds": seeds}
    for m in methods:
        runs = []
        for s in range(seeds):
            p = out / m / f"seed{s}" / "final.json"
            if p.is_file():
                summary = json.loads(p.read_text())
                runs.append(summary.get("selected") or summary["final"])
        res["methods"][m] = runs
    tests = sorted({k.split("/")[0] for runs in res["methods"].values() for r in runs for k in r
                    if k.startswith("test")})
    res["tests"] = tests
    stats: dict = {}
    base = res["methods"].get("student_only", [])
    for m, runs in res["methods"].items():
        st = {}
        for key in sorted({k for r in runs for k in r if "/AP50/" in k or k.endswith("/mAP50") or k.endswith("/AP")}):
            vals = [r[key] for r in runs if key in r]
            mu, sd = mean_std(vals) if vals else (float("nan"), 0.0)
            st[key] = {"mean": round(mu, 2), "std": round(sd, 2), "n": len(vals)}
            if m != "student_only" and key.endswith("mAP50") and len(base) == len(runs) and len(runs) > 1:
                ci = paired_ci([r[key] for r in runs], [r[key] for r in base])
                st[key]["vs_student"] = dict(ci, verdict=verdict(ci))
        stats[m] = st
    res["stats"] = stats
    return res


def format_table(table: dict) -> str:
    """Table-2-shaped markdown: one block per test set, per-class AP50 and mAP50, Δ mAP50 vs student-only."""
    lines = []
    stats = table["stats"]
    for test in table["tests"]:
        classes = sorted({k.split("/")[2] for st in stats.values() for k in st if k.startswith(f"{test}/AP50/")})
        lines += [f"\n### {test} (AP50 %, mean ± std over {table['seeds']} seeds, validation-selected checkpoints)\n",
                  "| method | " + " | ".join(classes) + " | mAP50 | Δ mAP50 vs student (95 % CI) |",
                  "|---" * (len(classes) + 3) + "|"]
        for m, st in stats.items():
            cells = [f"{st[f'{test}/AP50/{c}']['mean']:.1f}" if f"{test}/AP50/{c}" in st else "–" for c in classes]
            e = st.get(f"{test}/mAP50")
            cell = f"{e['mean']:.1f} ± {e['std']:.1f}" if e else "–"
            d = (e or {}).get("vs_student")
            dc = f"{d['mean']:+.1f} ± {d['ci95']:.1f} ({d['verdict']})" if d and d.get("ci95") is not None else ""
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {cell} | {dc} |")
    return "\n".join(lines) + "\n"
