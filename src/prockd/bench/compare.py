"""``prockd bench compare``: every method on the same data, models, recipe and seeds, in the paper's Table-1 shape,
with an honest protocol (docs/benchmarks.md, "The protocol"):

- **validation**: every run selects its checkpoint (``best.pt``) on a validation split carved from the training
  data; the table reports the test accuracy of that checkpoint, never a test-selected one;
- **paired seeds**: seed k of every method shares the data order, the augmentation and the student's
  initialisation; the table gives mean ± std over seeds and, against student-only and against the best
  baseline, the mean paired difference with its 95 % Student-t interval;
- **equal tuning** (``--tune``): every method gets the same budget — one configuration per factor of
  ``tune_factors`` multiplying its main loss weights together (``Distiller.main_weights``) — run on
  ``tune_seeds`` seeds of their own (1000, 1001, ...) on the first student and the first setting, scored by
  the mean validation accuracy over the last fifth of the epochs (validation only); the final table then runs each method's chosen configuration on fresh seeds 0..n-1
  (``first_seed`` k: k..k+n-1);
- **knowledge gap**: per setting, linear probes on the frozen teacher's pooled taps and on pixels
  (:mod:`prockd.classification.probe`), and the student-only convergence evidence (validation gain over the last fifth of the
  epochs, student-only test accuracy against the pixel probe).

The spec is a benchmark suite (:mod:`prockd.bench.suites`, ``--suite``; default ``glyphs``) whose keys a YAML file
(``--config``) may replace: ``seeds``, ``workers``, ``methods`` (name -> params), ``students`` (label -> model
config, with an optional ``train``: that student's recipe), ``settings`` (label -> data overrides; a ``train`` key
in one overrides the training recipe of every method in that column), ``data``, ``base`` (teacher, train, cache: your own teacher and data), ``tune_seeds``,
``tune_factors``. Every run is a resumable run directory: an interrupted comparison
continues where it stopped. Writes ``results.json``, ``results.md``, ``results.csv``, ``curves.png`` and, when
ProC-KD ran, ``prototypes.png``.
"""
from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch
import yaml

from prockd.bench.common import (
    CLAIM_SEEDS,
    default_workers,
    mean_std,
    method_of,
    output_dirs,
    paired_ci,
    prepare_cache,
    pretrained_teacher,
    run_jobs,
    scaled,
    split_recipe,
)
from prockd.bench.suites import get_suite
from prockd.classification.config import build_config
from prockd.classification.data import build_task
from prockd.classification.methods import METHODS, method_params
from prockd.classification.models import Teacher, create_model
from prockd.classification.probe import probe_task
from prockd.core.config import deep_merge
from prockd.core.io import atomic_write_json, atomic_write_text
from prockd.errors import ProckdError

SPEC_KEYS = {"suite", "seeds", "first_seed", "workers", "methods", "students", "settings", "data", "base", "tune_seeds",
             "tune_factors"}
REFERENCE = "student_only"
PROPOSED = "prockd"


def proposed(label: str) -> bool:
    """Whether a table label is a ProC-KD row (its paired differences are reported, it is no baseline)."""
    return method_of(label) == PROPOSED


def load_spec(path: str | Path | None = None, overrides: dict | None = None, suite: str | None = None,
              extra: dict | None = None) -> dict:
    """The comparison spec: the suite's defaults, replaced key by key by the YAML file (or the mapping ``extra``,
    the Python API's spec) and ``overrides``."""
    loaded: dict = dict(extra or {})
    if extra is not None:
        unknown = set(loaded) - SPEC_KEYS
        if unknown:
            raise ProckdError(f"comparison spec: unknown key(s) {sorted(unknown)} (known: {sorted(SPEC_KEYS)})")
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
    s = get_suite(suite or loaded.get("suite") or "glyphs")
    if s.task != "classification":
        raise ProckdError(f"suite '{s.name}' is a {s.task} benchmark: run it with 'prockd bench compare --suite "
                          f"{s.name}' (its methods, seeds and weights come from the suite, not from a spec file)")
    spec = {"suite": s.name, "seeds": s.seeds, "first_seed": 0, "workers": None, "methods": s.methods, "students": s.students,
            "settings": s.settings, "data": s.data, "base": None, "tune_seeds": 2, "tune_factors": s.tune_factors}
    spec.update(loaded)
    spec["source"] = str(path) if path is not None else ("a spec passed from Python" if extra is not None else None)
    for k, v in (overrides or {}).items():
        if v is not None:
            spec[k] = v
    for key in ("methods", "students", "settings"):
        if not isinstance(spec[key], dict) or not spec[key]:
            raise ProckdError(f"comparison config: '{key}' must be a non-empty mapping")
    if not isinstance(spec["seeds"], int) or spec["seeds"] < 1:
        raise ProckdError(f"comparison config: 'seeds' must be a positive integer, not {spec['seeds']!r}")
    if not isinstance(spec["first_seed"], int) or spec["first_seed"] < 0:
        raise ProckdError(f"comparison config: 'first_seed' must be a non-negative integer, not {spec['first_seed']!r}")
    return spec


