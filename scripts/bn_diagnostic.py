"""Where the asymmetric views' clean cost and the shifted columns' collapse live: BatchNorm statistics or weights.

For every finished run under a comparison's run folder, the deployed student (``student.pt``, the checkpoint chosen
on validation) is scored on the validation split and its shifted copies (the run's ``data.corruptions``) three ways:
as trained; with every BatchNorm layer's running statistics re-estimated on the clean stored training views; and on
their noisy copies (Gaussian, std ``--noise``). A gap that re-estimation closes is a statistics mismatch; one it
does not close is in the weights. Validation only: no test set is read (docs/method.md, "Mixed clean and noisy
views").

    .venv/bin/python scripts/bn_diagnostic.py runs/robust_screen_mixed/runs/tune
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import yaml

from prockd.classification.config import build_config
from prockd.classification.data import build_task, shifted_copies
from prockd.classification.deploy import load_deployed, top1
from prockd.classification.engine import step_pools


def reestimated(model: torch.nn.Module, images: torch.Tensor, noise: float = 0.0, seed: int = 0) -> torch.nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are the plain averages over ``images`` (uint8), with
    Gaussian pixel noise of std ``noise`` (clamped to [0, 1]) when it is positive."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over every batch below
    model.train()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in range(0, len(images), 64):
            x = images[s:s + 64].float().div(255.0)
            if noise > 0:
                x = (x + noise * torch.randn(x.shape, generator=g)).clamp(0.0, 1.0)
            model(x)
    return model.eval()


def main() -> None:
    """Print one JSON line per run: its noise recipe and the three ways' validation accuracies."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, help="a folder holding finished runs (searched recursively for final.json)")
    ap.add_argument("--noise", type=float, default=0.2, help="std of the noisy copies' Gaussian noise")
    args = ap.parse_args()
    for final in sorted(args.runs.rglob("final.json")):
        run = final.parent
        cfg = build_config(yaml.safe_load((run / "config.yaml").read_text()), str(run / "config.yaml"))
        task = build_task(cfg.data)
        sets = {"val": task.val, **{k.removeprefix("val_"): v
                                    for k, v in shifted_copies(task.val, cfg.data.corruptions).items()}}
        pools = step_pools(task, cfg.train)
        views = (pools.views or task.train).images  # the stored training views, else the training images
        model = load_deployed(run / "student.pt")
        row = {"run": str(run.relative_to(args.runs)), "student_noise": cfg.train.student_noise,
               "student_noise_p": cfg.train.student_noise_p, "method": cfg.method.params}
        for tag, m in (("as_trained", model), ("bn_clean", reestimated(model, views)),
                       ("bn_noisy", reestimated(model, views, args.noise))):
            row[tag] = {k: round(top1(m, ds), 2) for k, ds in sets.items()}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
