"""``prockd analyze`` on detection runs: the paper's qualitative figures (Figs. 6-9) and error analysis (Fig. 11).

- ``qualitative_<test>.png`` (Figs. 6-9): the same test images in rows; ground truth, then each run's deployed
  detector (a baseline and ProC-KD, as given) in columns, boxes at score >= ``score_thr`` with class and
  score. The images are drawn at random (``seed``) among those with at least two ground-truth objects, not
  picked by where the methods differ;
- ``errors_<run>_<test>.png`` (Fig. 11): the COCO error-analysis PR curves (C75, C50, Loc, Sim, Oth, BG, FN
  per area range) of each run; their areas under the curves go to ``analysis.json``;
- ``index.html`` shows them together.

Every run is rebuilt from its ``detector.pt`` alone (FA included for ProC-KD); the test data is the first
run's configuration.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import roi_align

from prockd.analysis.probe import fit_probe
from prockd.analysis.report import write_index
from prockd.core.config import read_config_file
from prockd.core.io import atomic_write_json
from prockd.detection.config import build_det_config
from prockd.detection.deploy import load_deployed_detector
from prockd.detection.engine import open_data
from prockd.detection.evaluate import detect, error_analysis, plot_error_analysis
from prockd.errors import ProckdError


@dataclass
class DetRunView:
    """A finished detection run: its config, deployed detector, class names and label."""

    path: Path
    cfg: object
    model: torch.nn.Module
    classes: list[str]
    label: str


def load_det_run(path: Path) -> DetRunView:
    """A finished detection run (``config.yaml`` + ``detector.pt``); errors name what is missing."""
    path = Path(path)
    if not (path / "config.yaml").is_file() or not (path / "detector.pt").is_file():
        raise ProckdError(f"{path} is not a finished detection run (config.yaml and detector.pt expected)")
    cfg = build_det_config(read_config_file(path / "config.yaml"), str(path / "config.yaml"))
    model, classes = load_deployed_detector(path / "detector.pt")
    return DetRunView(path, cfg, model, classes, cfg.method.name)


def pick_images(ds, n: int, seed: int, min_objects: int = 2) -> list[int]:
    """``n`` test-image indices drawn at random among images with at least ``min_objects`` boxes."""
    ok = [i for i, r in enumerate(ds.records) if len(r.boxes) >= min_objects] or list(range(len(ds)))
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(ok, size=min(n, len(ok)), replace=False).tolist())


def _draw(ax, img: torch.Tensor, boxes, labels, scores, names: list[str], title: str, color: str) -> None:
    import matplotlib.patches as patches

    arr = img.permute(1, 2, 0).numpy()
    ax.imshow(arr if arr.shape[2] == 3 else arr[..., 0], cmap=None if arr.shape[2] == 3 else "gray")
    for k, (b, lab) in enumerate(zip(boxes, labels)):
        x0, y0, x1, y1 = b
        ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=1.2))
        text = names[lab - 1] + ("" if scores is None else f" {scores[k]:.2f}")
        ax.text(x0, y0 - 1, text, color="white", fontsize=6, backgroundcolor=color, va="bottom")
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def figure_qualitative(runs: list[DetRunView], ds, idx: list[int], names: list[str], out: Path,
                       score_thr: float) -> dict:
    """Figs. 6-9: ground truth and each run's detections on the images ``idx``; per image and run, the
    number of detections kept and of ground-truth objects."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 1 + len(runs)
    fig, axes = plt.subplots(len(idx), cols, figsize=(2.6 * cols, 2.6 * len(idx)), squeeze=False)
    counts: dict = {"images": [Path(ds.records[i].file).name for i in idx], "ground_truth": [], "runs": {}}
    for row, i in enumerate(idx):
        img = ds.load_image(i)
        rec = ds.records[i]
        _draw(axes[row, 0], img, rec.boxes.tolist(), rec.labels.tolist(), None, names,
              "ground truth" if row == 0 else "", "tab:green")
        counts["ground_truth"].append(len(rec.boxes))
        for c, r in enumerate(runs, start=1):
            with torch.no_grad():
                p = r.model([img])[0]
            keep = p["scores"] >= score_thr
            _draw(axes[row, c], img, p["boxes"][keep].tolist(), p["labels"][keep].tolist(),
                  p["scores"][keep].tolist(), names, r.label if row == 0 else "",
                  "tab:orange" if r.cfg.method.name == "prockd" else "tab:blue")
            counts["runs"].setdefault(r.label, []).append(int(keep.sum()))
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return counts