def _seed_span(spec: dict) -> str:
    seeds = final_seeds(spec)
    return f" ({seeds[0]}-{seeds[-1]})" if seeds[0] else ""


def final_seeds(spec: dict) -> range:
    """The final table's paired seeds: ``first_seed`` .. ``first_seed + seeds - 1`` (fresh seeds whose test sets no
    earlier choice read, without rerunning the earlier ones)."""
    return range(spec.get("first_seed", 0), spec.get("first_seed", 0) + spec["seeds"])


def _base(spec: dict, cache_root: Path, log, say, shipped_teacher: bool = True) -> tuple[dict, dict]:
    """(experiment base without student/data/method/seed, teacher summary) for the spec; the suite's teacher is
    the shipped one when ``shipped_teacher`` and this machine's fonts allow (:func:`pretrained_teacher`)."""
    if spec["base"] is not None:
        return copy.deepcopy(spec["base"]), {}
    s = get_suite(spec["suite"])
    ckpt, summary = pretrained_teacher(s.teacher_run, cache_root, log, say, shipped=shipped_teacher)
    return suite_base(spec, ckpt, cache_root), summary


def suite_base(spec: dict, checkpoint: str | Path, cache_root: Path) -> dict:
    """The experiment base of the spec's suite (teacher, its evaluation, the training recipe, the feature cache)
    around a teacher checkpoint, without student / data / method / seed."""
    s = get_suite(spec["suite"])
    return {"teacher": dict(copy.deepcopy(s.teacher), checkpoint=str(checkpoint)), "teacher_eval": s.teacher_eval,
            "train": dict(s.train), "cache": {"dir": str(cache_root / "features"), "dtype": "float16"}}


def run_config(spec: dict, base: dict, student: str, setting: str, method: str, params: dict, seed: int) -> dict:
    """The experiment config of one comparison run. The training recipe is the base's, then the student's ``train``
    (its family's recipe, e.g. a ViT's learning rate), then the column's ``train`` (every method in it), then the
    method's own ``train`` (a row's screened recipe, e.g. its noise level); a row's ``teacher`` section is merged over
    the base's teacher (``finetune``: the teacher fine-tuned on the task)."""
    raw = copy.deepcopy(base)
    column = copy.deepcopy(spec["settings"][setting] or {})
    train = column.pop("train", None)  # a column's recipe for every method in it (e.g. train.student_noise)
    net = copy.deepcopy(spec["students"][student])
    student_train = net.pop("train", None)  # a student's recipe for every row and column
    params, own = split_recipe(params)
    own = own or {}
    raw.update(seed=seed, student=net, data=deep_merge(spec["data"], column),
               method={"name": method_of(method), "params": params})
    for recipe in (student_train, train, own.get("train")):
        if recipe:
            raw["train"] = deep_merge(raw.get("train") or {}, recipe)
    if own.get("teacher"):  # the row's teacher options (teacher.finetune: distil the teacher fine-tuned on the task)
        raw["teacher"] = deep_merge(raw.get("teacher") or {}, own["teacher"])
    return raw


def _tag(params: dict) -> str:
    return hashlib.sha1(json.dumps(params or {}, sort_keys=True).encode()).hexdigest()[:8]


def _queue(raw: dict, run_dir: Path, log_path: Path, todo: list) -> None:
    method_params(build_config(raw, f"comparison run {run_dir}"))  # every config is validated before anything starts
    if (run_dir / "final.json").is_file():
        return
    if run_dir.exists() and not (run_dir / "checkpoints" / "last.pt").is_file():
        shutil.rmtree(run_dir)  # started but no epoch finished: start it again
    todo.append((raw, str(run_dir), str(log_path)))


class Phases:
    """Wall-clock seconds per phase of a comparison, printed at its end and kept in ``results.json``."""

    def __init__(self):
        self.s: dict[str, float] = {}
        self.t = time.perf_counter()

    def lap(self, name: str) -> None:
        """Charge the time since the previous lap to ``name``."""
        now = time.perf_counter()
        self.s[name] = round(self.s.get(name, 0.0) + now - self.t, 1)
        self.t = now

    def line(self) -> str:
        """One line: each phase's minutes and share."""
        total = sum(self.s.values()) or 1.0
        return "time by phase: " + ", ".join(f"{k} {v / 60:.1f} min ({100 * v / total:.0f} %)" for k, v in self.s.items())


