"""``prockd bench deploy``: what deployment costs — the teacher, the student without FA and the deployed
student (backbone + FA + prototypes) side by side in one run, in PyTorch and in onnxruntime, with one thread
count for both.

For each model: parameters, FLOPs of one image (``torch.utils.flop_counter``: matrix products and
convolutions, 2 FLOPs per multiply-add), latency at batch 1 and throughput at a throughput batch. Timing:
warm-up calls, then ``rounds`` rounds in which every (model, engine) pair runs ``repeats`` calls in turn;
a figure is the median over all its calls. Prints the table and the ratios teacher / deployed student and
what FA adds to the student, and writes them to JSON.

Scenarios: ``embedded`` (the glyph benchmark's ResNet-18/2 teacher at 56 px, WRN-16-1 + FA with the paper's
72 prototypes), ``vit`` (the same teacher, the ViT-d6 student of ``configs/analysis/glyphs_vit.yaml``) and
``paper`` (ViT-B/16 -> ViT-B depth 6 at 224 px, 100 classes, 72 prototypes; random weights, the cost does not
depend on them). ``--run DIR`` measures a finished run's own teacher and deployed student instead.
"""
from __future__ import annotations

import copy
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from prockd.classification.config import build_config
from prockd.classification.data import ArrayDataset, Task
from prockd.classification.deploy import default_input_shape
from prockd.classification.engine import build
from prockd.classification.export import (
    check_parity,
    onnx_export_raw,
    ort_session,
)
from prockd.classification.models import Teacher, create_model
from prockd.classification.runs import load_run_student
from prockd.core.io import atomic_write_json

_GLYPH_TEACHER = {"name": "resnet18", "in_chans": 1, "input_size": 56, "mean": [0.15], "std": [0.33],
                  "pretrained": False, "kwargs": {"channels": [32, 64, 128, 256], "stem_width": 32, "num_classes": 36},
                  "taps": ["layer2", "layer3", "layer4"], "fusion_size": [7, 7]}
SCENARIOS = {
    "embedded": {"image": [1, 28, 28], "classes": 26, "teacher": _GLYPH_TEACHER,
                 "student": {"name": "builtin:wrn_16_1", "in_chans": 1, "input_size": 28, "mean": [0.15], "std": [0.33]},
                 "repeats": 20},
    "vit": {"image": [1, 28, 28], "classes": 26, "teacher": _GLYPH_TEACHER,
            "student": {"name": "vit_tiny_patch16_224", "in_chans": 1, "input_size": 28, "mean": [0.15], "std": [0.33],
                        "kwargs": {"img_size": 28, "patch_size": 4, "embed_dim": 64, "depth": 6, "num_heads": 4,
                                   "mlp_ratio": 4.0}},
            "repeats": 20},
    "paper": {"image": [3, 224, 224], "classes": 100,
              "teacher": {"name": "vit_base_patch16_224", "input_size": 224, "pretrained": False,
                          "kwargs": {"num_classes": 100}},
              "student": {"name": "vit_base_patch16_224", "input_size": 224, "pretrained": False, "kwargs": {"depth": 6}},
              "repeats": 3},
}


class TeacherNet(nn.Module):
    """The frozen teacher as a deployable network: its own transform, then its network (no hooks)."""

    def __init__(self, teacher):
        super().__init__()
        self.transform = copy.deepcopy(teacher.transform)
        self.model = copy.deepcopy(teacher.model)
        for m in self.model.modules():
            m._forward_hooks.clear()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher logits in its own label space."""
        return self.model(self.transform(images))


def flops_per_image(model: nn.Module, image: torch.Tensor) -> int:
    """FLOPs of one forward pass on one image (``torch.utils.flop_counter``)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(image[None])
    return int(fc.get_total_flops())


def _models_from_scenario(sc: dict):
    c, h, w = sc["image"]
    ds = ArrayDataset(torch.zeros(2, c, h, w, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), "bench")
    task = Task(ds, {"test": ds}, [str(i) for i in range(sc["classes"])])
    cfg = build_config({"seed": 0, "teacher": copy.deepcopy(sc["teacher"]), "student": copy.deepcopy(sc["student"]),
                        "method": {"name": "prockd", "params": {"preset": "paper"}},
                        "train": {"device": "cpu", "progress": False}}, "bench deploy")
    built = build(cfg, task=task)
    dep = built.distiller.export().eval()
    dep.input_shape = (c, h, w)
    return TeacherNet(built.teacher).eval(), dep, tuple(sc["image"])


def _models_from_run(run: Path):
    dep, cfg, _ = load_run_student(run)
    teacher = Teacher(create_model(cfg.teacher, None, "teacher"), cfg.teacher, need_embed=False)
    return TeacherNet(teacher).eval(), dep, default_input_shape(dep)


