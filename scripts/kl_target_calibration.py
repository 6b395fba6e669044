"""How good each run's KL target is on many validation fonts: ProC-KD's z_pro against probe-then-distil's probe.

For every finished run under a comparison's run folder: its KL target (the teacher-side classifier its KL distils,
at the last epoch, ``checkpoints/last.pt``) scored on the validation split — top-1, NLL, mean confidence and ECE
(prockd.classification.calibration) — and the deployed student it chose (``checkpoints/best.pt``) on the same
images. On glyph data ``--extra-fonts`` further pool fonts join the validation split (data.glyphs.val_extra_fonts:
after the labelled and the unlabelled fonts, never a test font), so that the split holds many fonts rather than the
suite's three. Validation only: no test set is read (docs/method.md, "The KL target's calibration").

    .venv/bin/python scripts/kl_target_calibration.py runs/robust_columns/runs/final/wrn16-1 --extra-fonts 30
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml

from prockd.classification.calibration import kl_target_calibration
from prockd.classification.config import build_config
from prockd.classification.deploy import top1
from prockd.classification.engine import build


def main() -> None:
    """Print one JSON line per run: the KL target's calibration and the chosen student's accuracy."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, help="a folder holding finished runs (searched recursively for final.json)")
    ap.add_argument("--extra-fonts", type=int, default=30, help="glyph data: further validation fonts from the pool")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for final in sorted(args.runs.rglob("final.json")):
        run = final.parent
        raw = yaml.safe_load((run / "config.yaml").read_text())
        raw["train"]["device"] = "cpu"
        if raw["data"]["name"] == "glyphs" and args.extra_fonts:
            raw["data"]["glyphs"]["val_extra_fonts"] = args.extra_fonts
        b = build(build_config(raw, str(run / "config.yaml")))
        val = b.task.val
        last = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
        b.distiller.load_state_dict(last["distiller"])
        target = kl_target_calibration(b.distiller, val)
        best = torch.load(run / "checkpoints" / "best.pt", map_location="cpu", weights_only=False)
        b.distiller.load_deployed_state(best["distiller"])
        row = {"run": str(run.relative_to(args.runs)), "val_images": len(val), "selected_epoch": best.get("epoch"),
               "student_deployed": round(top1(b.distiller.export(), val), 2)}
        if target is not None:
            row["kl_target"] = {k: round(v, 3) for k, v in target.items()}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
