"""The embedded detection benchmark's comparison (suite ``detection`` of :mod:`prockd.bench.suites`: ``prockd demo
--task detection``, ``prockd bench compare --suite detection``).

A teacher detector trained by prockd on one label space (by default the 10 digits and 26 capitals over 100
fonts: the "COCO" of the analogue; trained once, cached by its config's hash) teaches students a disjoint label
space (by default the 26 lowercase letters) from 2 training fonts and 128 canvases; students are tested on 40
held-out fonts, clean and foggy (Table 2's two blocks). The suite's other settings (the old digits -> 8 capitals
one among them) are overrides of the packaged configs. Every method runs on the same paired seeds; the table shows
per-class AP50 and mAP50 (mean ± std over seeds) of the validation-selected checkpoint, and each method's paired
difference to student-only with its 95 % interval. Before the table: the knowledge-gap check (linear probes on the
ground-truth boxes of the held-out fonts, the teacher's RoI features vs the boxes' pixels).
"""
from __future__ import annotations

import copy
import hashlib
import json
import statistics
from pathlib import Path

import yaml

from prockd.bench.common import (
    CLAIM_SEEDS,
    SHIPPED_TEACHERS,
    cached_teacher,
    default_workers,
    install_shipped,
    mean_std,
    method_of,
    output_dirs,
    paired_ci,
    run_jobs,
    scaled,
    teacher_dir,
    teacher_key,
    verdict,
)
from prockd.bench.suites import get_suite
from prockd.core.config import (
    apply_overrides,
    deep_merge,
    packaged_configs,
    read_config_file,
)
from prockd.core.io import atomic_torch_save, atomic_write_json, atomic_write_text
from prockd.detection.analysis import detection_probe
from prockd.detection.config import build_det_config
from prockd.detection.engine import build, open_data, pretrain_teacher
from prockd.detection.finetune import finetuned_teacher
from prockd.detection.methods import DET_METHODS
from prockd.errors import ProckdError
from prockd.glyphs import found_font_digests

SUITE = get_suite("detection")
DEMO_METHODS = tuple(SUITE.demo_methods)
ALL_METHODS = tuple(SUITE.methods)
TUNE_FACTORS = tuple(SUITE.tune_factors)
TUNED_FILE = SUITE.tuned_file


def config_root() -> Path:
    """The suite's config folder, shipped inside the package (``prockd/configs/detection/embedded``)."""
    return packaged_configs() / SUITE.config_dir


def embedded_configs(setting: str | None = None) -> tuple[dict, dict]:
    """(teacher raw config, student raw config) of the embedded benchmark: the config folder's files with a named
    setting's overrides merged in (default: the suite's setting)."""
    root = config_root()
    teacher, student = read_config_file(root / "teacher.yaml"), read_config_file(root / "student.yaml")
    s = setting_of(setting)
    return deep_merge(teacher, s.get("teacher", {})), deep_merge(student, s.get("student", {}))


def setting_of(setting: str | None) -> dict:
    """The named setting of the suite (default: its own), an error naming the known ones otherwise."""
    name = setting or SUITE.setting
    if name not in SUITE.settings:
        raise ProckdError(f"unknown detection setting '{name}' (known: {', '.join(SUITE.settings)})")
    return SUITE.settings[name]


def quick_sizes(teacher: dict, student: dict) -> None:
    """Smoke sizes (tests): tiny splits, one epoch, a few steps."""
    teacher["data"]["canvas"].update(train_images=16, val_images=8, test_images=8, train_fonts=8)
    teacher["train"].update(epochs=1, max_steps=2)
    student["data"]["canvas"].update(train_images=16, val_images=8, test_images=8)
    student["train"].update(epochs=2, max_steps=None)
    for raw in (teacher, student):
        raw["data"]["num_workers"] = 0


