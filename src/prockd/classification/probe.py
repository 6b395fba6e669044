"""Linear probes: does the frozen teacher know something about the student's task that its pixels do not?

A benchmark setting can show knowledge transfer only if a linear classifier on the frozen teacher's
features beats one on raw pixels, both trained on the student's labelled training set and scored on its
test set (``benchmark.md``, requirement 1). Both probes are scikit-learn ``LogisticRegression`` on
standardised inputs; the teacher's features are its taps averaged over the grid and concatenated.
"""
from __future__ import annotations

import numpy as np
import torch

from prockd.analysis.probe import fit_probe
from prockd.classification.data import ArrayDataset, Task
from prockd.connectors import pooled


def pixels(ds: ArrayDataset) -> np.ndarray:
    """Flattened pixels in [0, 1]."""
    return ds.take(torch.arange(len(ds))).reshape(len(ds), -1).float().div(255).numpy()


@torch.no_grad()
def teacher_features(teacher, ds: ArrayDataset, device="cpu", batch_size: int = 256) -> np.ndarray:
    """The teacher's taps averaged over the grid and concatenated, ``N x sum(C_t)``."""
    out = []
    for x, _, _ in ds.batches(batch_size):
        taps = teacher.extract(x.to(device), ("taps",))["taps"]
        out.append(pooled(taps, teacher.tap_layout).float().cpu())
    return torch.cat(out).numpy()


def probe_task(teacher, task: Task, device="cpu", tests: list[str] | None = None) -> dict:
    """``{"teacher": {test: %}, "pixels": {test: %}, "gap": {test: points}, "train_images": n}`` on the task's
    training set (its label budget) and test sets (all, or those named)."""
    names = tests or list(task.tests)
    ytr = task.train.labels.numpy()
    px = fit_probe(pixels(task.train), ytr, {n: (pixels(task.tests[n]), task.tests[n].labels.numpy()) for n in names})
    tf = fit_probe(teacher_features(teacher, task.train, device), ytr,
                   {n: (teacher_features(teacher, task.tests[n], device), task.tests[n].labels.numpy())
                    for n in names})
    return {"teacher": tf, "pixels": px, "gap": {n: tf[n] - px[n] for n in names}, "train_images": len(task.train)}
