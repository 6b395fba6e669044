"""Detection end to end on tiny data written by the tests: datasets and their errors, the evaluator, one
training step of every method, the deployed detector, resume."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prockd.cli import main
from prockd.detection.config import DetectorConfig, build_det_config
from prockd.detection.data import read_coco, read_voc
from prockd.detection.evaluate import coco_metrics, error_analysis
from prockd.detection.methods import DET_METHODS
from prockd.detection.models import build_detector
from tests.conftest import kill_after

TINY = dict(backbone="mobilenet_v2", min_size=[64], max_size=64, fpn_channels=16, representation_size=32,
            anchor_sizes=[8, 16, 32, 64, 128], rpn_batch_per_image=32, rpn_pre_nms_train=100,
            rpn_post_nms_train=50, rpn_pre_nms_test=50, rpn_post_nms_test=20, box_batch_per_image=16,
            norm="train", trainable_layers=5)


def write_coco(root: Path, n: int = 4, classes=("car", "person"), size=64, extra=None) -> tuple[Path, Path]:
    """A COCO-json split of ``n`` random images with two boxes each."""
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(img_dir / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": size, "height": size})
        for j, (x, y) in enumerate([(4, 4), (30, 28)]):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": j % len(classes) + 1,
                         "bbox": [x, y, 20, 24], "area": 480, "iscrowd": 0})
    data = {"images": images, "annotations": anns,
            "categories": [{"id": k + 1, "name": c, "supercategory": "thing"} for k, c in enumerate(classes)]}
    if extra:
        extra(data)
    ann = root / "ann.json"
    ann.write_text(json.dumps(data))
    return img_dir, ann


def write_voc(root: Path, split="train", n=3, names=("car", "bike")) -> Path:
    """A VOC2007-layout split with XML annotations (Diverse-Weather's class names)."""
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(n):
        sid = f"img{i}"
        ids.append(sid)
        Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(root / "JPEGImages" / f"{sid}.jpg")
        objs = "".join(f"<object><name>{nm}</name><difficult>0</difficult><bndbox><xmin>{2 + 14 * k}</xmin>"
                       f"<ymin>3</ymin><xmax>{14 + 14 * k}</xmax><ymax>30</ymax></bndbox></object>"
                       for k, nm in enumerate(names))
        (root / "Annotations" / f"{sid}.xml").write_text(
            f"<annotation><filename>{sid}.jpg</filename><size><width>64</width><height>48</height></size>{objs}"
            "</annotation>")
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def test_read_coco_and_voc(tmp_path):
    img, ann = write_coco(tmp_path / "coco")
    ds = read_coco(img, ann, ["person", "car"])
    assert ds.classes == ["person", "car"] and len(ds) == 4
    im, t = ds[0]
    assert im.shape == (3, 64, 64) and t["boxes"].tolist()[0] == [4.0, 4.0, 24.0, 28.0]
    assert t["labels"].tolist() == [2, 1]  # car is label 2 in the given order
    voc = read_voc(write_voc(tmp_path / "voc"), "train", ["bicycle", "car"], {"bike": "bicycle"})
    assert voc.classes == ["bicycle", "car"] and voc[1][1]["labels"].tolist() == [2, 1]
    gt = voc.coco_gt()
    assert len(gt["annotations"]) == 6 and gt["categories"][0]["name"] == "bicycle"


BAD = {
    "outside": (lambda d: d["annotations"][1].update(bbox=[50, 50, 30, 30]), "annotation 2", "outside"),
    "zero": (lambda d: d["annotations"][2].update(bbox=[5, 5, 0, 10]), "annotation 3", "zero or negative"),
    "category": (lambda d: d["annotations"][0].update(category_id=7), "annotation 1", "unknown category_id 7"),
    "missing": (lambda d: d["images"][1].update(file_name="nope.png"), "nope.png", "not found"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_annotations_exit_2_naming_the_entry(tmp_path, capsys, case):
    edit, entry, words = BAD[case]
    img, ann = write_coco(tmp_path / "d", extra=edit)
    cfg = tmp_path / "c.yaml"
    run = tmp_path / "run"
    cfg.write_text(json.dumps({"task": "detection", "student": TINY, "data": {
        "train": {"images": str(img), "annotations": str(ann)},
        "tests": {"test": {"images": str(img), "annotations": str(ann)}}, "num_workers": 0}}))
    assert main(["train", "--config", str(cfg), "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(ann) in err[0] and entry in err[0] and words in err[0]
    assert not run.exists()


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]"])
def test_empty_or_unreadable_annotation_file(tmp_path, content):
    from prockd.errors import ProckdError

    (tmp_path / "images").mkdir()
    f = tmp_path / "a.json"
    f.write_text(content)
    with pytest.raises(ProckdError, match=str(f)):
        read_coco(tmp_path / "images", f)


def test_voc_unknown_category_names_the_object(tmp_path):
    from prockd.errors import ProckdError

    root = write_voc(tmp_path / "voc", names=("car", "tram"))
    with pytest.raises(ProckdError, match=r"img0.xml: object 1 \('tram'\).*unknown category"):
        read_voc(root, "train", ["car"])


def _gt():
    return {"images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0},
                            {"id": 2, "image_id": 2, "category_id": 2, "bbox": [50, 50, 40, 40], "area": 1600, "iscrowd": 0}],
            "categories": [{"id": 1, "name": "a", "supercategory": "x"}, {"id": 2, "name": "b", "supercategory": "x"}]}


def test_evaluator_hand_built_cases():
    gt = _gt()
    perfect = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.9},
               {"image_id": 2, "category_id": 2, "bbox": [50, 50, 40, 40], "score": 0.8}]
    m = coco_metrics(gt, perfect)
    assert m["AP"] == pytest.approx(100) and m["mAP50"] == pytest.approx(100) and m["APm"] == pytest.approx(100)
    # class a: a higher-scored false positive (on image 2) before its true positive: precision 1/2 at recall 1
    # -> AP50(a) = 50; class b: no detection -> 0; mAP50 = 25
    dets = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.9},
            {"image_id": 2, "category_id": 1, "bbox": [50, 50, 40, 40], "score": 0.95}]
    m = coco_metrics(gt, dets)
    assert m["AP50/a"] == pytest.approx(50) and m["AP50/b"] == pytest.approx(0) and m["mAP50"] == pytest.approx(25)
    # a box shifted to IoU 0.6 (40x40 vs shifted by 10 px: 30*40 / (2*1600 - 1200) = 0.6): AP50 hit, AP75 miss
    m = coco_metrics(gt, [{"image_id": 1, "category_id": 1, "bbox": [20, 10, 40, 40], "score": 0.9}])
    assert m["AP50/a"] == pytest.approx(100) and m["AP75"] == pytest.approx(0)
    assert coco_metrics(gt, [])["mAP50"] == 0.0
    # error analysis: the confusion with b (same supercategory) is forgiven by Sim, FN is 1
    ea = error_analysis(gt, dets)["summary"]["all"]
    assert ea["C50"] == pytest.approx(0.25) and ea["Sim"] == pytest.approx(0.5) and ea["FN"] == pytest.approx(1.0)
    assert ea["C75"] <= ea["C50"] <= ea["Loc"] <= ea["Sim"] <= ea["Oth"] <= ea["BG"] <= ea["FN"]