def shipped_key(teacher_raw: dict) -> str:
    """The key of a shipped detection teacher: its pre-training config's hash without the canvas cache folder (a
    path of the machine)."""
    raw = copy.deepcopy(teacher_raw)
    raw.get("data", {}).get("canvas", {}).pop("cache_dir", None)
    return "det-" + teacher_key(raw)


def install_shipped_det_teacher(teacher_raw: dict, run_dir: Path, say=print) -> bool:
    """Put the detection teacher shipped with prockd for ``teacher_raw`` (if any) in ``run_dir`` as if it had been
    trained there, when this machine's fonts are, byte for byte and in order, those it was trained on (then its
    training fonts are this machine's pool and no held-out font was trained on). Returns whether it was installed."""
    path = SHIPPED_TEACHERS / f"{shipped_key(teacher_raw)}.pt"
    if not path.is_file() or (run_dir / "final.json").is_file():
        return False
    shipped = install_shipped(path, run_dir, found_font_digests(),
                              lambda s, ckpt: atomic_torch_save({"model": s["model"], "classes": s["classes"]}, ckpt),
                              "detection teacher", say)
    if shipped is None:
        return False
    sel = shipped["summary"].get("selected") or {}
    say(f"teacher detector: the one shipped with prockd ({shipped['provenance']['trained']}; mAP50 "
        f"{sel.get('test/mAP50', float('nan')):.1f} on its held-out fonts), the fonts here being those it was "
        "trained on")
    return True


def det_teacher(teacher_raw: dict, cache_root: Path, log, say, shipped: bool = True) -> tuple[Path, dict]:
    """Train (once, cached by the config's hash) the benchmark's teacher detector, or install the one shipped with
    prockd for it (``shipped``, where the fonts match); (checkpoint, summary)."""
    cfg = build_det_config(teacher_raw, "benchmark teacher")
    if shipped:
        install_shipped_det_teacher(teacher_raw, teacher_dir(cache_root, "det_teachers", teacher_raw), say)
    return cached_teacher(teacher_raw, cache_root, "det_teachers",
                          lambda run_dir, lg: pretrain_teacher(cfg, run_dir, log=lg),
                          f"the benchmark's teacher detector ({cfg.train.epochs} epochs, {cfg.data.canvas.train_images} "
                          f"canvases of '{cfg.data.canvas.charset}')", log, say)


def _run_dir(out: Path, raw: dict, method: str, seed: int) -> Path:
    """``out/<method>/<hash of the run's config without seed and out>/seed<k>``: a changed recipe or weight
    never reuses another configuration's finished run."""
    key = {k: v for k, v in raw.items() if k not in ("seed", "out")}
    tag = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return out / method / tag / f"seed{seed}"


def base_params(label: str) -> dict:
    """A row's parameters before tuning: its variant's (none for a plain method name), without its teacher
    section (:func:`variant_teacher`)."""
    return {k: v for k, v in copy.deepcopy(SUITE.variants.get(label, {})).items() if k != "teacher"}


def variant_teacher(label: str) -> dict:
    """What a row changes in the teacher section (a variant's ``teacher`` entry, e.g. ``finetune``: the
    fine-tuned-teacher rows); empty for most rows."""
    return copy.deepcopy(SUITE.variants.get(label, {}).get("teacher", {}))


def row_params(label: str, params: dict) -> dict:
    """A row's weights from a tuned-weights mapping: its own entry, else (a variant that only changes the
    teacher, e.g. ``cwd@finetuned``) its method's entry with the variant's own parameters over it."""
    if params.get(label):
        return params[label]
    own = base_params(label)
    if variant_teacher(label) and params.get(method_of(label)):
        return {**params[method_of(label)], **own}
    return own


