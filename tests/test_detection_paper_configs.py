"""The paper's detection protocols (Tables 2, 3, 5, 6) as shipped: each config builds its detectors (as named:
ResNeXt-101 teacher, ResNet-50 / ResNet-18 students) and runs one training step on files the test writes in
that dataset's layout (image sizes overridden to 64 px; the teacher's weights file replaced by a random
teacher, which a unit test cannot download)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_cityscapes_convert import write_cityscapes
from test_detection_pipeline import write_coco, write_voc

from prockd.tasks import load_any_config

PAPER = Path(__file__).resolve().parents[1] / "configs" / "detection" / "paper"
SMALL = ["student.min_size=[64]", "student.max_size=64", "teacher.min_size=[64]", "teacher.max_size=64",
         "student.backbone_weights=none", "teacher.checkpoint=null", "teacher.num_classes=90",
         "train.batch_size=2", "train.max_steps=1", "train.progress=false", "data.num_workers=0",
         "student.rpn_post_nms_test=20", "student.box_detections_per_img=10"]
CITY = ["bicycle", "bus", "car", "motorcycle", "person", "rider", "train", "truck"]


def _coco_overrides(tmp_path, split_keys, classes):
    img, ann = write_coco(tmp_path / "d", n=2, classes=tuple(classes))
    return [f"data.{k}={{format: coco, images: {img}, annotations: {ann}}}" for k in split_keys]


@pytest.mark.parametrize("name,beta,methods", [("table2_cityscapes.yaml", None, ["student_only", "cwd", "mgd", "prockd"]),
                                              ("table2_foggy.yaml", 0.02, ["fbkd", "skd_zhang_ma"])])
def test_paper_table2_on_the_official_cityscapes_layout(tmp_path, monkeypatch, name, beta, methods):
    """The shipped Table 2 configs read, unchanged, what ``prockd convert cityscapes`` writes from the
    official layout under ``data/cityscapes``."""
    from prockd.detection.cityscapes import convert_cityscapes
    from prockd.detection.engine import train

    root = tmp_path / "data" / "cityscapes"
    for split in ("train", "val"):
        write_cityscapes(root, split)
        convert_cityscapes(root, split, foggy_beta=beta, log=lambda _m: None)
    monkeypatch.chdir(tmp_path)
    for m in methods:
        cfg = load_any_config(PAPER / name, SMALL + [f"method.name={m}"])
        assert cfg.data.classes == CITY
        s = train(cfg, tmp_path / m / "run", log=lambda _m: None)
        test = "cityscapes" if beta is None else "foggy_cityscapes"
        assert f"{test}/AP50/car" in s["final"] and f"{test}/mAP50" in s["final"]
        assert s["selected"] is None  # no validation split: no checkpoint is chosen (never on the test set)
        shutil.rmtree(tmp_path / m)  # ~700 MB of ResNet-50 checkpoints per method


CASES = {
    "table5_coco.yaml": (["train", "tests.coco_val"], ["person", "car"], ["fgd", "prockd"]),
    "table6_r18.yaml": (["train", "tests.coco_val"], ["person", "car"], ["skd_zhang_ma"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_paper_coco_layout_configs_one_step(tmp_path, name):
    from prockd.detection.engine import train

    keys, classes, methods = CASES[name]
    extra = []
    if "table5" in name or "table6" in name:
        extra = ["data.classes=[person, car]"]
    for m in methods:
        cfg = load_any_config(PAPER / name, SMALL + _coco_overrides(tmp_path / m, keys, classes) + extra
                              + [f"method.name={m}"])
        assert cfg.teacher.backbone == "resnext101_32x8d"
        assert cfg.student.backbone == ("resnet18" if "table6" in name else "resnet50")
        s = train(cfg, tmp_path / m / "run", log=lambda _m: None)
        assert s["final"]
        shutil.rmtree(tmp_path / m)  # several hundred MB of checkpoints per method


def test_paper_table3_voc_layout_one_step(tmp_path):
    from prockd.detection.engine import train

    root = {}
    for dom, split in (("daytime_clear", "train"), ("night_rainy", "test"), ("dusk_rainy", "test")):
        root[dom] = write_voc(tmp_path / dom / "VOC2007", split=split, names=("bike", "car", "motor", "person"))
    write_voc(root["daytime_clear"], split="test", names=("bike", "car", "motor", "person"))
    ov = [f"data.train.root={root['daytime_clear']}", f"data.val.root={root['daytime_clear']}",
          f"data.tests.night_rainy.root={root['night_rainy']}", f"data.tests.dusk_rainy.root={root['dusk_rainy']}"]
    cfg = load_any_config(PAPER / "table3_diverse_weather.yaml", SMALL + ov)
    assert cfg.data.name_map == {"bike": "bicycle", "motor": "motorcycle"}
    s = train(cfg, tmp_path / "run", log=lambda _m: None)
    assert "night_rainy/AP50/bicycle" in s["final"] and "dusk_rainy/mAP50" in s["final"]
