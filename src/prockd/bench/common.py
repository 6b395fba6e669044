"""What the benchmarks share: output folders, parallel resumable runs, the teacher cache, the suite's
teacher, and the statistics of paired seeds."""
from __future__ import annotations

import contextlib
import copy
import ctypes
import hashlib
import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
from tqdm.auto import tqdm

from prockd.classification.cache import TeacherCache
from prockd.classification.config import build_config
from prockd.classification.data import build_task
from prockd.classification.engine import cached_dataset, fine_tuned_teacher, pretrain_teacher, train
from prockd.classification.models import Teacher, create_model
from prockd.core.checkpoint import save_teacher
from prockd.core.io import atomic_write_json
from prockd.detection.config import build_det_config
from prockd.detection.engine import train as det_train
from prockd.glyphs import charset, eligible_font_digests


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


def _run_job(raw: dict, run_dir: str, log_path: str, threads: int | None = 1) -> None:
    """One run (in a worker process): train to ``run_dir`` (resumes if it was interrupted); a raw config with
    ``task: detection`` is a detection run."""
    if threads:
        torch.set_num_threads(threads)

    def log(msg: str) -> None:
        with open(log_path, "a") as f:
            f.write(f"[{run_dir}] {msg}\n")

    # the comparison's console shows one progress bar: a run's own output (its rendering bars, warnings) goes to the
    # comparison's log, never to the console between the other workers' lines
    before = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        with open(log_path, "a") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            if raw.get("task") == "detection":
                det_train(build_det_config(raw, f"run {run_dir}"), run_dir, log=log)
            else:
                train(build_config(raw, f"run {run_dir}"), run_dir, log=log)
    finally:  # the comparison's own bar (a run in its process) shows again
        if before is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = before


def die_with_parent() -> None:
    """A run worker's initializer: on Linux the worker is sent SIGTERM when the process that started it dies (a
    killed or interrupted comparison), instead of finishing its run unseen; that run resumes from its last
    checkpoint on the next call. Elsewhere: nothing."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def run_jobs(todo: list[tuple], workers: int, desc: str) -> None:
    """Run ``_run_job(raw, run_dir, log_path)`` for each job, ``workers`` processes in parallel (one thread
    each), with a progress bar over runs."""
    if not todo:
        return
    bar = tqdm(total=len(todo), desc=f"{desc} ({min(workers, len(todo))} in parallel)", unit="run")
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=die_with_parent) as ex:
            for fut in as_completed([ex.submit(_run_job, *j) for j in todo]):
                fut.result()
                bar.update()
    else:
        for j in todo:
            _run_job(*j, threads=None)
            bar.update()
    bar.close()


def prepare_cache(raw: dict, log) -> None:
    """Build the teacher-feature cache of a run's config (the teacher's view of its training data, augmented
    views included), whatever its method, so that parallel workers only open it."""
    cfg = build_config(raw, "cache preparation")
    task = build_task(cfg.data)
    # a fine-tuned teacher (teacher.finetune): stage 1 once, here, before the workers start; every seed's run reads it
    teacher = fine_tuned_teacher(cfg, task, log) or Teacher(create_model(cfg.teacher, None, "teacher"), cfg.teacher)
    TeacherCache(teacher, cached_dataset(task, cfg.train), cfg.cache.dir, cfg.cache.dtype, log=log).prepare()


SHIPPED_TEACHERS = Path(__file__).parent / "teachers"  # package data: <run key>.pt, written by scripts/ship_teacher.py


def teacher_key(raw: dict) -> str:
    """The cache key of a benchmark teacher's pre-training config (its run folder's name)."""
    return hashlib.sha1(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]


def teacher_dir(cache_root: Path, kind: str, raw: dict) -> Path:
    """The run folder of the benchmark teacher pre-trained by ``raw`` (``kind``: teachers, det_teachers)."""
    return cache_root / kind / teacher_key(raw)


def glyph_font_digests(raw: dict) -> list[str]:
    """SHA-1 of every eligible font, in the order that gives fonts their roles, for a glyph config ``raw``."""
    g = build_config(raw, "benchmark teacher").data.glyphs
    return eligible_font_digests(g.font_dirs, charset(g.charset))


def install_shipped(path: Path, run_dir: Path, local_fonts: list[str], write_teacher, what: str,
                    say=print) -> dict | None:
    """Put the shipped teacher file ``path`` in ``run_dir`` as if it had been trained there, when ``local_fonts``
    (this machine's font digests, in role order) are those it was trained on; ``write_teacher(shipped,
    run_dir / "teacher.pt")`` writes its checkpoint (checking it against its recipe). ``final.json`` is written last:
    it marks the teacher as ready. Returns the shipped file's content, None (the reason said) when the fonts differ."""
    shipped = torch.load(path, map_location="cpu", weights_only=False)
    if local_fonts != shipped["fonts"]:
        differ = len(set(shipped["fonts"]) ^ set(local_fonts))
        say(f"the shipped {what} was trained on other fonts ({len(shipped['fonts'])} there, {len(local_fonts)} "
            f"here, {differ} not in both, or in another order): training it here instead")
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    write_teacher(shipped, run_dir / "teacher.pt")
    atomic_write_json(run_dir / "shipped.json", {"file": str(path), **shipped["provenance"]})
    atomic_write_json(run_dir / "final.json", shipped["summary"])
    return shipped