def _queue_runs(out: Path, student_raw: dict, teacher_section: dict, method: str, params: dict, seeds, log_path,
                todo: list) -> list[Path]:
    """Queue (unless finished) one run per seed of row ``method`` (a method name or ``NAME@VARIANT``) with
    ``params``; returns their folders."""
    dirs = []
    for s in seeds:
        raw = copy.deepcopy(student_raw)
        raw.update(method={"name": method_of(method), "params": copy.deepcopy(params)})
        raw["train"] = dict(raw["train"], progress=False)
        if method != "student_only":
            raw["teacher"] = deep_merge(teacher_section, variant_teacher(method))
        run_dir = _run_dir(out, raw, method, s)
        raw.update(seed=s, out=str(run_dir))
        dirs.append(run_dir)
        if not (run_dir / "final.json").is_file():
            todo.append((raw, str(run_dir), str(log_path)))
    return dirs


def queue_order(todo: list) -> list:
    """Runs seed by seed (an interrupted table holds whole paired seeds); within a seed the distillers first: they
    run longer than student-only, so the queue ends on short runs and two workers finish closer together (the
    demo's 6 runs: 580 s -> about 520 s on 2 cores)."""
    return sorted(todo, key=lambda job: (job[0]["seed"], job[0]["method"]["name"] == "student_only"))


def prepare_finetuned(student_raw: dict, teacher_section: dict, methods, say=print) -> None:
    """Fine-tune (once, cached) the teacher of every fine-tuned-teacher row before the runs start, so that the
    parallel workers read it instead of waiting on its build lock."""
    for m in methods:
        if variant_teacher(m).get("finetune"):
            raw = dict(copy.deepcopy(student_raw), method={"name": method_of(m)},
                       teacher=deep_merge(teacher_section, variant_teacher(m)))
            path, summary = finetuned_teacher(build_det_config(raw, f"row {m}"), pretrain_teacher, log=say)
            sel = summary.get("selected") or {}
            say(f"{m}: fine-tuned teacher {path} (validation mAP50 {sel.get('val/mAP50', float('nan')):.1f})")


def tuned_params(setting: str | None = None) -> dict:
    """The shipped weights of a setting (its ``tuned`` file in the config folder, e.g. ``tuned.yaml``; empty
    before it has been tuned)."""
    p = config_root() / setting_of(setting).get("tuned", TUNED_FILE)
    return (yaml.safe_load(p.read_text()) or {}).get("params", {}) if p.is_file() else {}


def tune(out: Path, student_raw: dict, teacher_section: dict, methods, tune_seeds: int, workers: int, log_path,
         say=print) -> dict:
    """Equal-budget weight choice on the validation split: every distilling method runs its main loss weights
    x each of :data:`TUNE_FACTORS` on seeds 1000.. (not the table's seeds); the factor with the highest mean
    validation mAP50 of the selected checkpoint wins (a tie keeps the larger factor). Writes ``tune.json``."""
    todo: list = []
    grid = {}
    for m in methods:
        if m == "student_only":
            continue
        for f in TUNE_FACTORS:
            p = scaled(DET_METHODS, method_of(m), base_params(m), f)
            grid[(m, f)] = (p, _queue_runs(out / "tune", student_raw, teacher_section, m, p,
                                           range(1000, 1000 + tune_seeds), log_path, todo))
    say(f"tuning: {len(todo)} runs to go ({len(grid)} method x weight configurations x {tune_seeds} seed(s))")
    run_jobs(todo, workers, "detection tuning runs")
    scores: dict = {}
    for (m, f), (_, dirs) in grid.items():
        vals = [json.loads((d / "final.json").read_text())["best"] for d in dirs]
        scores.setdefault(m, {})[f] = sum(vals) / len(vals)
    best = choose_factors(scores)
    res = {"factors": list(TUNE_FACTORS), "tune_seeds": tune_seeds,
           "val_mAP50": {m: {str(f): v for f, v in sc.items()} for m, sc in scores.items()},
           "chosen": {m: {"factor": f, "params": grid[(m, f)][0]} for m, f in best.items()}}
    atomic_write_json(out / "tune.json", res)
    say("tuning (validation mAP50 by weight factor): " + "; ".join(
        f"{m}: " + ", ".join(f"x{f} {v:.1f}" for f, v in sc.items()) + f" -> x{best[m]}" for m, sc in scores.items()))
    return res


