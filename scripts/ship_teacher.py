"""Write a glyph benchmark's teacher that ships with prockd (``src/prockd/bench/teachers/<key>.pt``).

The teacher is trained by prockd itself (``pretrained_teacher`` with the suite's ``teacher_run``: the code path that
``prockd demo --train-teacher`` runs) and stored with its run summary and the SHA-1 of every eligible font in role
order: a machine whose fonts differ trains its own instead (``prockd.bench.common.install_shipped_teacher``).

    .venv/bin/python scripts/ship_teacher.py [--suite glyphs|glyphs_vit|detection] [--cache DIR]

``--suite detection`` ships the detection suite's teacher detector (``det-<key>.pt``; trained by
``prockd.bench.compare_detection.det_teacher``, or already in the cache) with the SHA-1 of every font the canvases
draw from, in order.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
from pathlib import Path

import torch

from prockd.bench.common import SHIPPED_TEACHERS, glyph_font_digests, pretrained_teacher, teacher_key
from prockd.bench.suites import get_suite
from prockd.core.io import atomic_torch_save


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="~/.cache/prockd", help="where the teacher is trained (or already is)")
    ap.add_argument("--suite", default="glyphs", help="the suite whose teacher to ship (glyphs, glyphs_vit, detection)")
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    provenance = {"trained": f"trained by prockd, shipped at {commit}, on a {platform.machine()} CPU, "
                             f"{datetime.date.today().isoformat()}"}
    if args.suite == "detection":
        ship_detection(Path(args.cache).expanduser(), provenance)
        return
    s = get_suite(args.suite)
    ckpt, summary = pretrained_teacher(s.teacher_run, Path(args.cache).expanduser(), shipped=False)
    out = SHIPPED_TEACHERS / f"{teacher_key(s.teacher_run)}.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"model": torch.load(ckpt, map_location="cpu", weights_only=False)["model"],
                       "fonts": glyph_font_digests(s.teacher_run), "summary": summary, "provenance": provenance}, out)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB), top-1 {summary['final']['test/deployed']:.2f} % on "
          "its held-out fonts")


def ship_detection(cache: Path, provenance: dict) -> None:
    """The detection suite's teacher (its default setting's) as ``bench/teachers/det-<key>.pt``."""
    from prockd.bench.compare_detection import det_teacher, embedded_configs, shipped_key
    from prockd.glyphs import found_font_digests

    teacher_raw, _ = embedded_configs()
    teacher_raw["data"]["canvas"]["cache_dir"] = str(cache / "data" / "canvas")  # as the benchmark runs it
    ckpt, summary = det_teacher(teacher_raw, cache, print, print, shipped=False)
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    out = SHIPPED_TEACHERS / f"{shipped_key(teacher_raw)}.pt"
    atomic_torch_save({"model": saved["model"], "classes": saved["classes"], "fonts": found_font_digests(),
                       "summary": summary, "provenance": provenance}, out)
    sel = summary.get("selected") or {}
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB), mAP50 {sel.get('test/mAP50', float('nan')):.1f} on "
          "its held-out fonts")


if __name__ == "__main__":
    main()
