"""``prockd bench compare``: every method on the same data, models and budget, in the paper's Table-1 shape.

The default benchmark is the embedded one (Fashion-MNIST, see :mod:`prockd.demo`): a ResNet teacher
trained by prockd on classes 0-4 teaches ViT students of two sizes on classes 5-9, in the settings

- ``standard``: 100 labels per class; its runs are also tested on shifted domains (fog, contrast,
  noise corruptions of the test set: the columns ``shifted:*``, the analogue of the paper's
  cross-domain columns);
- ``long_tailed``: exponential long-tailed training set, imbalance factor 100.

A YAML file given with ``--config`` may replace any of ``seeds``, ``workers``, ``methods``
(name -> params), ``students`` (label -> model config), ``settings`` (label -> data overrides),
``data`` (shared data config) and ``base`` (the rest of an experiment config: teacher, train, cache;
without ``base`` the embedded teacher is used). Every run is a resumable run directory under
``OUT/runs/<student>/<setting>/<method>/seed<k>``: an interrupted comparison continues where it stopped.
Writes ``results.json``, ``results.md`` and ``results.csv`` (mean ± std over seeds, best of each
student block in bold, second underlined, a parameter column).
"""
from __future__ import annotations

import copy
import csv
import io
import json
import os
import re
import shutil
import statistics
import time
from pathlib import Path

import yaml

from prockd.config import build_config, deep_merge
from prockd.demo import (CORRUPTIONS, PROCKD_PARAMS, STUDENT, STUDENT_CLASSES, TEACHER_CLASSES, TEACHER_FMNIST, TRAIN,
                         _prepare_cache, output_dirs, pretrained_fmnist_teacher, run_jobs)
from prockd.errors import ProckdError
from prockd.io import atomic_write_json, atomic_write_text

BASELINES = ["fitnets", "rkd", "ab", "ofd", "fbkd", "pkd_projector", "pkd_pearson", "attention_probe", "cwd", "mgd",
             "skd", "vid", "refilled"]
SMALL_STUDENT = deep_merge(STUDENT, {"kwargs": {"depth": 3}})
DEFAULT_SPEC = {
    "seeds": 2,
    "workers": None,
    "methods": {"student_only": {}, **{m: {} for m in BASELINES}, "prockd": PROCKD_PARAMS},
    "students": {"vit-d6": STUDENT, "vit-d3": SMALL_STUDENT},
    "settings": {"standard": {"labels_per_class": 100, "corruptions": CORRUPTIONS},
                 "long_tailed": {"labels_per_class": 100, "imbalance": 100}},
    "data": {"name": "fashion_mnist", "classes": STUDENT_CLASSES, "test_limit": 2000},
    "base": None,
}
SPEC_KEYS = set(DEFAULT_SPEC)


