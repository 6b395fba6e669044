"""Research helper: the detection benchmark's box probe on trained students' own FPN features.

For each finished run under a comparison folder (``<out>/<row>/<hash>/seed<k>/detector.pt``), a linear probe on the
deployed detector's RoI features (P2 + P3, 4 x 4 RoIAlign: what the knowledge-gap check reads from the teacher)
is fitted on the run's training boxes and scored on each test set's boxes: whether a distiller left the student's
features closer to the teacher's (whose probe the gap check reports) than student-only's.

    .venv/bin/python scripts/probe_students.py --out runs/t60 --setting lower26_1font_128_unlabeled
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from prockd.bench.compare_detection import embedded_configs
from prockd.detection.analysis import box_features, fit_probe
from prockd.detection.config import build_det_config
from prockd.detection.deploy import load_deployed_detector
from prockd.detection.engine import open_data


class _Pyramid:
    """A deployed detector's backbone (FA included for ProC-KD) as the probe's feature source."""

    def __init__(self, model):
        self.model = model.eval()

    def eval(self):
        return self

    @torch.no_grad()
    def pyramid(self, x):
        return self.model.backbone(x), None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--setting", default=None)
    ap.add_argument("--cache", default="~/.cache/prockd")
    args = ap.parse_args()
    _, student = embedded_configs(args.setting)
    student["data"]["canvas"]["cache_dir"] = str(Path(args.cache).expanduser() / "data" / "canvas")
    student["data"].pop("unlabeled", None)
    data = open_data(build_det_config(dict(student, teacher=None)), log=lambda m: None)
    res: dict = {}
    for det in sorted(Path(args.out).glob("*/*/seed*/detector.pt")):
        row, seed = det.parts[-4], det.parts[-2]
        model, _ = load_deployed_detector(det)
        src = _Pyramid(model)
        xt, yt = box_features(data.train, src, model.transform)
        tests = {n: box_features(d, src, model.transform) for n, d in data.tests.items()}
        res.setdefault(row, {})[seed] = fit_probe(xt, yt, tests)
        print(row, seed, {k: round(v, 1) for k, v in res[row][seed].items()}, flush=True)
    summary = {row: {n: round(statistics.fmean(s[n] for s in seeds.values()), 2) for n in next(iter(seeds.values()))}
               for row, seeds in res.items()}
    print(json.dumps(summary, indent=1))
    (Path(args.out) / "student_probes.json").write_text(json.dumps({"per_seed": res, "mean": summary}, indent=1))


if __name__ == "__main__":
    main()
