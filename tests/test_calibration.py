"""A KL target's calibration (NLL, confidence, ECE) against direct computations, and each method's KL target."""
from __future__ import annotations

import math

import pytest
import torch

from prockd.classification.calibration import calibration, kl_target_calibration
from prockd.classification.config import build_config
from prockd.classification.data import ArrayDataset
from prockd.classification.engine import build


def test_calibration_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 5, generator=g) * 3
    labels = torch.randint(0, 5, (200,), generator=g)
    out = calibration(logits, labels, bins=10)
    rows = []
    for z, y in zip(logits.tolist(), labels.tolist()):
        e = [math.exp(v - max(z)) for v in z]
        p = [v / sum(e) for v in e]
        rows.append((max(p), p.index(max(p)) == y, -math.log(p[y])))
    ece = 0.0
    for b in range(10):  # bin b: confidence in (b / 10, (b + 1) / 10]
        inb = [r for r in rows if b / 10 < r[0] <= (b + 1) / 10]
        if inb:
            ece += len(inb) / 200 * abs(sum(r[1] for r in inb) / len(inb) - sum(r[0] for r in inb) / len(inb))
    assert out["acc"] == pytest.approx(100 * sum(r[1] for r in rows) / 200)
    assert out["nll"] == pytest.approx(sum(r[2] for r in rows) / 200, rel=1e-9)
    assert out["confidence"] == pytest.approx(100 * sum(r[0] for r in rows) / 200, rel=1e-9)
    assert out["ece"] == pytest.approx(100 * ece, rel=1e-9)
    sure = calibration(torch.eye(3) * 50, torch.tensor([0, 1, 2]))  # right and certain: no calibration error
    assert sure["acc"] == 100 and sure["ece"] == pytest.approx(0, abs=1e-9)


@pytest.mark.parametrize("method", ["prockd", "probe_distil", "student_only"])
def test_kl_target_is_the_classifier_each_method_distils(tiny, method):
    b = build(build_config(tiny(method)))
    d = b.distiller
    if method == "probe_distil":  # fit the probe, as a run does before training
        feats = {"taps": b.teacher.extract(b.task.train.images.float() / 255, ("taps",))["taps"]}
        d.prepare(lambda: feats, labelled=lambda: (feats, b.task.train.labels))
    d.eval()
    few = ArrayDataset(b.task.train.images[::7], b.task.train.labels[::7])
    x = few.images.float() / 255
    z = d.kl_target(x)
    if method == "student_only":
        assert z is None and kl_target_calibration(d, few) is None
        assert not d.predict(x)["deployed"].requires_grad  # the base class's predict stays without autograd
        return
    taps = b.teacher.extract(x, ("taps",))["taps"]
    direct = d.teacher_path(taps.float())[0] if method == "prockd" else d.probe_logits(taps)
    assert torch.allclose(z, direct, atol=1e-5)
    out = kl_target_calibration(d, few, batch_size=5)  # several batches, one answer
    assert out == pytest.approx(calibration(direct, few.labels), rel=1e-5)
    assert set(out) == {"acc", "nll", "confidence", "ece"} and 0 <= out["ece"] <= 100
