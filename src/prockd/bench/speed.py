"""``prockd bench speed``: training-step throughput and memory, side by side in one run, with ratios.

Variants, each a full optimiser step (forward, backward, AdamW step) on the same batch:

- ``student_only``: the student alone (cross-entropy);
- ``teacher_forward``: the frozen teacher's feature extraction alone (no step);
- ``prockd_live``: ProC-KD with the live teacher; ``prockd_cached``: ProC-KD from the teacher cache
  (a real :class:`~prockd.classification.cache.TeacherCache` on disk, memory-mapped);
- ``teacher_finetune``: a step of ``teacher.finetune``'s stage 1, the teacher's network trained with a new head
  (reported against ``prockd_live`` as ``finetune_step_vs_prockd_step``);
- ``kd_prockd`` / ``kd_torchdistill`` and ``fitnets_prockd`` / ``fitnets_torchdistill``: the same
  models, batch and optimiser, the loss computed by prockd's distiller or by torchdistill's building
  blocks (``ForwardHookManager`` to capture features, ``KDLoss`` / ``SimpleLossWrapper(MSELoss)``).

Timing: warm-up steps, then ``rounds`` rounds in which every variant runs ``steps`` steps in turn
(interleaved, so that drifts of the machine hit all variants alike, and in a rotated order); the per-step time of a variant
is the median over rounds. Peak memory of the PL module (forward + backward) is measured by the CUDA
allocator on GPUs and by glibc's heap statistics sampled after every op on CPU, and compared with
what PL needs: its parameters and their gradients, its input and output and their gradients, and the
tensors autograd saves for the backward pass (measured).
"""
from __future__ import annotations

import copy
import ctypes
import ctypes.util
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from prockd.classification.cache import TeacherCache
from prockd.classification.config import build_config
from prockd.classification.data import ArrayDataset, Task
from prockd.classification.engine import build
from prockd.connectors import student_map, teacher_map
from prockd.core.config import deep_merge
from prockd.core.io import atomic_write_json
from prockd.core.loop import autocast, make_optimizer, resolve_device
from prockd.features import resample_tokens, to_tokens

SCENARIOS = {
    # the embedded benchmark's networks (teacher ResNet 2.8 M at 56 px, ViT student 0.31 M at 28 px)
    "embedded": {
        "image": [1, 28, 28], "classes": 5, "batch_size": 32, "amp": "none",
        "teacher": {"name": "resnet18", "pretrained": False, "in_chans": 1, "input_size": 56, "mean": [0.286], "std": [0.353],
                    "kwargs": {"channels": [32, 64, 128, 256], "stem_width": 32, "num_classes": 5},
                    "taps": ["layer1", "layer2", "layer3"], "fusion_size": [7, 7]},
        "student": {"name": "vit_tiny_patch16_224", "in_chans": 1, "input_size": 28, "mean": [0.286], "std": [0.353],
                    "kwargs": {"img_size": 28, "patch_size": 4, "embed_dim": 64, "depth": 6, "num_heads": 4,
                               "mlp_ratio": 4.0}},
        "prockd": {"num_prototypes": 24, "variant": "B"},
    },
    # the paper's ViT-B/16 -> ViT-B depth 6 at 224 px, batch 64, bf16 (for GPUs)
    "paper": {
        "image": [3, 224, 224], "classes": 100, "batch_size": 64, "amp": "bf16",
        "teacher": {"name": "vit_base_patch16_224", "pretrained": False, "input_size": 224,
                    "kwargs": {"num_classes": 100}},  # step time only: random weights on purpose
        "student": {"name": "vit_base_patch16_224", "input_size": 224, "kwargs": {"depth": 6}},
        "prockd": {"num_prototypes": 24, "variant": "B"},
    },
}


