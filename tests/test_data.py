"""Data: class selection, limited labels, long tail, corruptions, Fashion-MNIST IDX files, CIFAR-100 pickles."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from prockd.classification.config import DataConfig
from prockd.classification.data import build_task, find_fashion_mnist, long_tail_counts
from prockd.shifts import CorruptionConfig, corrupt


def test_long_tail_profile():
    assert long_tail_counts(100, 5, 100) == [100, 31, 10, 3, 1]
    assert long_tail_counts(500, 10, 10)[0] == 500 and long_tail_counts(500, 10, 10)[-1] == 50


def test_class_selection_limited_labels_and_long_tail():
    t = build_task(DataConfig(name="digits", classes=[7, 3], labels_per_class=30))
    assert t.num_classes == 2 and t.class_names == ["7", "3"]
    assert t.info["train_counts"] == [30, 30]
    assert set(t.tests["test"].labels.tolist()) == {0, 1}
    lt = build_task(DataConfig(name="digits", classes=[0, 1, 2, 3, 4], labels_per_class=100, imbalance=10))
    assert lt.info["train_counts"] == long_tail_counts(100, 5, 10)
    again = build_task(DataConfig(name="digits", classes=[7, 3], labels_per_class=30))
    assert torch.equal(again.train.images, t.train.images)


def test_corruptions_are_deterministic_and_shift_the_domain():
    t = build_task(DataConfig(name="digits", classes=[0, 1], corruptions=[{"kind": "fog"}, {"kind": "contrast"},
                                                                         {"kind": "noise", "severity": 5}]))
    assert set(t.tests) == {"test", "test_fog3", "test_contrast3", "test_noise5"}
    clean = t.tests["test"].images.float()
    for k in ("test_fog3", "test_contrast3", "test_noise5"):
        assert t.tests[k].images.dtype == torch.uint8
        assert (t.tests[k].images.float() - clean).abs().mean() > 2
    c = CorruptionConfig(kind="noise", severity=2)
    assert torch.equal(corrupt(t.tests["test"].images, c), corrupt(t.tests["test"].images, c))
    contrast = t.tests["test_contrast3"].images.float()
    assert contrast.std() < clean.std() * 0.8


@pytest.mark.skipif(find_fashion_mnist(None) is None, reason="Fashion-MNIST is not installed (make data)")
def test_fashion_mnist_idx():
    t = build_task(DataConfig(name="fashion_mnist", classes=[5, 6, 7, 8, 9], labels_per_class=100))
    assert tuple(t.train.images.shape) == (500, 1, 28, 28)
    assert len(t.tests["test"]) == 5000
    assert t.class_names[0] == "Sandal"


def test_cifar100_pickle_layout(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 20)):
        obj = {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
               "fine_labels": [i % 4 for i in range(n)], "coarse_labels": [0] * n}
        with open(d / split, "wb") as f:
            pickle.dump(obj, f)
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
    t = build_task(DataConfig(name="cifar100", root=str(tmp_path), classes=[0, 1, 2, 3]))
    assert tuple(t.train.images.shape) == (40, 3, 32, 32) and t.class_names == ["c0", "c1", "c2", "c3"]