def _execute(todo: list, spec: dict, log, desc: str, phases: Phases | None = None) -> None:
    if not todo:
        return
    prepared = set()
    for raw, _, _ in todo:  # build each teacher cache once, before the workers start
        fine = getattr(METHODS.get(method_of(raw["method"]["name"])), "needs_finetune", False)
        key = json.dumps([raw.get("teacher"), raw["data"], raw.get("train"), fine], sort_keys=True, default=str)
        if key not in prepared and raw.get("teacher") and raw.get("cache", {}).get("enabled", True):
            prepare_cache(raw, log)
            prepared.add(key)
    if phases:
        phases.lap("queue and teacher feature cache")
    workers = spec.get("workers") or default_workers()
    todo.sort(key=lambda job: expected_cost(job[0]), reverse=True)  # longest first: no core idles at the end
    run_jobs(todo, workers, desc)
    if phases:
        phases.lap(f"{desc} ({len(todo)}, {min(workers, len(todo))} at a time)")


def expected_cost(raw: dict) -> int:
    """A run's expected duration as a rank, for ordering a queue longest first (a stable sort keeps seeds in order
    within a rank): 3 ProC-KD (a live teacher forward on every step's mixtures or a cache read, plus PL and FA), 2 a
    distiller with function matching (a live teacher forward every step), 1 another distiller, 0 a method without a
    teacher. Measured in the demo, two runs at a time on 2 cores: ProC-KD 78 s, PKD-projector 45 s, student-only
    33 s; queued seed by seed, the last ProC-KD run ran alone for a minute while the other core idled."""
    cls, params = method_params(build_config(raw, "comparison run"))
    if not cls.needs_teacher:
        return 0
    if method_of(raw["method"]["name"]) == PROPOSED:
        return 3
    return 2 if getattr(params, "function_matching", "none") != "none" else 1


def _score(run_dir: Path) -> float | None:
    """A finished run's tuning score: its mean validation accuracy over the last fifth of the epochs (one
    evaluation's maximum on a small split is mostly noise). The test sets are never read here."""
    if not (run_dir / "final.json").is_file():
        return None
    hist = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    curve = [(h["epoch"] + 1, h["val/deployed"]) for h in hist if "val/deployed" in h]
    if not curve:
        return None
    tail = [v for e, v in curve if e >= 0.8 * curve[-1][0]]
    return statistics.fmean(tail)


def with_earlier_rows(out: Path, spec: dict, methods: dict) -> tuple[dict, dict, list[str], dict]:
    """(spec, methods, labels kept, the earlier columns' probes) for the table of ``out``: an earlier comparison
    written there (``results.json``) keeps its rows, students, columns, seeds and probes beside this run's (this run's
    parameters win for a label both have), so a run on a subset (``--methods``, ``--settings``, ``--seeds``) adds to
    the table instead of replacing it. An earlier comparison of another suite, data or base is refused: its rows
    would not be comparable."""
    path = out / "results.json"
    if not path.is_file():
        return spec, methods, [], {}
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return spec, methods, [], {}
    prev = old.get("spec") or {}
    for key in ("suite", "data", "base"):
        if key in prev and json.dumps(prev[key], sort_keys=True) != json.dumps(spec.get(key), sort_keys=True):
            raise ProckdError(f"{out} holds a comparison with another '{key}' ({path}): its rows are not comparable "
                              "with these; use a new --out")
    merged = dict(spec)
    for key in ("students", "settings"):
        merged[key] = {**(prev.get(key) or {}), **spec[key]}
    lo = min(prev.get("first_seed", 0), spec.get("first_seed", 0))
    hi = max(prev.get("first_seed", 0) + prev.get("seeds", 0), spec.get("first_seed", 0) + spec["seeds"])
    merged["first_seed"], merged["seeds"] = lo, hi - lo
    earlier = {m: p for m, p in (old.get("methods") or {}).items() if m not in methods}
    probes = {c: v["probe"] for c, v in (old.get("settings") or {}).items() if v.get("probe")}
    return merged, {**earlier, **methods}, sorted(earlier), probes


