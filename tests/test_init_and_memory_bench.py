"""``prockd init`` from a user's folder, and ``prockd bench memory`` (its figures; the ratio is the benchmark's to
report, not a test's)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from prockd.classification.config import build_config
from prockd.classification.data import find_fashion_mnist
from prockd.classification.init import init_config_text, write_init_config
from prockd.cli import main
from prockd.errors import ProckdError


def _images(d, n=3, shape=(20, 16, 3)):
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(d)))
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(d / f"{i}.png")


def test_init_reads_classes_size_channels_and_proposes_a_validation_split(tmp_path):
    for c in ("cat", "dog", "owl"):
        _images(tmp_path / "d" / c)
        _images(tmp_path / "d" / "test" / c, 2)
    text = init_config_text(tmp_path / "d", "builtin:efficientnet_lite0", "timm/resnet10t")
    cfg = build_config(yaml.safe_load(text))
    assert cfg.data.train_dir == str(tmp_path / "d") and cfg.data.val_fraction == 0.1 and cfg.data.val_dir is None
    assert cfg.student.in_chans == 3 and cfg.student.input_size == 20 and cfg.student.name == "resnet10t"
    assert "# 3 classes, 9 training images (cat: 3, dog: 3, owl: 3); images 20x16, RGB" in text
    assert cfg.method.params == {"preset": "robust_calibrated"} and cfg.data.unlabeled is None


def test_init_errors_name_the_folder_and_what_to_do(tmp_path):
    _images(tmp_path / "a" / "train" / "x")
    _images(tmp_path / "a" / "train" / "y")
    with pytest.raises(ProckdError, match=r"no test/ folder; put held-out images .* in .*/a/test/<class>/"):
        init_config_text(tmp_path / "a", "builtin:efficientnet_lite0", "resnet10t")
    _images(tmp_path / "a" / "test" / "x")
    _images(tmp_path / "a" / "test" / "z")
    with pytest.raises(ProckdError, match="every split needs the same class sub-folders"):
        init_config_text(tmp_path / "a", "builtin:efficientnet_lite0", "resnet10t")
    _images(tmp_path / "one" / "train" / "only")
    with pytest.raises(ProckdError, match="found 1 class folder"):
        init_config_text(tmp_path / "one", "builtin:efficientnet_lite0", "resnet10t")
    with pytest.raises(ProckdError, match="folder not found"):
        init_config_text(tmp_path / "nowhere", "builtin:efficientnet_lite0", "resnet10t")


def test_init_cli_writes_once_and_grey_images_give_one_channel(tmp_path, capsys):
    for c in ("a", "b"):
        _images(tmp_path / "g" / "train" / c, 2, (12, 12))
        _images(tmp_path / "g" / "val" / c, 1, (12, 12))
        _images(tmp_path / "g" / "test" / c, 1, (12, 12))
    _images(tmp_path / "g" / "unlabeled" / "deep", 4, (12, 12))
    out = tmp_path / "c.yaml"
    args = ["init", "--data", str(tmp_path / "g"), "--teacher", "builtin:efficientnet_lite0", "--student",
            "timm/resnet10t", "--config", str(out)]
    assert main(args) == 0
    cfg = build_config(yaml.safe_load(out.read_text()))
    assert cfg.student.in_chans == 1 and cfg.data.val_dir.endswith("val") and cfg.data.unlabeled.dir.endswith("unlabeled")
    assert main(args) == 2 and "exists" in capsys.readouterr().err
    assert main(args + ["--force"]) == 0
    write_init_config(out, tmp_path / "g", "builtin:efficientnet_lite0", "timm/resnet10t", force=True)


@pytest.mark.skipif(find_fashion_mnist(None) is None, reason="needs Fashion-MNIST (make setup)")
def test_bench_memory_measures_each_count_in_its_own_process(tmp_path):
    from prockd.bench.memory import run_memory_bench

    lines = []
    r = run_memory_bench((10, 20), out=tmp_path / "bm", size=28, workers=1, labelled_per_class=8, log=lines.append)
    assert [row["images"] for row in r["rows"]] == [10, 20]
    for row in r["rows"]:
        assert row["peak_rss_mib"] > 100 and row["worker_peak_rss_mib"] > 0 and row["cache_mib"] > 0
    assert r["ratio"] == pytest.approx(r["rows"][1]["peak_rss_mib"] / r["rows"][0]["peak_rss_mib"])
    assert json.loads((tmp_path / "bm" / "bench_memory.json").read_text())["ratio"] == r["ratio"]
    assert any("peak RSS ratio 20 / 10 images" in line for line in lines)
    assert len(list((tmp_path / "bm" / "unlabeled_10").rglob("*.*"))) == 10
    with pytest.raises(ProckdError, match="increasing counts"):
        run_memory_bench((20, 10), out=tmp_path / "bm")


def test_init_proposes_a_recipe_by_the_students_family(tmp_path):
    """A ViT student of the teacher's width starts from the teacher's blocks with the ViT learning rate; one sharing
    nothing is warned about; a CNN gets the CNN rate; a larger labelled set gets the shorter recipe."""
    for c in ("a", "b"):
        _images(tmp_path / "d" / c, shape=(28, 28))
        _images(tmp_path / "d" / "test" / c, 2, shape=(28, 28))
    vit = yaml.safe_load(init_config_text(tmp_path / "d", "vit_base_patch16_224", "vit_base_patch16_224"))
    assert vit["student"]["init_from_teacher"] is True and vit["train"]["lr"] == 0.001
    text = init_config_text(tmp_path / "d", "vit_base_patch16_224", "vit_tiny_patch16_224")
    assert "starts from scratch" in text and "init_from_teacher" not in yaml.safe_load(text)["student"]
    cnn = yaml.safe_load(init_config_text(tmp_path / "d", "builtin:efficientnet_lite0", "timm/resnet10t"))
    assert "init_from_teacher" not in cnn["student"]
    assert (cnn["train"]["lr"], cnn["train"]["epochs"], cnn["train"]["aug_views"]) == (0.003, 60, 8)
    from prockd.classification import init as init_module

    assert init_module.recipe_lines(False, 5000)[1:2] == ["  epochs: 30"]
