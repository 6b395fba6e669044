"""The honest protocol's pieces: linear probes, paired intervals, equal tuning budgets, augmented views."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prockd.analysis.probe import fit_probe
from prockd.bench.common import paired_ci, scaled, verdict
from prockd.classification.config import TrainConfig, build_config
from prockd.classification.data import ArrayDataset
from prockd.classification.engine import affine_batch, build, make_views
from prockd.classification.methods import METHODS


def test_paired_ci_matches_direct_student_t():
    a, b = [82.0, 83.0, 85.0, 81.5, 86.0], [80.0, 81.0, 82.0, 80.5, 82.0]
    d = np.array(a) - np.array(b)
    t975 = {4: 2.7764451051977987}[len(d) - 1]  # Student-t quantile, 4 degrees of freedom
    half = t975 * d.std(ddof=1) / math.sqrt(len(d))
    ci = paired_ci(a, b)
    assert ci["mean"] == pytest.approx(d.mean(), abs=1e-3) and ci["ci95"] == pytest.approx(half, abs=1e-3)
    assert verdict(ci) == "better" and verdict(paired_ci(b, a)) == "worse"
    assert verdict(paired_ci([1.0, -1.0, 0.5], [0.0, 0.0, 0.0])) == "no difference"
    assert paired_ci([1.0], [0.0])["ci95"] is None


def test_linear_probe_separates_informative_features_not_noise():
    g = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    informative = np.eye(3)[y] * 3 + g.normal(size=(120, 3))
    noise = g.normal(size=(120, 3))
    tr, te = slice(0, None, 2), slice(1, None, 2)
    good = fit_probe(informative[tr], y[tr], {"t": (informative[te], y[te])})["t"]
    bad = fit_probe(noise[tr], y[tr], {"t": (noise[te], y[te])})["t"]
    assert good > 90 and bad < 60


def test_tuning_scales_each_methods_main_weights_together():
    assert scaled(METHODS, "fitnets", {}, 3.0) == {"weight": 3.0}
    assert scaled(METHODS, "rkd", {"lambda_dist": 10.0}, 0.5) == {"lambda_dist": 5.0, "lambda_angle": 25.0}
    p = scaled(METHODS, "prockd", {"preset": "paper", "num_prototypes": 8}, 3.0)
    assert p == {"preset": "paper", "num_prototypes": 8, "lambda_kl": 3.0, "lambda_emb": 3.0}
    # the default preset (robust_calibrated) carries λ_kl = λ_emb = 3: the factor multiplies those
    assert scaled(METHODS, "prockd", {}, 3.0) == {"lambda_kl": 9.0, "lambda_emb": 9.0}
    assert scaled(METHODS, "student_only", {}, 3.0) == {}


def test_affine_identity_and_quarter_turn():
    x = torch.rand(2, 1, 8, 8)
    g = torch.Generator().manual_seed(0)
    assert torch.allclose(affine_batch(x, g, 0.0, 0.0, 0.0), x, atol=1e-6)
    # a 90° turn of a square image is a transpose + flip: rotation range 90 draws ±90 · u, so force u = 1
    g = torch.Generator().manual_seed(0)
    u = torch.rand(2, 4, generator=g, dtype=torch.float64) * 2 - 1
    g = torch.Generator().manual_seed(0)
    out = affine_batch(x, g, 90.0 / float(u[0, 0]), 0.0, 0.0)
    assert torch.allclose(out[0], torch.rot90(x[0], 1, (1, 2)), atol=1e-5) or \
        torch.allclose(out[0], torch.rot90(x[0], -1, (1, 2)), atol=1e-5)


def test_views_are_deterministic_and_independent_of_the_run_seed():
    ds = ArrayDataset((torch.rand(5, 1, 8, 8) * 255).to(torch.uint8), torch.arange(5))
    t = TrainConfig(augment="affine", aug_views=3)
    v1, v2 = make_views(ds, t), make_views(ds, t)
    assert len(v1) == 15 and torch.equal(v1.images, v2.images) and torch.equal(v1.labels, ds.labels.repeat(3))
    assert not torch.equal(v1.images[:5], v1.images[5:10])


@pytest.mark.parametrize("method", ["prockd", "fitnets"])
def test_cached_and_live_teacher_see_the_same_augmented_view(tiny, tmp_path, method):
    from prockd.classification.cache import TeacherCache
    from prockd.classification.engine import cached_dataset

    raw = tiny(method)
    raw["train"].update(augment="affine", aug_views=4)
    cfg = build_config(raw)
    b = build(cfg)
    views = cached_dataset(b.task, cfg.train)
    cache = TeacherCache(b.teacher, views, tmp_path / "c", "float32").prepare()
    idx = torch.tensor([0, len(b.task.train) + 3, 3 * len(b.task.train) + 1])
    x, y = views.images[idx].float() / 255, views.labels[idx]
    b.distiller.eval()
    torch.manual_seed(0)
    _, cached = b.distiller(x, y, teacher_feats=cache.get(idx))
    torch.manual_seed(0)
    _, live = b.distiller(x, y)
    assert set(cached) == set(live)
    for k in live:
        assert torch.allclose(cached[k], live[k], atol=1e-5), k