def tune(spec: dict, base: dict, out: Path, log_path: Path, log, say=print, phases: Phases | None = None) -> dict:
    """Choose every method's configuration on validation with an equal budget; returns
    ``{method: {"params", "factor", "scores": {factor: mean val}}}``."""
    student, setting = next(iter(spec["students"])), next(iter(spec["settings"]))
    factors = [float(f) for f in spec["tune_factors"]]
    seeds = [1000 + k for k in range(spec["tune_seeds"])]
    todo, grid = [], {}

    for method, params in spec["methods"].items():
        fs = factors if METHODS.get(method_of(method)).main_weights else [1.0]
        grid[method] = {f: scaled(METHODS, method_of(method), params, f) for f in fs}
        for f, p in grid[method].items():
            for seed in seeds:
                rd = out / "runs" / "tune" / student / setting / method / f"x{f:g}" / f"seed{seed}"
                _queue(run_config(spec, base, student, setting, method, p, seed), rd, log_path, todo)
    total = sum(len(g) for g in grid.values()) * len(seeds)
    say(f"tuning: {len(grid)} methods, {len(factors)} configurations each over their main weights "
        f"(x{', x'.join(f'{f:g}' for f in factors)}), seeds {seeds}, on {student} / {setting}, scored on validation: "
        f"{total} runs, {total - len(todo)} already finished")
    _execute(todo, spec, log, "tuning runs", phases)
    chosen = {}
    for method, g in grid.items():
        scores = {}
        for f in g:
            vals = [_score(out / "runs" / "tune" / student / setting / method / f"x{f:g}" / f"seed{s}") for s in seeds]
            vals = [v for v in vals if v is not None]
            scores[f"{f:g}"] = round(statistics.fmean(vals), 3) if vals else None
        best = max(g, key=lambda f: (scores[f"{f:g}"] if scores[f"{f:g}"] is not None else -1, -abs(f - 1)))
        chosen[method] = {"params": g[best], "factor": best, "scores": scores}
        line = f"  {method}: validation {scores} -> x{best:g}"
        shifted = shifted_validation([out / "runs" / "tune" / student / setting / method / f"x{best:g}" / f"seed{s}"
                                      for s in seeds])
        if shifted and scores[f"{best:g}"] is not None:  # a column with shifts: its robustness screen's score
            chosen[method]["shifted_val"] = shifted
            chosen[method]["robust_score"] = round(statistics.fmean([scores[f"{best:g}"], *shifted.values()]), 3)
            line += f"; shifted validation {shifted}, robust score {chosen[method]['robust_score']}"
        say(line)
    return chosen


def shifted_validation(run_dirs: list[Path]) -> dict[str, float]:
    """Mean over finished runs of their chosen checkpoint's accuracy on each shifted copy of the validation split
    (``val_<kind><severity>/deployed`` in ``final.json``'s ``selected``); empty when the column has no shifts. With
    the clean validation score it makes a robustness screen's score (their mean; docs/research/method-log.md, "Robustness
    through the teacher"); no test set is read."""
    per: dict[str, list[float]] = {}
    for rd in run_dirs:
        f = rd / "final.json"
        if not f.is_file():
            continue
        for key, v in (json.loads(f.read_text()).get("selected") or {}).items():
            if key.startswith("val_") and key.endswith("/deployed") and v is not None:
                per.setdefault(key.split("/")[0].removeprefix("val_"), []).append(v)
    return {k: round(statistics.fmean(v), 3) for k, v in per.items()}


def collect(spec: dict, out: Path, methods: dict) -> dict:
    """``{student: {method: {"params", "columns": {column: {seed: test %}}, "curves": [...]}}}`` from the
    finished final runs; a column is a setting (its ``test`` set) or ``setting:<shifted test set>``."""
    table: dict = {}
    for student in spec["students"]:
        for method, params in methods.items():
            row = {"params": None, "columns": {}, "curves": {}, "selected_epochs": [],
                   "cost": {"wall_s": [], "teacher_live": [], "teacher_cached": [], "finetunes": {}}}
            for setting in spec["settings"]:
                for seed in final_seeds(spec):
                    rd = out / "runs" / "final" / student / setting / f"{method}-{_tag(params)}" / f"seed{seed}"
                    f = rd / "final.json"
                    if not f.is_file():
                        continue
                    s = json.loads(f.read_text())
                    row["params"] = s["deployed_params"]
                    cost = row["cost"]
                    if s.get("wall_s") is not None:
                        cost["wall_s"].append(s["wall_s"])
                    if s.get("teacher_images"):
                        cost["teacher_live"].append(s["teacher_images"]["live"])
                        cost["teacher_cached"].append(s["teacher_images"]["cached"])
                    if s.get("finetune"):
                        cost["finetunes"][s["finetune"]["key"]] = s["finetune"]["wall_s"]
                    metrics = s.get("selected") or s["final"]
                    if s.get("selected"):
                        row["selected_epochs"].append(s["selected"]["epoch"])
                    for key, v in metrics.items():
                        if not (key.startswith("test") and key.endswith("/deployed")):
                            continue
                        name = key.split("/")[0]
                        col = setting if name == "test" else f"{setting}:{name.removeprefix('test_')}"
                        row["columns"].setdefault(col, {})[seed] = v
                    hist = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines() if x.strip()]
                    row["curves"].setdefault(setting, []).append(
                        [(h["epoch"] + 1, h["val/deployed"]) for h in hist if "val/deployed" in h])
            table.setdefault(student, {})[method] = row
    return table


def columns(table: dict) -> list[str]:
    """Column names in order of appearance."""
    cols: list[str] = []
    for rows in table.values():
        for row in rows.values():
            for c in row["columns"]:
                if c not in cols:
                    cols.append(c)
    return cols