@pytest.fixture(scope="module")
def det_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("det")
    img, ann = write_coco(root / "train", n=4)
    teacher = build_detector(DetectorConfig(**TINY), 5)
    torch.save({"model": teacher.state_dict()}, root / "teacher.pt")
    base = {"task": "detection", "seed": 0, "student": TINY,
            "teacher": dict(TINY, checkpoint=str(root / "teacher.pt"), fpn_channels=16),
            "data": {"train": {"images": str(img), "annotations": str(ann)},
                     "val": {"images": str(img), "annotations": str(ann)},
                     "tests": {"test": {"images": str(img), "annotations": str(ann)}}, "num_workers": 0},
            "train": {"epochs": 1, "batch_size": 2, "lr": 0.01, "warmup_iters": 1, "milestones": [],
                      "progress": False}}
    return root, base


# roi_kd distils a teacher of the student's classes: its own tests (tests/test_detection_unlabeled.py)
@pytest.mark.parametrize("method", sorted(set(DET_METHODS.names()) - {"roi_kd"}))
def test_one_step_every_method_and_deployed_detector(det_setup, method, tmp_path):
    from prockd.detection.deploy import load_deployed_detector
    from prockd.detection.engine import train

    _, base = det_setup
    raw = dict(base, method={"name": method})
    raw["train"] = dict(base["train"], max_steps=1, keep_state=True)  # last.pt is read below
    summary = train(build_det_config(raw), tmp_path / "run", log=lambda m: None)
    assert "test/mAP50" in summary["final"]
    model, classes = load_deployed_detector(tmp_path / "run" / "detector.pt")
    assert classes == ["car", "person"]
    if method == "prockd":  # FA and prototypes are part of the deployed detector
        assert any("prototypes" in k for k in model.state_dict())
        assert summary["deployed_params"] > sum(p.numel() for p in build_detector(DetectorConfig(**TINY), 2).parameters())
    x = [torch.rand(3, 64, 64)]
    torch.manual_seed(0)
    a = model(x)[0]
    raw2 = dict(raw)
    from prockd.detection.engine import build

    b = build(build_det_config(raw2))
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)["distiller"]
    b.distiller.load_state_dict(state)
    ref = b.distiller.predict(x)[0]
    assert torch.allclose(a["boxes"], ref["boxes"], atol=1e-4) and torch.equal(a["labels"], ref["labels"])