def install_shipped_teacher(raw: dict, run_dir: Path, say=print) -> bool:
    """Put the teacher shipped with prockd for the pre-training config ``raw`` (if any) in ``run_dir``, as if it
    had been trained there. It is used only when this machine's eligible fonts are, byte for byte and in order,
    those it was trained on: then its training fonts are this machine's pool and none of its held-out fonts was
    ever trained on. Returns whether it was installed."""
    path = SHIPPED_TEACHERS / f"{teacher_key(raw)}.pt"
    if not path.is_file() or raw.get("data", {}).get("name") != "glyphs":
        return False
    def write_teacher(shipped: dict, ckpt: Path) -> None:
        cfg = build_config(raw, "benchmark teacher")
        model = create_model(cfg.student, len(charset(cfg.data.glyphs.charset)), "teacher")
        model.load_state_dict(shipped["model"])  # strict: the recipe's network
        save_teacher(ckpt, model)

    shipped = install_shipped(path, run_dir, glyph_font_digests(raw), write_teacher, "benchmark teacher", say)
    if shipped is None:
        return False
    say(f"benchmark teacher: the one shipped with prockd ({shipped['provenance']['trained']}; top-1 "
        f"{shipped['summary']['final']['test/deployed']:.2f} % on its held-out fonts), the fonts here being those it "
        "was trained on; --train-teacher trains it on this machine instead")
    return True


def cached_teacher(raw: dict, cache_root: Path, kind: str, pretrain, what: str, log=print,
                   say=print) -> tuple[Path, dict]:
    """A benchmark's teacher, trained once by ``pretrain(run_dir, log)`` (a task's ``pretrain_teacher``) and then
    cached under ``cache_root/kind/<hash of raw>``; returns (``teacher.pt``, its run's summary)."""
    run_dir = teacher_dir(cache_root, kind, raw)
    ckpt = run_dir / "teacher.pt"
    if not (ckpt.is_file() and (run_dir / "final.json").is_file()):
        if run_dir.is_dir() and not (run_dir / "config.yaml").is_file():  # a shipped teacher's half-installed copy
            shutil.rmtree(run_dir)
        say(f"pretraining {what} in {run_dir}")
        pretrain(run_dir, lambda m: (log(m), say(m)))
    return ckpt, json.loads((run_dir / "final.json").read_text())


def pretrained_teacher(teacher_run: dict, cache_root: Path, log=print, say=print,
                       shipped: bool = True) -> tuple[Path, dict]:
    """Train (once, then cached by the config's hash) a classification benchmark's teacher; returns (checkpoint,
    summary). With ``shipped`` a teacher shipped with prockd for this config is used instead of training one,
    when this machine's fonts are those it was trained on (:func:`install_shipped_teacher`)."""
    cfg = build_config(dict(teacher_run, train=dict(teacher_run["train"], progress=True)), "benchmark teacher")
    run_dir = teacher_dir(cache_root, "teachers", teacher_run)
    if shipped and not (run_dir / "final.json").is_file():
        install_shipped_teacher(teacher_run, run_dir, say)
    elif not shipped and (run_dir / "shipped.json").is_file():  # asked to train it here: drop the installed one
        say(f"--train-teacher: replacing the shipped teacher in {run_dir} by one trained here")
        shutil.rmtree(run_dir)
    return cached_teacher(teacher_run, cache_root, "teachers", lambda run_dir, lg: pretrain_teacher(cfg, run_dir, lg),
                          f"the benchmark teacher ({cfg.train.epochs} epochs)", log, say)


def method_of(label: str) -> str:
    """The registry name behind a table label: ``NAME`` or ``NAME@VARIANT`` (one method in several rows, e.g.
    ``prockd`` and ``prockd@transfer``); both tasks' comparisons."""
    return label.split("@", 1)[0]


ROW_SECTIONS = ("train", "teacher")  # what a comparison row may carry beside its method's parameters


def split_recipe(params: dict | None) -> tuple[dict, dict | None]:
    """(the method's parameters, the row's own config sections or None): a comparison row's entry may carry a
    ``train`` mapping (its own training recipe, e.g. the noise level its robustness screen chose) and a ``teacher``
    mapping (e.g. ``{finetune: {...}}``: distil the teacher fine-tuned on the task) beside its parameters, applied to
    its runs only."""
    params = copy.deepcopy(params or {})
    own = {k: params.pop(k) for k in ROW_SECTIONS if k in params}
    return params, own or None


def scaled(registry, method: str, params: dict, factor: float) -> dict:
    """``params`` with the method's main loss weights (their defaults where unset) multiplied by ``factor``
    (``registry``: the task's method registry); the weight grid of both tasks' equal-budget tuning. A row's own
    ``train`` and ``teacher`` sections are kept as they are."""
    cls = registry.get(method)
    own, sections = split_recipe(params)
    full = cls.Params(**own).model_dump()
    out = dict(own, **{w: full[w] * factor for w in cls.main_weights})
    return out if sections is None else {**out, **sections}


def mean_std(v: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


CLAIM_SEEDS = 5  # paired seeds a comparison's claim rests on (the project's measuring rules)


def paired_ci(a: list[float], b: list[float], level: float = 0.95) -> dict:
    """Mean paired difference ``a - b`` and the half-width of its Student-t confidence interval
    (``ci95`` is ``None`` with fewer than two pairs)."""
    from scipy import stats

    d = [x - y for x, y in zip(a, b)]
    m, sd = mean_std(d)
    n = len(d)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)) if n > 1 else None
    return {"mean": round(m, 3), "ci95": None if half is None else round(half, 3), "n": n}


def verdict(ci: dict) -> str:
    """"better" / "worse" when the interval excludes 0, else "no difference"."""
    if ci.get("ci95") is None:
        return "n/a"
    lo, hi = ci["mean"] - ci["ci95"], ci["mean"] + ci["ci95"]
    return "better" if lo > 0 else "worse" if hi < 0 else "no difference"


def default_workers() -> int:
    """Parallel single-thread runs: one per core, at most 2 on this project's CI-sized machines."""
    return min(2, os.cpu_count() or 1)