def statistics_table(table: dict) -> dict:
    """Per student, column and method: mean, std, seeds, values and the paired differences (with 95 % CI)
    against student-only and against the best other baseline (by mean; student-only and ProC-KD excluded). With
    several student-only rows (``student_only@NAME``, e.g. one with its own screened recipe) a row is also paired
    with the best of them (``vs_best_student_only``); none of them is a baseline."""
    res: dict = {}
    for student, rows in table.items():
        for col in columns(table):
            cells = {m: r["columns"][col] for m, r in rows.items() if r["columns"].get(col)}
            means = {m: statistics.fmean(v.values()) for m, v in cells.items()}
            entry = {}
            for m, v in cells.items():
                seeds = sorted(v)

                def paired(other: str) -> dict:  # m against another row, on the seeds both ran
                    common = [s for s in seeds if s in cells[other]]
                    return paired_ci([v[s] for s in common], [cells[other][s] for s in common])

                mu, sd = mean_std([v[s] for s in seeds])
                e = {"mean": round(mu, 3), "std": round(sd, 3), "seeds": seeds, "values": [round(v[s], 3) for s in seeds]}
                if m != REFERENCE and REFERENCE in cells:
                    e["vs_student_only"] = paired(REFERENCE)
                refs = {b: means[b] for b in cells if b != m and method_of(b) == REFERENCE}
                if len(refs) > 1 or (refs and REFERENCE not in refs):
                    best = max(refs, key=refs.get)
                    e["vs_best_student_only"] = dict(paired(best), reference=best)
                others = {b: means[b] for b in cells if b != m and method_of(b) != REFERENCE and not proposed(b)}
                if others and method_of(m) != REFERENCE:
                    best = max(others, key=others.get)
                    e["vs_best_baseline"] = dict(paired(best), baseline=best)
                entry[m] = e
            res.setdefault(student, {})[col] = entry
    return res


def convergence(table: dict) -> dict:
    """Student-only's validation gain over the last fifth of the epochs (mean over seeds), per student and setting."""
    out: dict = {}
    for student, rows in table.items():
        for setting, curves in rows.get(REFERENCE, {}).get("curves", {}).items():
            gains = []
            for c in curves:
                if len(c) < 2:
                    continue
                last_epoch = c[-1][0]
                start = next(v for e, v in c if e >= 0.8 * last_epoch)
                gains.append(c[-1][1] - start)
            if gains:
                out.setdefault(student, {})[setting] = {"val_gain_last_fifth": round(statistics.fmean(gains), 3),
                                                        "runs": len(gains)}
    return out


def cost_table(table: dict) -> dict:
    """Per student and row, what its runs cost on the machine that ran them: mean wall time of a run (its epochs,
    set-up and evaluation), mean teacher forwards per run (images through the teacher in the run's own process, and
    teacher features read from the comparison's cache, computed once for every row that shares it), and the teacher
    fine-tunes its runs used (``teacher.finetune``), each counted once with its own wall time."""
    out: dict = {}
    for student, rows in table.items():
        for m, row in rows.items():
            c = row.get("cost") or {}
            if not c.get("wall_s"):
                continue
            ft = c.get("finetunes") or {}
            out.setdefault(student, {})[m] = {
                "runs": len(c["wall_s"]), "run_wall_s": round(statistics.fmean(c["wall_s"]), 1),
                "teacher_live": round(statistics.fmean(c["teacher_live"])) if c.get("teacher_live") else 0,
                "teacher_cached": round(statistics.fmean(c["teacher_cached"])) if c.get("teacher_cached") else 0,
                "finetunes": len(ft), "finetune_wall_s": round(sum(ft.values()), 1)}
    return out


def machine() -> str:
    """The machine a comparison ran on, in words (its costs are this machine's)."""
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{os.cpu_count()} CPU cores ({platform.machine()}){gpu}, torch {torch.__version__}"


def format_costs(costs: dict, where: str) -> str:
    """The cost table in Markdown (one row per student and method)."""
    lines = [f"What each row cost on this machine ({where}; runs of one comparison share its cores):", "",
             "| student | method | runs | wall time per run (s) | teacher forwards per run: live / from cache | "
             "teacher fine-tune (once) |", "|---|---|---|---|---|---|"]
    for student, rows in costs.items():
        for m, c in rows.items():
            ft = f"{c['finetune_wall_s']:.0f} s ({c['finetunes']} fine-tune{'s' if c['finetunes'] != 1 else ''})" \
                if c["finetunes"] else "–"
            lines.append(f"| {student} | {m} | {c['runs']} | {c['run_wall_s']:.0f} | {c['teacher_live']:,} / "
                         f"{c['teacher_cached']:,} | {ft} |")
    return "\n".join(lines)


def _cell(e: dict | None, rank: int | None) -> str:
    if not e:
        return "–"
    text = f"{e['mean']:.2f} ± {e['std']:.2f}"
    return f"**{text}**" if rank == 0 else f"<u>{text}</u>" if rank == 1 else text


def _diff(ci: dict | None) -> str:
    if not ci:
        return "–"
    if ci.get("ci95") is None:
        return f"{ci['mean']:+.2f}"
    return f"{ci['mean']:+.2f} [{ci['mean'] - ci['ci95']:+.2f}, {ci['mean'] + ci['ci95']:+.2f}]"


