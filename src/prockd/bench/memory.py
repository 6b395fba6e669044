"""``prockd bench memory``: peak resident memory of one training epoch with a small and a large unlabelled
transfer folder (``data.unlabeled.dir``), side by side in one invocation.

Each count runs in a fresh process (peak RSS is a per-process high-water mark): the own-data recipe of
docs/own-data.md (a Fashion-MNIST ImageFolder, the ImageNet EfficientNet-Lite0 teacher, a timm ResNet-10-T student,
``preset: transfer``, stored augmented views) for one epoch, with a fresh teacher cache, so the epoch includes
listing the folder, building the cache of every unlabelled view and drawing from it. The unlabelled images stay on
disk (decoded by loader workers) and the cache is read row by row: memory should not grow with the folder.
"""
from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from prockd.classification.config import build_config
from prockd.classification.engine import train
from prockd.classification.folders import write_fashion_mnist_folder
from prockd.core.io import atomic_write_json
from prockd.errors import ProckdError


def _config(folder: Path, unl: Path, cache: Path, size: int, workers: int) -> dict:
    return {
        "teacher": {"name": "builtin:efficientnet_lite0", "input_size": size},
        "student": {"name": "timm/resnet10t", "in_chans": 1, "input_size": size},
        "data": {"name": "imagefolder", "train_dir": str(folder / "train"), "val_dir": str(folder / "val"),
                 "test_dirs": {"test": str(folder / "test")}, "num_workers": workers,
                 "unlabeled": {"dir": str(unl), "batch_size": 32}},
        "method": {"name": "prockd", "params": {"preset": "transfer"}},
        "train": {"epochs": 1, "batch_size": 32, "augment": "affine", "aug_views": 2, "progress": False},
        "cache": {"dir": str(cache)},
    }


def _child(config_path: str, run_dir: str, result_path: str) -> None:
    """One measurement (in its own process): train one epoch, then write peak RSS of this process and of its
    largest loader worker."""
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    train(build_config(json.loads(Path(config_path).read_text()), config_path), run_dir, log=lambda *_: None)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    atomic_write_json(Path(result_path), {"peak_rss_mib": own, "worker_peak_rss_mib": kids,
                                          "seconds": time.perf_counter() - t0})


def run_memory_bench(counts: tuple[int, ...] = (1000, 10000), out: str | Path = "runs/bench_memory", size: int = 64,
                     workers: int = 2, labelled_per_class: int = 60, log=print) -> dict:
    """Peak RSS of one epoch for each unlabelled-folder size in ``counts`` (each in a fresh process), and the ratio
    of the largest to the smallest. ``labelled_per_class``: training images per class (4 classes; a quarter as many
    for validation). Writes ``out/bench_memory.json``; the folders are kept for a rerun."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if len(counts) < 2 or sorted(counts) != list(counts):
        raise ProckdError(f"bench memory: --images needs two or more increasing counts, got {list(counts)}")
    log(f"bench memory: writing a Fashion-MNIST ImageFolder with {counts[-1]} unlabelled images under {out} "
        "(once; reused by a rerun)")
    folder = write_fashion_mnist_folder(out / "data", train_per_class=labelled_per_class,
                                        val_per_class=max(1, labelled_per_class // 4),
                                        test_per_class=max(1, labelled_per_class // 4), unlabeled=counts[-1], size=size,
                                        log=log)
    rows = []
    for n in counts:
        unl = out / f"unlabeled_{n}"
        if not unl.is_dir():  # the first n images of the large folder, by link (nothing copied)
            tmp = unl.with_name(unl.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            files = sorted(p for p in (folder / "unlabeled").rglob("*") if p.is_file())[:n]
            for f in files:
                dst = tmp / f.relative_to(folder / "unlabeled")
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.symlink_to(f.resolve())
            tmp.rename(unl)
        cache, run = out / f"cache_{n}", out / f"run_{n}"
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(run, ignore_errors=True)
        cfg_path, res_path = out / f"config_{n}.json", out / f"result_{n}.json"
        cfg_path.write_text(json.dumps(_config(folder, unl, cache, size, workers), indent=1))
        log(f"bench memory: one epoch with {n} unlabelled images ({2 * n} stored views), a fresh process ...")
        code = ("import sys; from prockd.bench.memory import _child; _child(*sys.argv[1:])")
        proc = subprocess.run([sys.executable, "-c", code, str(cfg_path), str(run), str(res_path)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise ProckdError(f"bench memory: the run with {n} unlabelled images failed: {tail[0]} (its config: "
                              f"{cfg_path})")
        r = json.loads(res_path.read_text())
        r.update(images=n, views=2 * n, cache_mib=sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 2**20,
                 in_memory_views_mib=2 * n * size * size / 2**20)
        rows.append(r)
        log(f"  {n:>6} images: peak RSS {r['peak_rss_mib']:.0f} MiB (largest loader worker "
            f"{r['worker_peak_rss_mib']:.0f} MiB), teacher cache on disk {r['cache_mib']:.0f} MiB, {r['seconds']:.0f} s")
    ratio = rows[-1]["peak_rss_mib"] / rows[0]["peak_rss_mib"]
    wratio = rows[-1]["worker_peak_rss_mib"] / max(1e-9, rows[0]["worker_peak_rss_mib"])
    result = {"machine": {"python": sys.version.split()[0], "platform": sys.platform},
              "size": size, "workers": workers, "rows": rows, "ratio": ratio, "worker_ratio": wratio,
              "target_ratio": 1.2, "meets_target": ratio <= 1.2}
    atomic_write_json(out / "bench_memory.json", result)
    log(f"bench memory: peak RSS ratio {counts[-1]} / {counts[0]} images = {ratio:.3f} (target <= 1.2: "
        f"{'met' if ratio <= 1.2 else 'NOT met'}); loader workers {wratio:.3f}. Held in memory instead, the "
        f"{2 * counts[-1]} stored views alone would take {rows[-1]['in_memory_views_mib']:.0f} MiB and the teacher "
        f"cache {rows[-1]['cache_mib']:.0f} MiB more. Written: {out / 'bench_memory.json'}")
    return result
