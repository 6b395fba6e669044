"""The Cityscapes -> COCO-json converter on a tree the test writes in the official layout (16-bit
``*_gtFine_instanceIds.png``, ``leftImg8bit`` and ``leftImg8bit_foggy`` images): boxes and areas against the
shapes the test drew, excluded classes and crowd regions, the Foggy variant's file names, errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prockd.cli import main
from prockd.detection.cityscapes import CITYSCAPES_LABEL_IDS

CITY_CLASSES = ["bicycle", "bus", "car", "motorcycle", "person", "rider", "train", "truck"]


def write_cityscapes(root: Path, split: str = "train", w: int = 96, h: int = 48, foggy=(0.02,)) -> dict:
    """Two frames of one city: frame 1 with a car (rectangle), a person (L shape, instance 0), a caravan
    (excluded class), a car group (crowd, value < 1000) and road; frame 2 with road only. Returns the
    expected (category name, [x, y, w, h], area) of frame 1."""
    city = root / "gtFine" / split / "aachen"
    city.mkdir(parents=True, exist_ok=True)
    ids = np.full((h, w), 7, np.uint16)  # road
    ids[5:15, 10:30] = 26001  # car, rows 5-14, cols 10-29
    ids[20:40, 40:44] = 24000  # person (instance 0), a vertical bar ...
    ids[36:40, 44:50] = 24000  # ... with a foot: rows 20-39, cols 40-49
    ids[2:8, 60:70] = 29001  # caravan: an instance class Cityscapes does not evaluate
    ids[30:45, 70:90] = 26  # a car group (crowd): no instance
    frames = {"aachen_000000_000019": ids, "aachen_000001_000019": np.full((h, w), 7, np.uint16)}
    for stem, m in frames.items():
        Image.fromarray(m).save(city / f"{stem}_gtFine_instanceIds.png")
        for folder, suffix in [("leftImg8bit", "_leftImg8bit.png")] + [
                ("leftImg8bit_foggy", f"_leftImg8bit_foggy_beta_{b:g}.png") for b in foggy]:
            d = root / folder / split / "aachen"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(d / f"{stem}{suffix}")
    return {"car": ([10, 5, 20, 10], 200), "person": ([40, 20, 10, 20], 20 * 4 + 4 * 6)}


def test_convert_cityscapes_boxes_classes_and_foggy_names(tmp_path):
    expected = write_cityscapes(tmp_path)
    assert main(["convert", "cityscapes", "--root", str(tmp_path), "--splits", "train", "--workers", "1"]) == 0
    data = json.loads((tmp_path / "annotations" / "instancesonly_filtered_gtFine_train.json").read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    assert sorted(names.values()) == CITY_CLASSES
    assert [im["file_name"] for im in data["images"]] == ["aachen/aachen_000000_000019_leftImg8bit.png",
                                                          "aachen/aachen_000001_000019_leftImg8bit.png"]
    assert data["images"][0]["width"] == 96 and data["images"][0]["height"] == 48
    got = {names[a["category_id"]]: (a["bbox"], a["area"]) for a in data["annotations"]}
    assert got == expected  # caravan, the crowd region and road are not instances of the 8 classes
    assert all(a["image_id"] == 1 and a["iscrowd"] == 0 for a in data["annotations"])

    assert main(["convert", "cityscapes", "--root", str(tmp_path), "--splits", "train", "--foggy-beta", "0.02",
                 "--workers", "2"]) == 0
    fog = json.loads((tmp_path / "annotations" / "instancesonly_filtered_gtFine_train_foggy0.02.json").read_text())
    assert fog["images"][0]["file_name"] == "aachen/aachen_000000_000019_leftImg8bit_foggy_beta_0.02.png"
    assert fog["annotations"] == data["annotations"]

    from prockd.detection.data import read_coco

    ds = read_coco(tmp_path / "leftImg8bit_foggy" / "train",
                   tmp_path / "annotations" / "instancesonly_filtered_gtFine_train_foggy0.02.json", CITY_CLASSES)
    sup = {c["name"]: c["supercategory"] for c in ds.coco_gt()["categories"]}  # kept for Fig. 11's Sim curve
    assert sup["person"] == sup["rider"] == "human" and sup["car"] == sup["bicycle"] == "vehicle"
    _, target = ds[0]
    x, y, w, h = expected["car"][0]
    assert [x, y, x + w, y + h] in target["boxes"].tolist()


def test_convert_cityscapes_errors_name_the_culprit(tmp_path, capsys):
    assert main(["convert", "cityscapes", "--root", str(tmp_path)]) == 2
    assert "gtFine" in capsys.readouterr().err
    write_cityscapes(tmp_path, foggy=())
    assert main(["convert", "cityscapes", "--root", str(tmp_path), "--splits", "train", "--foggy-beta", "0.02"]) == 2
    err = capsys.readouterr().err
    assert "aachen_000000_000019_leftImg8bit_foggy_beta_0.02.png" in err and "missing" in err
    assert not (tmp_path / "annotations" / "instancesonly_filtered_gtFine_train_foggy0.02.json").exists()
    (tmp_path / "gtFine" / "train" / "aachen" / "aachen_000001_000019_gtFine_instanceIds.png").write_bytes(b"junk")
    assert main(["convert", "cityscapes", "--root", str(tmp_path), "--splits", "train", "--workers", "1"]) == 2
    assert "aachen_000001_000019_gtFine_instanceIds.png" in capsys.readouterr().err


def test_label_ids_match_the_official_table():
    labels = pytest.importorskip("cityscapesscripts.helpers.labels")
    official = {lab.id: lab.name for lab in labels.labels if lab.hasInstances and not lab.ignoreInEval}
    assert official == CITYSCAPES_LABEL_IDS