def sync_device(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a timer reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _task(sc: dict, n: int) -> Task:
    g = torch.Generator().manual_seed(0)
    c, h, w = sc["image"]
    images = torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % sc["classes"]
    ds = ArrayDataset(images, labels, "bench")
    return Task(ds, {"test": ds}, [str(i) for i in range(sc["classes"])])


def _raw(sc: dict, method: str, params: dict, device: str, cache_dir: str) -> dict:
    return {"seed": 0, "teacher": copy.deepcopy(sc["teacher"]), "student": copy.deepcopy(sc["student"]),
            "method": {"name": method, "params": params},
            "train": {"batch_size": sc["batch_size"], "amp": sc["amp"], "device": device, "progress": False},
            "cache": {"dir": cache_dir, "dtype": "float16"}}


class _Step:
    """One timed training step of a distiller (optionally fed from a teacher cache)."""

    def __init__(self, built, x, y, cache=None, idx=None):
        self.b, self.x, self.y, self.cache, self.idx = built, x, y, cache, idx
        self.dist = built.distiller.train()
        self.opt = make_optimizer(self.dist.learnable_parameters(), built.cfg.train)

    def __call__(self):
        tf = self.cache.get(self.idx, self.b.device) if self.cache is not None else None
        with autocast(self.b.device, self.b.cfg.train.amp):
            _, losses = self.dist(self.x, self.y, teacher_feats=tf)
            loss = sum(losses.values())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


class _TorchdistillStep:
    """KD or FitNets with torchdistill's feature capture and losses, same models and optimiser."""

    def __init__(self, built, x, y, kind: str):
        from torchdistill.core.forward_hook import ForwardHookManager
        from torchdistill.losses.mid_level import KDLoss, SimpleLossWrapper

        self.b, self.x, self.y, self.kind = built, x, y, kind
        self.dist = built.distiller.train()
        self.opt = make_optimizer(self.dist.learnable_parameters(), built.cfg.train)
        teacher, student = built.teacher, self.dist.student
        self.t_hooks = ForwardHookManager(built.device)
        self.s_hooks = ForwardHookManager(built.device)
        if kind == "kd":
            p = self.dist.params
            self.loss = KDLoss("fc", "output", "fc", "output", temperature=p.temperature, alpha=p.alpha_ce, beta=p.alpha_kd)
        else:
            for path in teacher.tap_paths:
                self.t_hooks.add_hook(teacher.model, path, requires_input=False, requires_output=True)
            self.loss = SimpleLossWrapper(torch.nn.MSELoss(), input={"is_from_teacher": False, "module_path": "c",
                                                                      "io": "output"},
                                          target={"is_from_teacher": True, "module_path": "t", "io": "output"})
        self.teacher, self.student = teacher, student

    def __call__(self):
        t, s, dev = self.teacher, self.student, self.b.device
        with autocast(dev, self.b.cfg.train.amp):
            with torch.no_grad():
                z_t = t.model(t.transform(self.x))
            t.recorder.pop()
            if self.kind == "kd":
                z_s = s.model(s.transform(self.x))
                loss = self.loss({"fc": {"output": z_s}}, {"fc": {"output": z_t}}, self.y)
            else:
                io = self.t_hooks.pop_io_dict()
                parts = []
                for path in t.tap_paths:
                    tok, lay = to_tokens(io[path]["output"], t.model)
                    parts.append(resample_tokens(tok, lay, (t.tap_layout.h, t.tap_layout.w))[0])
                tok, lay, _ = s.features(self.x)
                z_s = s.head(tok, lay)
                c = self.dist.connector(student_map(tok, lay))
                tm = teacher_map(torch.cat(parts, -1).float(), t.tap_layout, (lay.h, lay.w), dtype=c.dtype)
                loss = F.cross_entropy(z_s, self.y) + self.dist.params.weight * self.loss({"c": {"output": c}},
                                                                                          {"t": {"output": tm}}, None)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def print_speed_tables(times: dict, batch: int, ratios: dict, targets: dict, spread: dict, header: str) -> None:
    """The per-variant step times and the ratios against their targets (both ``prockd bench speed`` tasks)."""
    print(f"{'variant':24s} {'ms/step':>10s} {'images/s':>10s}")
    for k, v in times.items():
        print(f"{k:24s} {1e3 * v:10.2f} {batch / v:10.2f}")
    print(f"{header:34s} {'value':>8s} {'target':>8s}        range over rounds")
    for k, v in ratios.items():
        rng = f"{spread[k][0]:.3f} .. {spread[k][1]:.3f}" if k in spread else ""
        if k not in targets:  # a figure to report, without a target
            print(f"{k:34s} {v:8.3f} {'':>8s} {'':>6s}   {rng}")
            continue
        print(f"{k:34s} {v:8.3f} {'<= ' + str(targets[k]):>8s} {'met' if v <= targets[k] else 'MISSED':>6s}   {rng}")


def time_interleaved(fns: dict, device, steps: int, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Per variant, the seconds per step of each round: ``warmup`` untimed calls each, then ``rounds`` rounds
    in which every variant runs ``steps`` calls in turn, in an order rotated every round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync_device(device)
    per: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:  # rotated: no variant always runs first
            fn = fns[k]
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            sync_device(device)
            per[k].append((time.perf_counter() - t0) / steps)
    return per


class _MallocPeak:
    """Peak of the C heap's allocated bytes (glibc ``mallinfo2``: arena + mmapped blocks) above its level
    at entry, sampled after every aten op (forward and backward) through a dispatch mode."""

    class _Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    def __init__(self):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not hasattr(libc, "mallinfo2"):
            raise RuntimeError("glibc mallinfo2 is not available: no CPU peak-memory measurement")
        self._mallinfo = libc.mallinfo2
        self._mallinfo.restype = self._Info
        self.peak = 0

    def allocated(self) -> int:
        """Bytes allocated from the C heap now."""
        i = self._mallinfo()
        return int(i.uordblks + i.hblkhd)

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                outer.peak = max(outer.peak, outer.allocated() - outer.base)
                return out

        self.base = self.allocated()
        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        return False


def pl_memory(built, x) -> dict:
    """Peak memory of PL forward + backward against parameters, gradients, input, saved tensors, output."""
    dist, dev = built.distiller, built.device
    with torch.no_grad():
        taps = built.teacher.extract(x)["taps"]
        fused = dist.fusion(taps).detach().requires_grad_(True)
    protos = dist.prototypes
    pl = dist.pl
    saved: dict[int, int] = {}
    known = {t.untyped_storage().data_ptr() for t in [fused, protos, *pl.parameters()]}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in known:  # parameters and the input are counted once, below
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = pl(fused, protos)
    param_bytes = sum(p.numel() * p.element_size() for p in pl.parameters()) + protos.numel() * protos.element_size()
    act = fused.numel() * fused.element_size()
    need = {"params_and_grads": 2 * param_bytes, "input": act, "saved_for_backward": sum(saved.values()),
            "output": out.numel() * out.element_size(),
            "activation_grads": act + out.numel() * out.element_size()}  # dL/dO_pro in, dL/dF out
    del out
    # one unmeasured forward + backward first: a first call's one-off allocations (oneDNN primitive caches, scratch for
    # a new thread count: +43 MiB at the paper's scale with 2 threads, none with 1) are not what PL needs per step;
    # then the gradients start unallocated, so that the measured region allocates them as ``need`` counts them
    pl(fused, protos).float().mean().backward()
    for t in (*pl.parameters(), protos, fused):
        t.grad = None
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        o = pl(fused, protos)
        o.float().mean().backward()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base + param_bytes  # parameters were allocated before
        method = "cuda max_memory_allocated"
    else:
        with _MallocPeak() as mp:
            o = pl(fused, protos)
            o.float().mean().backward()
        peak = mp.peak + param_bytes + need["input"]  # both existed before the measured region
        method = "glibc mallinfo2 after every op (forward and backward)"
    total_need = sum(need.values())
    return {"peak_bytes": int(peak), "need_bytes": int(total_need), "need": need, "ratio": peak / total_need,
            "method": method, "shape": {"batch": int(fused.shape[0]), "tokens": int(fused.shape[1]),
                                        "width": int(fused.shape[2]), "prototypes": int(protos.shape[0])}}


def run_speed(scenario: str = "embedded", device: str = "auto", steps: int = 5, rounds: int = 5, warmup: int = 3,
              batch_size: int | None = None, amp: str | None = None, threads: int | None = None,
              out: Path | None = None, overrides: dict | None = None) -> dict:
    """Measure every variant side by side, print the figures and the target ratios, write JSON."""
    if threads:
        torch.set_num_threads(threads)
    sc = deep_merge(SCENARIOS[scenario], overrides or {})
    if batch_size:
        sc["batch_size"] = batch_size
    if amp:
        sc["amp"] = amp
    dev = resolve_device(device)
    bs = sc["batch_size"]
    task = _task(sc, 2 * bs)
    x = task.train.images[:bs].float().div(255).to(dev)
    y = task.train.labels[:bs].to(dev)
    idx = torch.arange(bs)
    tmp = tempfile.TemporaryDirectory(prefix="prockd-bench-")
    dev_name = str(dev)

    def built(method, params):
        return build(build_config(_raw(sc, method, params, dev_name, tmp.name), f"bench {method}"), task=task)

    b_student = built("student_only", {})
    b_prockd = built("prockd", sc["prockd"])
    teacher = b_prockd.teacher

    cache = TeacherCache(teacher, task.train, tmp.name, "float16", device=dev, log=lambda *_: None).prepare()
    b_cached = build(build_config(_raw(sc, "prockd", sc["prockd"], dev_name, tmp.name), "bench"), task=task,
                     teacher=teacher)
    kd_params = {"shared_label_space": True}
    b_kd = build(build_config(_raw(sc, "kd", kd_params, dev_name, tmp.name), "bench kd"), task=task, teacher=teacher)
    b_fit = build(build_config(_raw(sc, "fitnets", {}, dev_name, tmp.name), "bench fitnets"), task=task, teacher=teacher)

    # stage 1 of fine-tune-then-distil (teacher.finetune): the teacher's own network trained with a new head of the
    # task's classes, one optimiser step on the same batch
    net = {k: v for k, v in copy.deepcopy(sc["teacher"]).items() if k not in ("taps", "fusion_size", "embed_tap")}
    net["kwargs"] = {k: v for k, v in net.get("kwargs", {}).items() if k != "num_classes"}
    b_ft = build(build_config(dict(_raw(sc, "student_only", {}, dev_name, tmp.name), student=net), "bench finetune"),
                 task=task)

    def teacher_forward():
        with autocast(dev, sc["amp"]):
            teacher.extract(x)

    fns = {"student_only": _Step(b_student, x, y), "teacher_forward": teacher_forward,
           "prockd_live": _Step(b_prockd, x, y), "prockd_cached": _Step(b_cached, x, y, cache, idx),
           "kd_prockd": _Step(b_kd, x, y), "fitnets_prockd": _Step(b_fit, x, y),
           "teacher_finetune": _Step(b_ft, x, y)}
    td_error = None
    try:
        b_kd2 = build(build_config(_raw(sc, "kd", kd_params, dev_name, tmp.name), "bench kd"), task=task, teacher=teacher)
        b_fit2 = build(build_config(_raw(sc, "fitnets", {}, dev_name, tmp.name), "bench"), task=task, teacher=teacher)
        fns["kd_torchdistill"] = _TorchdistillStep(b_kd2, x, y, "kd")
        fns["fitnets_torchdistill"] = _TorchdistillStep(b_fit2, x, y, "fitnets")
    except ImportError as e:
        td_error = f"torchdistill not importable ({e}): pip install torchdistill"
    per = time_interleaved(fns, dev, steps, rounds, warmup)
    times = {k: statistics.median(v) for k, v in per.items()}
    mem = pl_memory(b_prockd, x)
    tmp.cleanup()

    # ratios from the measurements of the same round (paired: drifts of the machine cancel), median over rounds
    def paired(f) -> tuple[float, list[float]]:
        vals = [f({k: v[i] for k, v in per.items()}) for i in range(rounds)]
        return statistics.median(vals), vals

    rr = {"pl_fa_overhead": paired(lambda t: (t["prockd_live"] - t["teacher_forward"] - t["student_only"])
                                   / (t["teacher_forward"] + t["student_only"])),
          "cached_vs_student_only": paired(lambda t: t["prockd_cached"] / t["student_only"]),
          # what a step of the teacher's fine-tune costs against a step of ProC-KD with the live teacher (reported;
          # the fine-tune's total also depends on its epochs and the labelled set's size)
          "finetune_step_vs_prockd_step": paired(lambda t: t["teacher_finetune"] / t["prockd_live"])}
    if "kd_torchdistill" in per:
        rr["kd_vs_torchdistill"] = paired(lambda t: t["kd_prockd"] / t["kd_torchdistill"])
        rr["fitnets_vs_torchdistill"] = paired(lambda t: t["fitnets_prockd"] / t["fitnets_torchdistill"])
    r = {k: v[0] for k, v in rr.items()}
    spread = {k: [min(v[1]), max(v[1])] for k, v in rr.items()}
    r["pl_peak_memory_vs_need"] = mem["ratio"]
    targets = {"pl_fa_overhead": 0.15, "cached_vs_student_only": 1.3, "kd_vs_torchdistill": 1.0,
               "fitnets_vs_torchdistill": 1.0, "pl_peak_memory_vs_need": 1.2}
    result = {"scenario": scenario, "device": dev_name, "batch_size": bs, "amp": sc["amp"],
              "threads": torch.get_num_threads(), "steps": steps, "rounds": rounds,
              "step_seconds": times, "images_per_second": {k: bs / v for k, v in times.items()},
              "ratios": r, "ratio_range_over_rounds": spread, "per_round_seconds": per, "targets": targets, "met": {k: r[k] <= targets[k] for k in r if k in targets},
              "pl_memory": mem, "torchdistill": td_error,
              "params": {"student": sum(p.numel() for p in b_student.distiller.student.parameters()),
                         "teacher": sum(p.numel() for p in teacher.parameters())}}
    print(f"prockd bench speed: scenario {scenario}, device {dev_name}, batch {bs}, amp {sc['amp']}, "
          f"{torch.get_num_threads()} threads, median of {rounds} rounds x {steps} steps")
    print_speed_tables(times, bs, r, targets, spread, "ratio (median of rounds)")
    print(f"PL peak memory {mem['peak_bytes'] / 2**20:.2f} MiB vs need {mem['need_bytes'] / 2**20:.2f} MiB "
          f"({mem['method']})")
    if td_error:
        print(td_error)
    if out is not None:
        atomic_write_json(Path(out), result)
        print(f"wrote {out}")
    return json.loads(json.dumps(result))