def render_tuned(setting: str, tuning: dict) -> str:
    """A tuned-weights file (the format of the config folder's ``tuned*.yaml``) from :func:`tune`'s result, with
    the validation scores that chose each weight as comments: ``--tune`` writes it as ``tuned.yaml`` in the output
    folder, ready to ship as the setting's ``tuned`` file."""
    lines = [f"# Loss weights of the detection setting '{setting}', chosen on its validation split by",
             f"# `prockd bench compare --suite detection --settings {setting} --tune --tune-seeds "
             f"{tuning['tune_seeds']}`", f"# (equal budget: x{' / x'.join(map(str, tuning['factors']))} of each row's "
             "public-config weights, tuning seeds from 1000).", "# Validation mAP50 per factor:"]
    for m, sc in tuning["val_mAP50"].items():
        lines.append(f"#   {m}: " + ", ".join(f"x{f} {v:.1f}" for f, v in sc.items())
                     + f"  -> x{tuning['chosen'][m]['factor']}")
    body = yaml.safe_dump({"params": {m: c["params"] for m, c in tuning["chosen"].items()}}, sort_keys=False)
    return "\n".join(lines) + "\n" + body


def choose_factors(scores: dict[str, dict[float, float]]) -> dict[str, float]:
    """Per method, the weight factor of the highest validation score (a tie keeps the larger factor)."""
    return {m: max(sc, key=lambda f: (sc[f], f)) for m, sc in scores.items()}


def setting_teacher(setting: str | None, cache_root: Path, log, say, quick: bool = False):
    """A setting's (teacher raw config, student raw config, teacher section with its trained checkpoint, teacher
    summary): the teacher trained once per config and cached."""
    teacher_raw, student_raw = embedded_configs(setting)
    if quick:
        quick_sizes(teacher_raw, student_raw)
    for raw in (teacher_raw, student_raw):
        raw["data"]["canvas"]["cache_dir"] = str(cache_root / "data" / "canvas")
    ckpt, t_summary = det_teacher(teacher_raw, cache_root, log, say)
    t_sel = t_summary.get("selected") or {}
    say(f"teacher detector: {ckpt} (its own held-out-font test mAP50 {t_sel.get('test/mAP50', float('nan')):.1f})")
    teacher_section = copy.deepcopy(teacher_raw["student"])
    teacher_section.update(checkpoint=str(ckpt), backbone_weights="none")
    return teacher_raw, student_raw, teacher_section, t_summary


def probe_settings(out: Path, settings: list[str], cache_root: Path | None = None, say=print) -> dict:
    """The knowledge-gap check of several settings (teachers trained once and cached): box probes, teacher RoI
    features vs pixels, on each setting's held-out test sets; writes ``probes.{json,md}``."""
    out, cache_root, _, log = output_dirs(out, cache_root, "compare.log")
    res = {}
    for name in settings:
        say(f"setting {name}")
        teacher_raw, student_raw, teacher_section, t_summary = setting_teacher(name, cache_root, log, say)
        open_data(build_det_config(dict(student_raw, teacher=None)), log=say)
        res[name] = dict(knowledge_probe(out, student_raw, teacher_section, say, name),
                         teacher_val_mAP50=(t_summary.get("selected") or {}).get("val/mAP50"),
                         student=student_raw["data"]["canvas"], teacher_charset=teacher_raw["data"]["canvas"]["charset"])
    lines = ["| setting | teacher classes | student classes | train fonts | train boxes | clean test: teacher / pixels "
             "/ gap | shifted test: teacher / pixels / gap |", "|---" * 7 + "|"]
    for name, r in res.items():
        cells = [f"{n}: {r['teacher'][n]:.1f} / {r['pixels'][n]:.1f} / **{r['gap'][n]:+.1f}**" for n in r["gap"]]
        lines.append(f"| {name} | {r['teacher_charset']} | {r['student']['charset']} | {r['student']['train_fonts']} | "
                     f"{r['train_boxes']} | " + " | ".join((cells + ["–", "–"])[:2]) + " |")
    md = "\n".join(lines) + "\n"
    atomic_write_json(out / "probes.json", res)
    atomic_write_text(out / "probes.md", md)
    say(md)
    return res


