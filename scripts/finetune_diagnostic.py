"""How much a fine-tuned teacher's soft labels say beyond the labels (docs/research/finetune.md): for each fine-tuned
teacher under a cache folder, its top-1, mean confidence (largest softmax probability) and mean entropy of its KD
target (softmax at temperature T) on the labelled training views it was fine-tuned on, on the validation fonts and on
the first test set. Validation and training data only for any choice; the test figure is a description.

    python scripts/finetune_diagnostic.py ~/.cache/prockd/finetuned [--temperature 4]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from prockd.bench.suites import get_suite
from prockd.classification.config import ModelConfig, build_config
from prockd.classification.data import build_task
from prockd.classification.engine import make_views
from prockd.classification.models import Teacher, create_model


@torch.no_grad()
def describe(teacher: Teacher, ds, t: float) -> dict:
    """top-1 (%), mean confidence and mean entropy (nats) of softmax(z / t) of ``teacher`` on ``ds``."""
    n, correct, conf, ent = 0, 0, 0.0, 0.0
    for x, y, _ in ds.batches(256):
        z = teacher.predict(x)
        correct += int((z.argmax(-1) == y).sum())
        conf += float(F.softmax(z, -1).max(-1).values.sum())
        p = F.softmax(z / t, -1)
        ent += float(-(p * p.clamp_min(1e-12).log()).sum(-1).sum())
        n += len(y)
    return {"top1": round(100 * correct / n, 2), "confidence": round(conf / n, 4), f"entropy_T{t:g}": round(ent / n, 3),
            "images": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--temperature", type=float, default=4.0)
    args = ap.parse_args()
    s = get_suite("glyphs")
    net = {k: v for k, v in s.teacher.items() if k not in ("taps", "fusion_size")}
    net["kwargs"] = {k: v for k, v in net["kwargs"].items() if k != "num_classes"}
    for d in sorted(p for p in args.root.iterdir() if (p / "finetune.json").is_file()):
        c = yaml.safe_load((d / "config.yaml").read_text())
        cfg = build_config({"student": c["student"], "data": c["data"], "train": c["train"]})
        task = build_task(cfg.data)
        model = create_model(ModelConfig(**dict(net, checkpoint=str(d / "teacher.pt"))), task.num_classes, "teacher")
        teacher = Teacher(model, ModelConfig(**s.teacher))
        views = make_views(task.train, cfg.train) if cfg.train.aug_views else task.train
        out = {"key": d.name, "charset": c["data"]["glyphs"].get("charset"),
               "imbalance": c["data"].get("imbalance"), "train_designs": c["data"]["glyphs"].get("train_designs"),
               "training views": describe(teacher, views, args.temperature),
               "validation": describe(teacher, task.val, args.temperature)}
        name, ds = next(iter(task.tests.items()))
        out[f"test ({name})"] = describe(teacher, ds, args.temperature)
        print(json.dumps(out))


if __name__ == "__main__":
    main()