def format_markdown(stats: dict, params: dict, probes: dict | None = None) -> str:
    """Table-1-shaped Markdown (best of a column per student bold, second underlined), then ProC-KD's paired
    differences with 95 % intervals, then the linear probes."""
    cols = list(dict.fromkeys(c for per in stats.values() for c in per))
    lines = ["| student | method | params | " + " | ".join(cols) + " |", "|---" * (3 + len(cols)) + "|"]
    for student, per_col in stats.items():
        methods = list(dict.fromkeys(m for c in per_col.values() for m in c))
        ranks = {}
        for c, cells in per_col.items():
            order = sorted({e["mean"] for e in cells.values()}, reverse=True)
            ranks[c] = {m: order.index(e["mean"]) for m, e in cells.items()}
        for m in methods:
            p = params.get(student, {}).get(m)
            cells = [_cell(per_col[c].get(m), ranks[c].get(m)) for c in cols]
            lines.append(f"| {student} | {m} | {p / 1e6:.3f} M | " if p else f"| {student} | {m} | – | ")
            lines[-1] += " | ".join(cells) + " |"
    rows = list(dict.fromkeys(m for per in stats.values() for c in per.values() for m in c if proposed(m)))
    for m in rows:
        lines += ["", f"Paired differences of {m} (mean [95 % CI], points; seed k against seed k):", "",
                  "| student | versus | " + " | ".join(cols) + " |", "|---" * (2 + len(cols)) + "|"]
        for student, per_col in stats.items():
            lines.append(f"| {student} | student_only | " + " | ".join(
                _diff(per_col[c].get(m, {}).get("vs_student_only")) for c in cols) + " |")
            refs = [per_col[c].get(m, {}).get("vs_best_student_only") for c in cols]
            if any(refs):
                lines.append(f"| {student} | best student-only | " + " | ".join(
                    f"{_diff(r)} ({r['reference']})" if r else "–" for r in refs) + " |")
            best = [per_col[c].get(m, {}).get("vs_best_baseline") for c in cols]
            lines.append(f"| {student} | best baseline | " + " | ".join(
                f"{_diff(b)} ({b['baseline']})" if b else "–" for b in best) + " |")
    if probes:
        lines += ["", "Linear probes on the student's training set (test accuracy, %): the knowledge gap", "",
                  "| column | teacher features | pixels | gap |", "|---|---|---|---|"]
        for c, p in probes.items():
            lines.append(f"| {c} | {p['teacher']:.2f} | {p['pixels']:.2f} | {p['teacher'] - p['pixels']:+.2f} |")
    notes = reading_notes(stats, probes)
    if notes:
        lines += ["", "Reading this table:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


WIDE = 5.0  # a paired interval's half-width (points) above which a comparison cannot tell rows apart
SMALL_GAP = 10.0  # a probe gap (points) below which the teacher knows little the student's pixels do not


def reading_notes(stats: dict, probes: dict | None = None) -> list[str]:
    """What the table can and cannot say, in sentences: paired intervals too wide (or too few seeds) to decide, and
    columns where the teacher's features know little beyond the pixels (a small knowledge gap)."""
    notes = []
    seeds = [len(e["seeds"]) for per in stats.values() for cells in per.values() for e in cells.values()]
    halves = [d["ci95"] for per in stats.values() for cells in per.values() for e in cells.values()
              for d in (e.get("vs_student_only"), e.get("vs_best_baseline")) if d]
    if seeds and min(seeds) < CLAIM_SEEDS:
        notes.append(f"{min(seeds)} paired seed{'s' if min(seeds) != 1 else ''} in some cells: fewer than "
                     f"{CLAIM_SEEDS} cannot support a claim; rerun with --seeds {CLAIM_SEEDS} or more")
    wide = [h for h in halves if h is None or h > WIDE]
    if wide:
        notes.append(f"{len(wide)} of {len(halves)} paired intervals are wider than ±{WIDE:g} points (or rest on one "
                     "seed): they cannot tell those rows apart, whatever the sign of the mean; add seeds")
    if halves and not wide:
        notes.append(f"a paired interval that holds 0 means no difference, whatever its mean's sign (every interval "
                     f"here is within ±{WIDE:g} points)")
    for c, p in (probes or {}).items():
        gap = p["teacher"] - p["pixels"]
        if gap < SMALL_GAP:
            notes.append(f"column {c}: a linear probe on the teacher's features is only {gap:+.2f} points from one on "
                         "the pixels: the teacher knows little about this task that the student's pixels do not, so "
                         "no row's lead there can be transfer of the teacher's knowledge")
    return notes


def format_csv(stats: dict, costs: dict | None = None) -> str:
    """CSV: student, column, method, mean, std, n, the paired differences with their CI half-widths, and the row's
    cost (:func:`cost_table`: wall time per run, teacher forwards per run live and from the cache, fine-tune time)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["student", "column", "method", "mean", "std", "n", "vs_student_only", "vs_student_only_ci95",
                "vs_best_baseline", "vs_best_baseline_ci95", "best_baseline", "vs_best_student_only",
                "vs_best_student_only_ci95", "best_student_only", "run_wall_s", "teacher_forwards_live",
                "teacher_forwards_cached", "finetune_wall_s"])
    for student, per_col in stats.items():
        for c, cells in per_col.items():
            for m, e in cells.items():
                a, b = e.get("vs_student_only") or {}, e.get("vs_best_baseline") or {}
                r = e.get("vs_best_student_only") or {}
                k = ((costs or {}).get(student) or {}).get(m) or {}
                w.writerow([student, c, m, e["mean"], e["std"], len(e["seeds"]), a.get("mean"), a.get("ci95"),
                            b.get("mean"), b.get("ci95"), b.get("baseline"), r.get("mean"), r.get("ci95"),
                            r.get("reference"), k.get("run_wall_s"), k.get("teacher_live"), k.get("teacher_cached"),
                            k.get("finetune_wall_s")])
    return buf.getvalue()


def probe_settings(spec: dict, base: dict, out: Path, log, say=print) -> dict:
    """Linear probes (teacher features vs pixels) per column, cached in ``out/probes.json``."""
    path = out / "probes.json"
    key = hashlib.sha1(json.dumps([base.get("teacher"), spec["data"], spec["settings"]], sort_keys=True,
                                  default=str).encode()).hexdigest()[:12]
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached["columns"]
    if not base.get("teacher"):
        return {}

    say("linear probes: teacher features vs pixels on each setting's training set")
    cols = {}
    teacher = None
    for setting in spec["settings"]:
        cfg = build_config(run_config(spec, base, next(iter(spec["students"])), setting, REFERENCE, {}, 0), "probe")
        teacher = teacher or Teacher(create_model(cfg.teacher, None, "teacher"), cfg.teacher)
        r = probe_task(teacher, build_task(cfg.data))
        for name in r["teacher"]:
            col = setting if name == "test" else f"{setting}:{name.removeprefix('test_')}"
            cols[col] = {"teacher": round(r["teacher"][name], 3), "pixels": round(r["pixels"][name], 3),
                         "train_images": r["train_images"]}
            say(f"  {col}: teacher {r['teacher'][name]:.2f} %, pixels {r['pixels'][name]:.2f} %, "
                f"gap {r['gap'][name]:+.2f}")
            log(f"probe {col}: {cols[col]}")
    atomic_write_json(path, {"key": key, "columns": cols})
    return cols


def plot(table: dict, out: Path, methods: dict) -> list[str]:
    """``curves.png`` (mean validation curve per method and setting, first student) and ``prototypes.png``
    (ProC-KD's prototype distance matrices before and after learning, paper Fig. 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    student = next(iter(table))
    settings = list(dict.fromkeys(s for r in table[student].values() for s in r["curves"]))
    if settings:
        fig, axes = plt.subplots(1, len(settings), figsize=(4.4 * len(settings), 3.5), squeeze=False)
        for ax, setting in zip(axes[0], settings):
            for m, row in table[student].items():
                curves = [c for c in row["curves"].get(setting, []) if c]
                if not curves:
                    continue
                n = min(len(c) for c in curves)
                ax.plot([c[0] for c in curves[0][:n]], [statistics.fmean(c[i][1] for c in curves) for i in range(n)],
                        label=m, lw=1.2)
            ax.set_title(f"{student} / {setting}")
            ax.set_xlabel("epoch")
            ax.set_ylabel("validation top-1 (%)")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "curves.png", dpi=110)
        plt.close(fig)
        files.append("curves.png")
    label = next((m for m in methods if proposed(m)), None)
    if label is not None:
        setting = next(iter(settings), None)
        rd = out / "runs" / "final" / student / str(setting) / f"{label}-{_tag(methods[label])}" / "seed0"
        ckpt = next((c for c in (rd / "checkpoints" / "best.pt", rd / "checkpoints" / "last.pt") if c.is_file()), None)
        if ckpt is not None:  # best.pt holds the prototypes (deployed) and their initial copy
            sd = torch.load(ckpt, map_location="cpu", weights_only=False)["distiller"]
            init, learned = sd["prototypes_init"].float(), sd["prototypes"].float()
            fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.8))
            for ax, p, title in ((axes[0], init, "initial prototypes"), (axes[1], learned, "learned prototypes")):
                im = ax.imshow(torch.cdist(p, p).numpy(), cmap="viridis")
                ax.set_title(f"{title} ({setting})")
                fig.colorbar(im, ax=ax, fraction=0.046)
            fig.tight_layout()
            fig.savefig(out / "prototypes.png", dpi=110)
            plt.close(fig)
            files.append("prototypes.png")
    return files