def run_detection_compare(out: Path, seeds: int = 3, methods: tuple[str, ...] = DEMO_METHODS,
                          workers: int | None = None, quick: bool = False, cache_root: Path | None = None,
                          params: dict | None = None, do_tune: bool = False, tune_seeds: int = 1,
                          say=print, setting: str | None = None, tune_only: bool = False,
                          overrides: list[str] | None = None) -> dict:
    """Teacher (cached), optionally the equal-budget weight choice (:func:`tune`), every method x seed
    (parallel, resumable), the knowledge-gap probe and the table of one setting (default: the suite's); writes
    ``results.{json,md}``. Without ``do_tune`` the weights are ``params`` (default: the setting's shipped
    :func:`tuned_params`). ``overrides`` (``key=value``) change every student run's config, checked before the
    teacher is trained; the run folders' hash includes them."""
    setting = setting or SUITE.setting
    if overrides:  # a bad key or value fails here, before anything is trained
        build_det_config(apply_overrides(dict(embedded_configs(setting)[1], teacher=None), overrides),
                         f"--set {' '.join(overrides)}")
    out, cache_root, log_path, log = output_dirs(out, cache_root, "compare.log")
    workers = workers or default_workers()
    teacher_raw, student_raw, teacher_section, t_summary = setting_teacher(setting, cache_root, log, say, quick)
    if overrides:
        student_raw = apply_overrides(student_raw, overrides)
        say(f"student runs with overrides: {' '.join(overrides)}")
    t_sel = t_summary.get("selected") or {}
    ckpt = teacher_section["checkpoint"]

    open_data(build_det_config(dict(student_raw, teacher=None)), log=say)  # render the canvases once, not per worker
    prepare_finetuned(student_raw, teacher_section, methods, say)
    tuning = None
    if do_tune or tune_only:
        tuning = tune(out, student_raw, teacher_section, methods, tune_seeds, workers, log_path, say)
        atomic_write_text(out / "tuned.yaml", render_tuned(setting, tuning))
        if tune_only:  # a validation screen: no table, no test set read
            return {"setting": setting, "tuning": tuning}
        params = {m: c["params"] for m, c in tuning["chosen"].items()}
    elif params is None:
        params = tuned_params(setting)
    todo: list = []
    params = {m: row_params(m, params or {}) for m in methods}
    runs = {m: _queue_runs(out, student_raw, teacher_section, m, params[m], range(seeds), log_path, todo)
            for m in methods}
    todo = queue_order(todo)
    say(f"{len(todo)} runs to go ({len(methods)} methods x {seeds} seeds); log: {log_path}")
    run_jobs(todo, workers, "detection runs")
    table = collect(runs)
    table["params"] = params
    table["tuning"] = tuning
    table["teacher"] = {"checkpoint": str(ckpt), "selected": t_sel}
    table["setting"] = setting
    table["probe"] = knowledge_probe(out, student_raw, teacher_section, say, setting)
    md = format_table(table)
    atomic_write_json(out / "results.json", table)
    atomic_write_text(out / "results.md", md)
    say(md)
    return table


def knowledge_probe(out: Path, student_raw: dict, teacher_section: dict, say=print,
                    setting: str | None = None) -> dict:
    """The knowledge-gap check of a setting (cached in ``probe_<setting>.json``): linear probes on ground-truth
    boxes, the frozen teacher's RoI features vs the boxes' pixels
    (:func:`prockd.detection.analysis.detection_probe`)."""
    path = out / f"probe_{setting or SUITE.setting}.json"
    if path.is_file():
        return json.loads(path.read_text())
    say("knowledge-gap probe: linear box classifiers on the teacher's RoI features vs on the boxes' pixels")
    raw = dict(copy.deepcopy(student_raw), teacher=teacher_section, method={"name": "cwd", "params": {}})
    b = build(build_det_config(raw, "probe"), log=lambda _m: None)
    res = detection_probe(b.teacher, b.distiller.student.transform, b.data.train, b.data.tests)
    atomic_write_json(path, res)
    return res