@pytest.mark.parametrize("per_level", [True, False])
def test_prockd_fa_backbone_is_fa_per_level(det_setup, per_level):
    """The deployed backbone applies FA to each level's tokens (shared FA: all levels in one call, same outputs)."""
    from prockd.detection.engine import build

    _, base = det_setup
    b = build(build_det_config(dict(base, method={"name": "prockd", "params": {"per_level": per_level}})))
    bb = b.distiller.student.backbone
    x = torch.rand(1, 3, 64, 64)
    inner = bb.inner(x)
    out = bb(x)
    for k, v in inner.items():
        key = k if per_level else "shared"
        tok = v.flatten(2).transpose(1, 2)
        ref = bb.fa[key](tok, bb.prototypes[key]).transpose(1, 2).reshape(v.shape)
        assert torch.allclose(out[k], ref, atol=1e-5)
    assert len(bb.prototypes) == (5 if per_level else 1)


@pytest.mark.parametrize("per_level", [True, False])
def test_prockd_teacher_path_is_computed_level_by_level(det_setup, per_level):
    """O_l = FA(PL(Fuse(T_l))) on each level alone (PL aggregates each level's own tokens), and the entropy
    statistics are each level's mean entropy averaged over levels, however the levels are batched."""
    from prockd.detection.engine import build

    _, base = det_setup
    b = build(build_det_config(dict(base, method={"name": "prockd", "params": {"per_level": per_level}})))
    d = b.distiller
    bb = d.student.backbone
    torch.manual_seed(1)
    t_feats = {k: torch.randn(2, d.t_width, s, s) for k, s in zip(d.levels, (16, 8, 4, 2, 1))}
    with torch.no_grad():
        out, stats = d.teacher_path(t_feats)
    ent_a, ent_f = [], []
    for k, t in t_feats.items():
        key = k if per_level else "shared"
        tok = t.flatten(2).transpose(1, 2)
        with torch.no_grad():
            fused = torch.relu(d.fusion[key].proj(tok))
            o_pro, a = d.pl[key].forward_with_assignment(fused, bb.prototypes[key])
            o_fa, attn = bb.fa[key].forward_with_attention(o_pro, bb.prototypes[key])
        assert torch.allclose(out[k], o_fa.transpose(1, 2).reshape(2, -1, *t.shape[-2:]), atol=1e-5)
        ent_a.append(float(-(a * a.log()).sum(-1).mean()))
        ent_f.append(float(-(attn * attn.log()).sum(-1).mean()))
    assert stats["assign_entropy"] == pytest.approx(sum(ent_a) / 5, rel=1e-5)
    assert stats["fa_entropy"] == pytest.approx(sum(ent_f) / 5, rel=1e-5)