def run_det_analyze(run: Path, compare: list[Path], out: Path | None = None, images: int = 4, seed: int = 0,
                    score_thr: float = 0.5, tests: list[str] | None = None, log=print) -> Path:
    """Figs. 6-9 and 11 for ``run`` and ``compare`` runs (same classes) on the first run's test sets."""
    runs = [load_det_run(run)] + [load_det_run(p) for p in compare]
    seen: set = set()
    for r in runs:
        if r.classes != runs[0].classes:
            raise ProckdError(f"{r.path} detects other classes than {run} ({r.classes} vs {runs[0].classes}): "
                              f"compare runs of the same task")
        if r.label in seen:
            r.label = f"{r.label} [{r.path.name}]"
        seen.add(r.label)
    log(f"analyze: {len(runs)} detection run(s); opening the test data of {run}")
    data = open_data(runs[0].cfg, log=log)
    chosen = tests or list(data.tests)
    unknown = [t for t in chosen if t not in data.tests]
    if unknown:
        raise ProckdError(f"--tests {unknown}: not test sets of {run} (known: {', '.join(data.tests)})")
    out = Path(out or Path(run) / "analysis")
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"runs": {r.label: str(r.path) for r in runs}, "score_thr": score_thr, "qualitative": {},
                     "errors": {}}
    sections = []
    for t in chosen:
        ds = data.tests[t]
        idx = pick_images(ds, images, seed)
        name = f"qualitative_{t}.png"
        log(f"analyze: Figs. 6-9 on '{t}' ({len(idx)} images)")
        summary["qualitative"][t] = figure_qualitative(runs, ds, idx, runs[0].classes, out / name, score_thr)
        sections.append((f"Figs. 6-9: ground truth and detections on '{t}' (score >= {score_thr})", name,
                         json.dumps(summary["qualitative"][t], indent=1)))
        gt = ds.coco_gt()
        for k, r in enumerate(runs):
            log(f"analyze: Fig. 11 error analysis of {r.label} on '{t}'")
            res = error_analysis(gt, detect(r.model, ds, torch.device("cpu")))
            fname = f"errors_{k}_{t}.png"
            plot_error_analysis(res, out / fname, title=f"{r.label} {t}")
            summary["errors"].setdefault(t, {})[r.label] = res["summary"]
            sections.append((f"Fig. 11: error analysis of {r.label} on '{t}'", fname,
                             json.dumps(res["summary"]["all"], indent=1)))
    atomic_write_json(out / "analysis.json", summary)
    index = write_index(out, f"prockd detection analysis of {run}", sections)
    log(f"analyze: wrote {index}")
    return index


@torch.no_grad()
def box_features(ds, teacher=None, transform=None, levels=("0", "1"), out_px: int = 4,
                 pixel_px: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Per ground-truth box: (features, labels). With ``teacher`` (a :class:`DetTeacher`) and the student's
    ``transform``: the teacher's FPN ``levels`` RoI-aligned to ``out_px x out_px`` on the box and
    concatenated; without: the box's own pixels RoI-aligned to ``pixel_px x pixel_px`` (grey)."""
    feats, labels = [], []
    for i in range(len(ds)):
        img, tgt = ds[i]
        boxes = tgt["boxes"]
        if len(boxes) == 0:
            continue
        if teacher is None:
            grey = img.mean(0, keepdim=True)[None]
            f = roi_align(grey, [boxes], pixel_px, 1.0, aligned=True).flatten(1)
        else:
            il, t2 = transform([img], [dict(tgt)])
            pyr, _ = teacher.pyramid(il.tensors)
            tb = t2[0]["boxes"]
            parts = [roi_align(pyr[k], [tb], out_px, pyr[k].shape[-1] / il.tensors.shape[-1], aligned=True).flatten(1)
                     for k in levels]
            f = torch.cat(parts, 1)
        feats.append(f.float().numpy())
        labels.append(tgt["labels"].numpy())
    return np.concatenate(feats), np.concatenate(labels)


def detection_probe(teacher, transform, train, tests: dict) -> dict:
    """The detection benchmark's knowledge-gap check (``benchmark.md``, requirement 1, carried to boxes):
    box classification accuracy (%) of a linear probe on the frozen teacher's RoI features vs one on the
    boxes' pixels, both fitted on the student's training boxes and scored on each test set's boxes."""
    teacher.eval()
    xt, yt = box_features(train, teacher, transform)
    xp, yp = box_features(train)
    t_tests = {n: box_features(d, teacher, transform) for n, d in tests.items()}
    p_tests = {n: box_features(d) for n, d in tests.items()}
    res = {"teacher": fit_probe(xt, yt, t_tests), "pixels": fit_probe(xp, yp, p_tests),
           "train_boxes": int(len(yt)), "test_boxes": {n: int(len(v[1])) for n, v in t_tests.items()}}
    res["gap"] = {n: res["teacher"][n] - res["pixels"][n] for n in tests}
    return res