def collect(run_dirs: dict[str, list[Path]]) -> dict:
    """Per method: per-seed selected metrics of each test set; mean ± std; paired difference to student-only."""
    res: dict = {"methods": {}, "seeds": max((len(d) for d in run_dirs.values()), default=0)}
    for m, dirs in run_dirs.items():
        res["methods"][m] = []
        for d in dirs:
            p = d / "final.json"
            if p.is_file():
                summary = json.loads(p.read_text())
                res["methods"][m].append(summary.get("selected") or summary["final"])
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
        stats[m] = st
        if m != "student_only":
            _paired(st, runs, base, "vs_student")
    res["stats"] = stats
    res["best_baseline"] = best_baseline(res["methods"])
    if res["best_baseline"]:
        ref = res["methods"][res["best_baseline"]["name"]]
        for m, runs in res["methods"].items():
            if method_of(m) == "prockd":
                _paired(stats[m], runs, ref, "vs_best")
    res["convergence"] = convergence(run_dirs.get("student_only", []))
    return res


def _paired(st: dict, runs: list[dict], ref: list[dict], label: str) -> None:
    """Add ``label``: the paired 95 % interval of ``runs`` minus ``ref`` (seed by seed) to every mAP50 entry of
    ``st``, when both have the same number (>= 2) of seeds."""
    if len(runs) != len(ref) or len(runs) < 2:
        return
    for key, entry in st.items():
        if key.endswith("mAP50"):
            ci = paired_ci([r[key] for r in runs], [r[key] for r in ref])
            entry[label] = dict(ci, verdict=verdict(ci))


def best_baseline(methods: dict[str, list[dict]]) -> dict | None:
    """The baseline (neither student-only nor a ProC-KD row) with the highest mean *validation* mAP50 of its
    selected checkpoints: the row ProC-KD is compared with, chosen without reading a test set."""
    val = {m: sum(r["val/mAP50"] for r in runs) / len(runs) for m, runs in methods.items()
           if m != "student_only" and method_of(m) != "prockd" and runs and all("val/mAP50" in r for r in runs)}
    if not val:
        return None
    name = max(val, key=val.get)
    return {"name": name, "val_mAP50": round(val[name], 2)}


FLAT_POINTS = 1.0  # the convergence check's bound: |fitted change of validation mAP50 over the last fifth|


def convergence(dirs: list[Path]) -> dict | None:
    """Student-only's validation mAP50 over the last fifth of the epochs (the benchmark's convergence check), from
    each run's ``metrics.jsonl``: ``val_gain_last_fifth`` (last evaluation minus the fifth's first, mean over
    seeds), ``val_fit_last_fifth`` (the least-squares line's change across the fifth's evaluations: one noisy
    point does not decide it), per seed, and ``flat`` (the mean fitted change within ±``FLAT_POINTS``)."""
    gains, fits = [], []
    for d in dirs:
        p = d / "metrics.jsonl"
        if not p.is_file():
            continue
        curve = [(r["epoch"], r["val/mAP50"]) for r in map(json.loads, p.read_text().splitlines())
                 if "val/mAP50" in r]
        if len(curve) >= 2:
            tail = [(e, v) for e, v in curve if e >= 0.8 * curve[-1][0]]
            gains.append(curve[-1][1] - tail[0][1])
            fits.append(_fitted_change(tail))
    if not gains:
        return None
    fit = sum(fits) / len(fits)
    return {"val_gain_last_fifth": round(sum(gains) / len(gains), 2), "val_fit_last_fifth": round(fit, 2),
            "per_seed_fit": [round(f, 2) for f in fits], "flat": abs(fit) <= FLAT_POINTS, "runs": len(gains)}


