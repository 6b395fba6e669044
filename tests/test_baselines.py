"""Baselines in the distiller interface: each loss against a direct computation and an analytic case."""
from __future__ import annotations

import itertools

import pytest
import torch

from prockd.classification.config import build_config
from prockd.classification.engine import build, train
from prockd.classification.methods.rkd import rkd_angle, rkd_distance
from prockd.errors import ProckdError
from prockd.losses import kl_div


def _huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def test_rkd_distance_matches_loops():
    s, t = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    pairs = [(i, j) for i in range(5) for j in range(5) if i != j]
    ds = {p: float((s[p[0]] - s[p[1]]).norm()) for p in pairs}
    dt = {p: float((t[p[0]] - t[p[1]]).norm()) for p in pairs}
    ms, mt = sum(ds.values()) / len(pairs), sum(dt.values()) / len(pairs)
    ref = sum(_huber(ds[p] / ms - dt[p] / mt) for p in pairs) / 25  # all 5² pairs, the diagonal's zeros too
    assert abs(float(rkd_distance(s, t)) - ref) < 1e-9


def test_rkd_angle_matches_loops():
    s, t = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)

    def cos(e, i, j, k):
        a, b = e[i] - e[j], e[k] - e[j]
        na, nb = a.norm(), b.norm()
        if na == 0 or nb == 0:
            return 0.0
        return float(a @ b / (na * nb))

    triplets = list(itertools.product(range(4), repeat=3))
    ref = sum(_huber(cos(s, i, j, k) - cos(t, i, j, k)) for i, j, k in triplets) / len(triplets)
    assert abs(float(rkd_angle(s, t)) - ref) < 1e-9


def test_rkd_analytic_zero_under_similarity():
    s = torch.randn(6, 4, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    t = 3.0 * s @ q + 1.5  # rotation, scale and shift keep relative distances and angles
    assert float(rkd_distance(s, t)) < 1e-12 and float(rkd_angle(s, t)) < 1e-12


def test_kd_refuses_cross_task_and_matches_direct_formula(tiny):
    with pytest.raises(ProckdError, match="method 'kd' needs teacher and student to share one label space"):
        build(build_config(tiny("kd")))  # teacher has 4 classes, the student task 5
    raw = tiny("kd")
    raw["teacher"]["kwargs"]["num_classes"] = 5
    with pytest.raises(ProckdError, match="shared_label_space"):
        build(build_config(raw))
    raw["method"]["params"] = {"shared_label_space": True, "temperature": 2.0}
    b = build(build_config(raw))
    x = b.task.train.images[:8].float() / 255
    y = b.task.train.labels[:8]
    z_s, losses = b.distiller(x, y)
    z_t = b.teacher.predict(x)
    ps, pt = torch.log_softmax(z_s / 2, -1), torch.softmax(z_t / 2, -1)
    ref = (pt * (pt.log() - ps)).sum(-1).mean() * 4
    assert torch.allclose(losses["kd"], ref, atol=1e-5)
    assert float(kl_div(z_t, z_t, 2.0)) < 1e-6


CROSS_TASK = ["fitnets", "rkd", "ab", "ofd", "fbkd", "pkd_projector", "pkd_pearson", "attention_probe", "cwd",
              "mgd", "ssim_kd", "vid", "refilled"]


@pytest.mark.parametrize("method", CROSS_TASK)
def test_cross_task_baselines_train_with_gradients_and_cache(tiny, tmp_path, method):
    b = build(build_config(tiny(method)))
    x = b.task.train.images[:8].float() / 255
    y = b.task.train.labels[:8]
    b.distiller.set_epoch(2, 3)  # the last stage of multi-stage methods
    _, losses = b.distiller(x, y)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in b.teacher.parameters())
    assert all(p.grad is not None for p in b.distiller.student.parameters() if p.requires_grad)
    own = [p for n, p in b.distiller.named_parameters() if not n.startswith("student.")]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in own), "method modules get no gradient"
    live = train(build_config(tiny(method, cache={"enabled": False})), tmp_path / "live", log=lambda m: None)
    cached = train(build_config(tiny(method)), tmp_path / "run", log=lambda m: None)
    assert set(k for k in cached["final"] if k.startswith("loss/")) == {f"loss/{k}" for k in losses}
    assert cached["final"]["test/deployed"] == live["final"]["test/deployed"]
    assert cached["deployed_params"] == cached["student_params"]  # connectors are not deployed


VIT_TEACHER = {"name": "vit_tiny_patch16_224", "pretrained": False, "in_chans": 1, "input_size": 8, "mean": [0.3], "std": [0.4],
               "kwargs": {"img_size": 8, "patch_size": 2, "embed_dim": 12, "depth": 2, "num_heads": 2,
                          "num_classes": 4}}


@pytest.mark.parametrize("method", CROSS_TASK)
def test_baselines_with_a_vit_teacher_and_a_cnn_student(tiny, method):
    """ViT tokens with a class token (teacher) against CNN maps (student): the connectors bridge them."""
    from tests.conftest import TINY_CNN

    student = {k: v for k, v in TINY_CNN.items() if k not in ("taps", "fusion_size")}
    student["kwargs"] = {k: v for k, v in TINY_CNN["kwargs"].items() if k != "num_classes"}
    b = build(build_config(tiny(method, teacher=dict(VIT_TEACHER), student=student)))
    assert b.teacher.tap_layout.prefix == 1
    x = b.task.train.images[:8].float() / 255
    b.distiller.train()
    b.distiller.set_epoch(2, 3)
    z, losses = b.distiller(x, b.task.train.labels[:8])
    assert z.shape == (8, 5) and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_dkd_refuses_cross_task_and_ofd_estimates_negative_margins(tiny, tmp_path):
    with pytest.raises(ProckdError, match="method 'dkd' needs teacher and student to share one label space"):
        build(build_config(tiny("dkd")))
    raw = tiny("dkd")
    raw["method"]["params"] = {"shared_label_space": True}
    raw["teacher"]["kwargs"]["num_classes"] = 5
    s = train(build_config(raw), tmp_path / "dkd", log=lambda m: None)
    assert {"loss/tckd", "loss/nckd", "loss/ce"} <= set(s["final"])
    # pre-ReLU teacher taps (``:input`` of the block's activation) give OFD negative margins
    raw = tiny("ofd")
    raw["teacher"]["taps"] = ["layer2.1.act1:input"]  # (act2 sees a zero-initialised last BN here)
    b = build(build_config(raw))
    train(build_config(raw), tmp_path / "ofd", built=b, log=lambda m: None)
    assert float(b.distiller.margin.max()) < 0


def test_the_old_skd_name_says_where_the_method_went():
    from prockd.classification.methods import METHODS
    from prockd.errors import ProckdError

    with pytest.raises(ProckdError, match="ssim_kd.*Zhang & Ma"):
        METHODS.get("skd")
    assert METHODS.get("ssim_kd").__name__ == "SSIMKD"