def _time_calls(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def run_deploy_bench(scenario: str = "embedded", run: Path | None = None, threads: int | None = None,
                     batch: int = 32, repeats: int | None = None, rounds: int = 3, warmup: int = 2,
                     onnx: bool = True, out: Path | None = None, say=print) -> dict:
    """Measure and print the deployment table; returns (and writes to ``out``) the figures and ratios."""
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    sc = SCENARIOS[scenario]
    repeats = repeats or sc["repeats"]
    say(f"bench deploy: building the models ({'run ' + str(run) if run else 'scenario ' + scenario}), "
        f"{threads} thread(s)")
    teacher, dep, shape = _models_from_run(run) if run else _models_from_scenario(sc)
    models = {"teacher": teacher, "student (no FA)": dep.without_fa(), "deployed student": dep}
    g = torch.Generator().manual_seed(0)
    x1 = torch.rand(1, *shape, generator=g)
    xb = torch.rand(batch, *shape, generator=g)
    res: dict = {"scenario": None if run else scenario, "run": str(run) if run else None, "threads": threads,
                 "batch": batch, "image": list(shape), "torch": torch.__version__, "cpu": platform.processor() or
                 platform.machine(), "device": "cpu", "models": {}}
    for name, m in models.items():
        res["models"][name] = {"params": sum(p.numel() for p in m.parameters()) + (
            int(m.prototypes.numel()) if getattr(m, "prototypes", None) is not None else 0),
            "flops": flops_per_image(m, x1[0])}
    calls = {}
    for name, m in models.items():
        calls[(name, "pytorch", 1)] = lambda m=m: m(x1)
        calls[(name, "pytorch", batch)] = lambda m=m: m(xb)
    tmpdir = None
    if onnx:
        import onnxruntime


        res["onnxruntime"] = onnxruntime.__version__
        tmpdir = tempfile.TemporaryDirectory(prefix="prockd-bench-deploy-")
        for name, m in models.items():
            say(f"bench deploy: exporting {name} to ONNX")
            path = os.path.join(tmpdir.name, f"{len(calls)}.onnx")
            res["models"][name]["onnx_exporter"] = onnx_export_raw(m, xb[:2], path, 18)
            sess = ort_session(path, threads, spin=False)
            par = check_parity(m, sess, xb[:8])
            res["models"][name]["onnx_parity"] = {k: par[k] for k in ("max_abs_diff", "top1_agreement")}
            iname = sess.get_inputs()[0].name
            a1, ab = x1.numpy(), xb.numpy()
            calls[(name, "onnxruntime", 1)] = lambda s=sess, a=a1, i=iname: s.run(None, {i: a})
            calls[(name, "onnxruntime", batch)] = lambda s=sess, a=ab, i=iname: s.run(None, {i: a})
    times: dict = {k: [] for k in calls}
    with torch.inference_mode():
        for fn in calls.values():
            _time_calls(fn, warmup)
        keys = list(calls)
        for r in range(rounds):
            say(f"bench deploy: timing round {r + 1}/{rounds} ({len(keys)} measurements x {repeats} calls)")
            order = keys[r % len(keys):] + keys[:r % len(keys)]
            for k in order:
                times[k] += _time_calls(calls[k], repeats)
    if tmpdir is not None:
        tmpdir.cleanup()
    for (name, engine, b), ts in times.items():
        med = statistics.median(ts)
        d = res["models"][name].setdefault(engine, {})
        if b == 1:
            d["latency_ms_b1"] = 1000 * med
        else:
            d[f"throughput_b{batch}"] = b / med
    t, s, d = (res["models"][k] for k in models)
    ratios = {"params": t["params"] / d["params"], "flops": t["flops"] / d["flops"]}
    fa = {"params": d["params"] - s["params"], "flops_pct": 100 * (d["flops"] / s["flops"] - 1)}
    for engine in ("pytorch", "onnxruntime"):
        if engine in d:
            ratios[f"latency_{engine}"] = t[engine]["latency_ms_b1"] / d[engine]["latency_ms_b1"]
            ratios[f"throughput_{engine}"] = d[engine][f"throughput_b{batch}"] / t[engine][f"throughput_b{batch}"]
            fa[f"latency_{engine}_pct"] = 100 * (d[engine]["latency_ms_b1"] / s[engine]["latency_ms_b1"] - 1)
            fa[f"throughput_loss_{engine}_pct"] = 100 * (1 - d[engine][f"throughput_b{batch}"] / s[engine][f"throughput_b{batch}"])
    res["teacher_over_deployed"] = ratios
    res["fa_adds"] = fa
    say(format_table(res))
    if out:
        atomic_write_json(out, res)
        say(f"written: {out}")
    return res


def format_table(res: dict) -> str:
    """The deployment table as Markdown, with the ratios."""
    b = res["batch"]
    engines = [e for e in ("pytorch", "onnxruntime") if e in next(iter(res["models"].values()))]
    head = "| model | params | GFLOPs/image |" + "".join(
        f" {e} ms @1 | {e} img/s @{b} |" for e in engines)
    lines = [f"deployment cost ({res['threads']} thread(s), {res['device']}, image {res['image']})", head,
             "|" + "---|" * (3 + 2 * len(engines))]
    for name, m in res["models"].items():
        row = f"| {name} | {m['params'] / 1e6:.3f} M | {m['flops'] / 1e9:.4f} |"
        for e in engines:
            tp = m[e][f"throughput_b{b}"]
            row += f" {m[e]['latency_ms_b1']:.2f} | {tp:.{0 if tp >= 100 else 1}f} |"
        lines.append(row)
    r, fa = res["teacher_over_deployed"], res["fa_adds"]
    lines.append("teacher / deployed student: " + ", ".join(f"{k} x{v:.2f}" for k, v in r.items()))
    lines.append("FA (+ prototypes) adds to the student: " + ", ".join(
        f"{k} {v:+.1f}{'' if k == 'params' else ' %'}" if k != "params" else f"params +{v:,}" for k, v in fa.items()))
    return "\n".join(lines)