def _fitted_change(points: list[tuple[int, float]]) -> float:
    """The least-squares line's rise from the first to the last epoch of ``points`` (0 for a single point)."""
    if len(points) < 2:
        return 0.0
    slope = statistics.linear_regression([e for e, _ in points], [v for _, v in points]).slope
    return slope * (points[-1][0] - points[0][0])


def format_table(table: dict) -> str:
    """Table-2-shaped markdown: one block per test set, per-class AP50 and mAP50, Δ mAP50 vs student-only."""
    lines = []
    tuning = table.get("tuning")
    if tuning:
        lines.append("\nWeights chosen on validation (equal budget: x" + ", x".join(map(str, tuning["factors"]))
                     + " of each method's public weights): " + ", ".join(
                         f"{m} x{c['factor']}" for m, c in tuning["chosen"].items()))
    elif any(table.get("params", {}).values()):
        lines.append("\nWeights: " + "; ".join(f"{m} " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else
                                                                   f"{k}={v}" for k, v in p.items())
                                               for m, p in table["params"].items() if p))
    probe = table.get("probe")
    if probe:
        lines.append("\nKnowledge gap (linear probes on ground-truth boxes, accuracy %): " + "; ".join(
            f"{n}: teacher RoI features {probe['teacher'][n]:.1f} vs pixels {probe['pixels'][n]:.1f} "
            f"({probe['gap'][n]:+.1f})" for n in probe["gap"]))
    conv = table.get("convergence")
    if conv:
        fit = conv.get("val_fit_last_fifth")
        lines.append(f"\nConvergence: student-only's validation mAP50 changes by {conv['val_gain_last_fifth']:+.2f} "
                     f"points over the last fifth of the epochs (mean of {conv['runs']} seeds)" + (
                         "" if fit is None else
                         f"; least-squares change {fit:+.2f} (per seed " + ", ".join(
                             f"{f:+.1f}" for f in conv["per_seed_fit"]) + "): "
                         + ("flat" if conv["flat"] else f"NOT flat (bound ±{FLAT_POINTS:g})")))
    best = table.get("best_baseline")
    if best:
        lines.append(f"\nBest baseline (highest mean validation mAP50 of its selected checkpoints): {best['name']} "
                     f"({best['val_mAP50']:.1f})")
    stats = table["stats"]

    def delta(d):
        return f"{d['mean']:+.1f} ± {d['ci95']:.1f} ({d['verdict']})" if d and d.get("ci95") is not None else ""

    for test in table["tests"]:
        classes = sorted({k.split("/")[2] for st in stats.values() for k in st if k.startswith(f"{test}/AP50/")})
        extra = [f"Δ vs {best['name']} (95 % CI)"] if best else []
        lines += [f"\n### {test} (AP50 %, mean ± std over {table['seeds']} seeds, validation-selected checkpoints)\n",
                  "| method | " + " | ".join(classes + ["mAP50", "Δ mAP50 vs student (95 % CI)"] + extra) + " |",
                  "|---" * (len(classes) + 3 + len(extra)) + "|"]
        for m, st in stats.items():
            cells = [f"{st[f'{test}/AP50/{c}']['mean']:.1f}" if f"{test}/AP50/{c}" in st else "–" for c in classes]
            e = st.get(f"{test}/mAP50") or {}
            cells.append(f"{e['mean']:.1f} ± {e['std']:.1f}" if e else "–")
            cells.append(delta(e.get("vs_student")))
            if best:
                cells.append(delta(e.get("vs_best")))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if table["seeds"] < CLAIM_SEEDS:
        lines.append(f"\n{table['seeds']} paired seeds: a check that the rows run, not evidence; with fewer than "
                     f"{CLAIM_SEEDS} the intervals are wide and a verdict can change on another machine or float order "
                     f"(a claim rests on --seeds {CLAIM_SEEDS}: docs/detection.md)")
    return "\n".join(lines) + "\n"