@pytest.mark.parametrize("head", ["shared", "detached", "separate", "none"])
def test_prockd_teacher_head_options_train_what_they_say(det_setup, head):
    """The teacher path's detection loss reaches the deployed heads only with ``shared``; ``detached`` and
    ``separate`` train the teacher path (fusion, PL) through other weights; ``none`` has no such loss."""
    from prockd.detection.engine import build

    _, base = det_setup
    b = build(build_det_config(dict(base, method={"name": "prockd", "params": {"teacher_head": head,
                                                                                "lambda_emb": 0.0}})))
    d = b.distiller.train()
    images, targets = zip(*(b.data.train[i] for i in range(2)))
    torch.manual_seed(0)
    losses = d(list(images), list(targets))

    def grad(params):
        return sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)

    if head == "none":  # no teacher-path detection loss; the mimic target is detached: fusion and PL stay as built
        assert "det_aug" not in losses
        sum(losses.values()).backward()
        assert grad(d.fusion.parameters()) == 0 and grad(d.pl.parameters()) == 0
        assert grad(d.student.backbone.prototypes.parameters()) > 0  # learned through the student's FA
        return
    losses["det_aug"].backward()

    heads = list(d.student.rpn.parameters()) + list(d.student.roi_heads.parameters())
    assert grad(d.fusion.parameters()) > 0 and grad(d.pl.parameters()) > 0
    assert (grad(heads) > 0) == (head == "shared")
    if head == "separate":
        assert grad(list(d.aux_rpn.parameters()) + list(d.aux_roi.parameters())) > 0
        assert not any("aux_" in k for k in d.export().state_dict())  # never deployed
    if head == "detached":  # the detached call computes what the heads compute
        from prockd.detection.methods.prockd import detached

        x = torch.rand(1, d.s_width, 8, 8)
        cls_logits, _ = d.student.rpn.head([x])
        ref, _ = detached(d.student.rpn.head)([x])
        assert torch.allclose(cls_logits[0], ref[0])


def test_teacher_cache_serves_each_image_and_flip_once_with_the_live_values(det_setup):
    """``train.cache_teacher``: the teacher runs once per (image, flip); cached batches equal the live pyramid."""
    from prockd.detection.data import hflip
    from prockd.detection.engine import build

    _, base = det_setup
    raw = dict(base, method={"name": "cwd"}, train=dict(base["train"], cache_teacher=True))
    b = build(build_det_config(raw))
    d, teacher = b.distiller.train(), b.teacher
    calls = []
    live = teacher.pyramid
    teacher.pyramid = lambda *a: calls.append(1) or live(*a)
    images, targets = map(list, zip(*(b.data.train[i] for i in range(2))))
    flipped_images, flipped_targets = hflip(images, targets, torch.Generator().manual_seed(0))
    assert [t.get("flipped", False) for t in flipped_targets] != [False, False]  # this seed flips one at least
    for ims, tgs in ((images, targets), (flipped_images, flipped_targets)):
        il, tg = d.student.transform(ims, tgs)
        sizes = [tuple(f.shape[-2:]) for f in d.features(il.tensors).values()]
        first = d.teacher_pyramid(il, sizes, tg)
        n = len(calls)
        again = d.teacher_pyramid(il, sizes, tg)
        assert len(calls) == n  # served from the cache
        ref = live(il.tensors, sizes)
        assert all(torch.equal(again[0][k], ref[0][k]) and torch.equal(first[0][k], ref[0][k]) for k in ref[0])
        assert torch.equal(again[1], ref[1])
    assert len(calls) == 2 and d.pyramid_cache.misses == 4 and d.pyramid_cache.hits == 4
    n_flipped = sum(t.get("flipped", False) for t in flipped_targets)
    assert len(d.pyramid_cache.store) == 2 + n_flipped  # each image as it is, and the flipped ones flipped
    d.eval()  # evaluation never reads the cache
    il, tg = d.student.transform(images, targets)
    d.teacher_pyramid(il, sizes, tg)
    assert len(calls) == 3