def load_spec(path: str | Path | None, overrides: dict | None = None) -> dict:
    """The comparison spec: defaults, replaced key by key by the YAML file and ``overrides``."""
    spec = copy.deepcopy(DEFAULT_SPEC)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ProckdError(f"comparison config not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ProckdError(f"comparison config {p} is not readable YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ProckdError(f"comparison config {p} must hold a mapping")
        unknown = set(loaded) - SPEC_KEYS
        if unknown:
            raise ProckdError(f"comparison config {p}: unknown key(s) {sorted(unknown)} (known: {sorted(SPEC_KEYS)})")
        spec.update(loaded)
    for k, v in (overrides or {}).items():
        if v is not None:
            spec[k] = v
    for key in ("methods", "students", "settings"):
        if not isinstance(spec[key], dict) or not spec[key]:
            raise ProckdError(f"comparison config: '{key}' must be a non-empty mapping")
    return spec


def _base(spec: dict, cache_root: Path, log) -> tuple[dict, dict]:
    """(experiment base without student/data/method/seed, teacher summary) for the spec."""
    if spec["base"] is not None:
        return copy.deepcopy(spec["base"]), {}
    ckpt, summary = pretrained_fmnist_teacher(cache_root, False, log)
    teacher = dict(copy.deepcopy(TEACHER_FMNIST), checkpoint=str(ckpt))
    base = {"teacher": teacher, "teacher_eval": {"data": {"name": "fashion_mnist", "classes": TEACHER_CLASSES,
                                                           "test_limit": 2000}},
            "train": dict(TRAIN), "cache": {"dir": str(cache_root / "features"), "dtype": "float16"}}
    return base, summary


def run_config(spec: dict, base: dict, student: str, setting: str, method: str, seed: int) -> dict:
    """The experiment config of one comparison run."""
    raw = copy.deepcopy(base)
    raw.update(seed=seed, student=copy.deepcopy(spec["students"][student]),
               data=deep_merge(spec["data"], spec["settings"][setting] or {}),
               method={"name": method, "params": copy.deepcopy(spec["methods"][method] or {})})
    return raw


def _mean_std(v: list[float]) -> tuple[float, float]:
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def collect(spec: dict, out: Path) -> dict:
    """Per student and method: params and, per column, the values over seeds (finished runs only)."""
    table: dict = {}
    shifted_settings = sum(1 for v in spec["settings"].values()
                           if deep_merge(spec["data"], v or {}).get("corruptions"))
    for student in spec["students"]:
        for method in spec["methods"]:
            row = {"params": None, "columns": {}}
            for setting in spec["settings"]:
                for seed in range(spec["seeds"]):
                    f = out / "runs" / student / setting / method / f"seed{seed}" / "final.json"
                    if not f.is_file():
                        continue
                    s = json.loads(f.read_text())
                    row["params"] = s["deployed_params"]
                    for key, v in s["final"].items():
                        m = re.fullmatch(r"(test[^/]*)/deployed", key)
                        if not m:
                            continue
                        name = m.group(1)
                        col = setting if name == "test" else f"shifted:{name.removeprefix('test_').rstrip('0123456789')}"
                        if col.startswith("shifted:") and shifted_settings > 1:
                            col = f"{setting}:{col}"
                        row["columns"].setdefault(col, []).append(v)
            table.setdefault(student, {})[method] = row
    return table


def _columns(table: dict) -> list[str]:
    cols: list[str] = []
    for rows in table.values():
        for row in rows.values():
            for c in row["columns"]:
                if c not in cols:
                    cols.append(c)
    return cols


def _ranks(rows: dict, col: str) -> dict[str, int]:
    means = {m: statistics.fmean(r["columns"][col]) for m, r in rows.items() if r["columns"].get(col)}
    order = sorted(set(means.values()), reverse=True)
    return {m: order.index(v) for m, v in means.items()}


def format_markdown(table: dict, method_names: dict | None = None) -> str:
    """Table-1-shaped Markdown: one block per student, best of each column bold, second underlined."""
    cols = _columns(table)
    lines = ["| student | method | params | " + " | ".join(cols) + " |", "|---" * (3 + len(cols)) + "|"]
    for student, rows in table.items():
        ranks = {c: _ranks(rows, c) for c in cols}
        for method, row in rows.items():
            cells = []
            for c in cols:
                v = row["columns"].get(c)
                if not v:
                    cells.append("–")
                    continue
                m, sd = _mean_std(v)
                text = f"{m:.2f} ± {sd:.2f}"
                r = ranks[c].get(method)
                cells.append(f"**{text}**" if r == 0 else f"<u>{text}</u>" if r == 1 else text)
            params = f"{row['params'] / 1e6:.3f} M" if row["params"] else "–"
            lines.append(f"| {student} | {(method_names or {}).get(method, method)} | {params} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_csv(table: dict) -> str:
    """CSV: student, method, params, then mean, std and n per column."""
    cols = _columns(table)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["student", "method", "params"] + [f"{c}_{k}" for c in cols for k in ("mean", "std", "n")])
    for student, rows in table.items():
        for method, row in rows.items():
            vals = []
            for c in cols:
                v = row["columns"].get(c) or []
                m, sd = _mean_std(v) if v else (None, None)
                vals += [None if m is None else round(m, 3), None if sd is None else round(sd, 3), len(v)]
            w.writerow([student, method, row["params"]] + vals)
    return buf.getvalue()


def standings(table: dict, method: str = "prockd", reference: str = "student_only") -> dict:
    """Per student and column: ``method``'s mean minus the best other method's (and minus ``reference``)."""
    out: dict = {}
    for student, rows in table.items():
        if method not in rows or not rows[method]["columns"]:
            continue
        for c, v in rows[method]["columns"].items():
            others = {m: statistics.fmean(r["columns"][c]) for m, r in rows.items()
                      if m not in (method, reference) and r["columns"].get(c)}
            entry = {"mean": statistics.fmean(v)}
            if others:
                best = max(others, key=others.get)
                entry.update(best_baseline=best, best_baseline_mean=others[best],
                             vs_best_baseline=statistics.fmean(v) - others[best])
            if rows.get(reference, {}).get("columns", {}).get(c):
                entry["vs_" + reference] = statistics.fmean(v) - statistics.fmean(rows[reference]["columns"][c])
            out.setdefault(student, {})[c] = entry
    return out


def run_compare(out: Path, spec: dict, cache_root: Path | None = None) -> dict:
    """Run (or continue) the comparison and write ``results.json`` / ``results.md`` / ``results.csv``."""
    out, cache_root, log_path, log = output_dirs(out, cache_root, "compare.log")
    t0 = time.perf_counter()
    base, teacher_summary = _base(spec, cache_root, log)
    jobs, todo = [], []
    for student in spec["students"]:
        for setting in spec["settings"]:
            for seed in range(spec["seeds"]):
                for method in spec["methods"]:
                    raw = run_config(spec, base, student, setting, method, seed)
                    build_config(raw, f"comparison run {student}/{setting}/{method}/seed{seed}")  # validate all first
                    run_dir = out / "runs" / student / setting / method / f"seed{seed}"
                    jobs.append(run_dir)
                    if (run_dir / "final.json").is_file():
                        continue
                    if run_dir.exists() and not (run_dir / "checkpoints" / "last.pt").is_file():
                        shutil.rmtree(run_dir)  # started but no epoch finished: start it again
                    todo.append((raw, str(run_dir), str(log_path)))
    workers = spec.get("workers") or min(2, os.cpu_count() or 1)
    print(f"prockd bench compare: {len(spec['methods'])} methods x {len(spec['students'])} students x "
          f"{len(spec['settings'])} settings x {spec['seeds']} seeds = {len(jobs)} runs, {len(jobs) - len(todo)} "
          f"already finished; logs in {log_path}", flush=True)
    if todo:
        prepared = set()
        for raw, _, _ in todo:  # build each teacher cache once, before the workers start
            key = json.dumps([raw.get("teacher"), raw["data"]], sort_keys=True, default=str)
            if key not in prepared and raw.get("teacher") and raw.get("cache", {}).get("enabled", True):
                _prepare_cache(raw, log)
                prepared.add(key)
        run_jobs(todo, workers, "comparison runs")
    table = collect(spec, out)
    md = format_markdown(table)
    payload = {"table": table, "standings": standings(table), "elapsed_s": round(time.perf_counter() - t0, 1),
               "spec": spec, "teacher": teacher_summary.get("final", {}).get("test/deployed"),
               "runs": len(jobs)}
    atomic_write_json(out / "results.json", payload)
    atomic_write_text(out / "results.md", md + "\n")
    atomic_write_text(out / "results.csv", format_csv(table))
    print(md)
    for student, cols in payload["standings"].items():
        for c, e in cols.items():
            if "vs_best_baseline" in e:
                print(f"{student} {c}: ProC-KD {e['mean']:.2f} vs best baseline {e['best_baseline']} "
                      f"{e['best_baseline_mean']:.2f} ({e['vs_best_baseline']:+.2f})")
    print(f"wrote {out / 'results.md'}, results.csv, results.json in {payload['elapsed_s'] / 60:.1f} min")
    return payload