def run_compare(out: Path, spec: dict, cache_root: Path | None = None, do_tune: bool = False, say=print,
                tune_only: bool = False, probe_only: bool = False, shipped_teacher: bool = True) -> dict:
    """Run (or continue) the comparison (tuning first with ``do_tune``) and write the results files; with
    ``tune_only`` stop after the tuning runs (a validation screen) and write ``tuning.json``; with ``probe_only``
    stop after the teacher and the linear probes of every setting (``probes.json``); ``shipped_teacher=False``
    trains the suite's teacher on this machine even where a shipped one fits."""
    out, cache_root, log_path, log = output_dirs(out, cache_root, "compare.log")
    t0 = time.perf_counter()
    phases = Phases()
    workers = spec.get("workers") or default_workers()
    say(f"prockd bench compare: {('spec ' + spec['source'] + ' over ') if spec.get('source') else ''}suite "
        f"{spec['suite']}'s defaults; {workers} run{'s' if workers != 1 else ''} at a time, one thread each (--workers); "
        f"logs in {log_path}")
    base, teacher_summary = _base(spec, cache_root, log, say, shipped_teacher)
    phases.lap("teacher")
    if teacher_summary:
        say(f"teacher: top-1 {teacher_summary['final'].get('test/deployed', 0):.2f} % on its own held-out test set, "
            f"{teacher_summary['student_params'] / 1e6:.2f} M params")
    probes = probe_settings(spec, base, out, log, say)
    phases.lap("linear probes")
    if probe_only:
        return {"suite": spec["suite"], "probes": probes}
    chosen = tune(spec, base, out, log_path, log, say, phases) if do_tune or tune_only else {}
    if tune_only:
        payload = {"suite": spec["suite"], "student": next(iter(spec["students"])),
                   "setting": next(iter(spec["settings"])), "tuning": chosen, "probes": probes,
                   "elapsed_s": round(time.perf_counter() - t0, 1)}
        atomic_write_json(out / "tuning.json", payload)
        say(f"wrote {out / 'tuning.json'} (validation scores only; no final runs)")
        return payload
    methods = {m: chosen[m]["params"] if m in chosen else (p or {}) for m, p in spec["methods"].items()}
    todo, n = [], 0
    for student in spec["students"]:
        for setting in spec["settings"]:
            for seed in final_seeds(spec):
                for method, params in methods.items():
                    rd = out / "runs" / "final" / student / setting / f"{method}-{_tag(params)}" / f"seed{seed}"
                    _queue(run_config(spec, base, student, setting, method, params, seed), rd, log_path, todo)
                    n += 1
    say(f"final table: {len(methods)} methods x {len(spec['students'])} students x {len(spec['settings'])} settings x "
        f"{spec['seeds']} seeds{_seed_span(spec)} = {n} runs, {n - len(todo)} already finished")
    _execute(todo, spec, log, "final runs", phases)
    spec, methods, kept, earlier_probes = with_earlier_rows(out, spec, methods)
    if kept:
        say(f"results keep the earlier comparison's rows in {out} ({', '.join(kept)}; their runs are on disk): "
            "a run on a subset adds to the table, never replaces it")
    table = collect(spec, out, methods)
    probes = {**earlier_probes, **probes}  # the earlier columns' probes, where this run made none
    stats = statistics_table(table)
    params = {s: {m: r["params"] for m, r in rows.items()} for s, rows in table.items()}
    conv = convergence(table)
    costs = cost_table(table)
    md = format_markdown(stats, params, probes)
    if costs:
        md += "\n\n" + format_costs(costs, machine())
    files = plot(table, out, methods)
    phases.lap("table and plots")
    settings_json = {}
    for col in columns(table):
        settings_json[col] = {"probe": probes.get(col), **{s: stats[s].get(col, {}) for s in stats}}
    payload = {"suite": spec["suite"], "settings": settings_json, "convergence": conv, "params": params,
               "costs": costs, "machine": machine(),
               "tuning": chosen, "methods": methods, "teacher": teacher_summary.get("final", {}).get("test/deployed"),
               "runs": n, "elapsed_s": round(time.perf_counter() - t0, 1), "phases_s": phases.s,
               "spec": {k: v for k, v in spec.items() if k != "base"} | {"base": spec["base"]}}
    atomic_write_json(out / "results.json", payload)
    atomic_write_text(out / "results.md", md + "\n")
    atomic_write_text(out / "results.csv", format_csv(stats, costs))
    say(md)
    for student, per in conv.items():
        for setting, c in per.items():
            say(f"convergence {student}/{setting}: student-only validation gain over the last fifth of the epochs "
                f"{c['val_gain_last_fifth']:+.2f} points")
    say(phases.line())
    say(f"wrote {out / 'results.md'}, results.csv, results.json" + "".join(f", {f}" for f in files)
        + f" in {payload['elapsed_s'] / 60:.1f} min")
    return payload