def test_training_with_the_teacher_cache_equals_training_without(det_setup, tmp_path):
    from prockd.detection.engine import train

    _, base = det_setup
    out = {}
    for cache in (False, True):
        raw = dict(base, method={"name": "cwd"}, train=dict(base["train"], epochs=3, cache_teacher=cache))
        train(build_det_config(raw), tmp_path / str(cache), log=lambda m: None)
        out[cache] = torch.load(tmp_path / str(cache) / "detector.pt", weights_only=False)["model"]
    assert all(torch.equal(out[False][k], out[True][k]) for k in out[False])


def test_eval_from_skips_early_validations_and_selects_among_the_rest(det_setup, tmp_path):
    """``train.eval_from``: validation only from that epoch on (and after the last); the selected checkpoint is
    one of the evaluated epochs."""
    from prockd.detection.engine import train

    _, base = det_setup
    raw = dict(base, method={"name": "student_only"}, train=dict(base["train"], epochs=4, eval_from=3))
    summary = train(build_det_config(raw), tmp_path / "run", log=lambda m: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "val/mAP50" in r] == [2, 3]  # 0-based: epochs 3 and 4
    assert summary["selected"]["epoch"] in (3, 4)


def test_channels_last_detector_gives_the_same_detections(det_setup):
    """``channels_last``: the backbone's convolution weights in channels-last memory, the same detector's outputs
    (float order aside) as the contiguous one with the same weights."""
    ref = build_detector(DetectorConfig(**TINY), 2).eval()
    cl = build_detector(DetectorConfig(**TINY, channels_last=True), 2).eval()
    cl.load_state_dict(ref.state_dict())
    convs = [m.weight for m in cl.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        a, b = ref.backbone(x), cl.backbone(x)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    torch.manual_seed(0)
    with torch.no_grad():
        da, db = ref(list(x)), cl(list(x))
    for u, v in zip(da, db):
        assert torch.allclose(u["boxes"], v["boxes"], atol=1e-3) and torch.equal(u["labels"], v["labels"])


def test_resume_after_kill_equals_uninterrupted(det_setup, tmp_path):
    import subprocess
    import sys

    import yaml

    from prockd.detection.engine import train

    _, base = det_setup
    raw = dict(base, method={"name": "cwd"})
    # the cache is rebuilt after the kill; one thread in the killed process and in this one, which trains the
    # uninterrupted run and resumes the killed one (the CLI's engine: only the kill needs a process of its own)
    raw["train"] = dict(base["train"], epochs=2, cache_teacher=True, num_threads=1)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "prockd.cli", "train", "--config", str(cfg)]
    full = tmp_path / "full"
    train(build_det_config(raw), full, log=lambda _m: None)
    part = tmp_path / "part"
    env = kill_after(3)
    assert subprocess.run(cmd + ["--out", str(part)], env=env, capture_output=True).returncode != 0
    assert (part / "checkpoints" / "last.pt").is_file() and not (part / "final.json").exists()
    logs = []
    train(build_det_config(raw), part, log=logs.append)
    assert any("resumed from" in m for m in logs), logs
    a = torch.load(full / "detector.pt", weights_only=False)["model"]
    b = torch.load(part / "detector.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    fa, fb = (json.loads((d / "final.json").read_text())["final"] for d in (full, part))
    assert all(math.isclose(fa[k], fb[k]) for k in fa)


def test_analyze_detection_runs_figures_6_to_9_and_11(det_setup, tmp_path, capsys):
    from prockd.detection.deploy import load_deployed_detector
    from prockd.detection.engine import train

    _, base = det_setup
    runs = {}
    for m in ("student_only", "prockd"):
        raw = dict(base, method={"name": m})
        raw["train"] = dict(base["train"], max_steps=2)
        train(build_det_config(raw), tmp_path / m, log=lambda _m: None)
        runs[m] = tmp_path / m
    capsys.readouterr()
    assert main(["eval", "--run", str(runs["prockd"])]) == 0  # the deployed file alone, on the config's tests
    ev = json.loads(capsys.readouterr().out)["metrics"]["test"]
    fin = json.loads((runs["prockd"] / "final.json").read_text())["final"]
    assert all(math.isclose(ev[k], fin[f"test/{k}"], abs_tol=1e-9) for k in ev)
    out = tmp_path / "fig"
    assert main(["analyze", "--run", str(runs["prockd"]), "--compare", str(runs["student_only"]), "--images", "2",
                 "--score-thr", "0.05", "--out", str(out)]) == 0
    for f in ("qualitative_test.png", "errors_0_test.png", "errors_1_test.png", "index.html"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0
    res = json.loads((out / "analysis.json").read_text())
    q = res["qualitative"]["test"]
    assert q["ground_truth"] == [2, 2]  # write_coco draws two boxes per image
    model, _ = load_deployed_detector(runs["prockd"] / "detector.pt")
    from prockd.detection.data import read_coco

    ds = read_coco(base["data"]["tests"]["test"]["images"], base["data"]["tests"]["test"]["annotations"])
    names = [Path(r.file).name for r in ds.records]
    with torch.no_grad():
        direct = [int((model([ds.load_image(names.index(n))])[0]["scores"] >= 0.05).sum()) for n in q["images"]]
    assert q["runs"]["prockd"] == direct  # the drawn boxes are the deployed detector's own
    for label in ("prockd", "student_only"):
        s = res["errors"]["test"][label]["all"]
        assert set(s) == {"C75", "C50", "Loc", "Sim", "Oth", "BG", "FN"} and s["FN"] == 1.0
        assert s["C75"] <= s["C50"] <= s["Loc"] <= s["BG"] <= 1.0

    other = dict(base, method={"name": "student_only"})
    img, ann = write_coco(tmp_path / "three", n=2, classes=("car", "person", "bus"))
    other["data"] = dict(base["data"], train={"images": str(img), "annotations": str(ann)}, val=None,
                         tests={"test": {"images": str(img), "annotations": str(ann)}})
    other["train"] = dict(base["train"], max_steps=1)
    train(build_det_config(other), tmp_path / "three_run", log=lambda _m: None)
    capsys.readouterr()
    assert main(["analyze", "--run", str(runs["prockd"]), "--compare", str(tmp_path / "three_run")]) == 2
    assert "other classes" in capsys.readouterr().err


def test_ddp_two_processes_detection(det_setup, tmp_path):
    """torchrun, 2 CPU processes (gloo): each rank trains on its half of every epoch (half the steps), the
    replicas stay identical (DDP averages their gradients; the engine compares the ranks' weights),
    the run's files are written once and the deployed detector reloads; a killed DDP run resumes."""
    import os
    import subprocess
    import sys

    import yaml

    _, base = det_setup
    img, ann = write_coco(tmp_path / "d8", n=8)
    raw = dict(base, method={"name": "prockd"})
    raw["data"] = dict(base["data"], train={"images": str(img), "annotations": str(ann)})
    raw["train"] = dict(base["train"], epochs=2, num_threads=1)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    env = dict(os.environ, OMP_NUM_THREADS="1", PROCKD_DIST_TIMEOUT="120")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "prockd.cli",
           "train", "--config", str(cfg), "--out"]
    r = subprocess.run(cmd + [str(tmp_path / "ddp")], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "ddp" / "final.json").read_text())
    assert s["world_size"] == 2 and s["replicas_identical"] and "test/mAP50" in s["final"]
    hist = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [h["steps"] for h in hist] == [2, 4]  # 8 images, 2 ranks, batch 2: 2 steps per epoch and rank
    from prockd.detection.deploy import load_deployed_detector

    load_deployed_detector(tmp_path / "ddp" / "detector.pt")
    env_kill = kill_after(3, env)
    killed = subprocess.run(cmd + [str(tmp_path / "res")], env=env_kill, capture_output=True, text=True, timeout=600)
    assert killed.returncode != 0
    again = subprocess.run(cmd + [str(tmp_path / "res")], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout + again.stderr
    assert json.loads((tmp_path / "res" / "final.json").read_text())["world_size"] == 2
