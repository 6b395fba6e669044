"""The detection transfer set (``data.unlabeled``): images without boxes feed the distillation terms only."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from prockd.detection.config import build_det_config
from prockd.errors import ProckdError
from tests.test_detection_pipeline import det_setup  # noqa: F401 - the shared tiny detectors and data


def _folder(root, n=3, size=64):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / f"u{i}.png")
    (root / "notes.txt").write_text("not an image")
    return root


def _raw(base, method, udir, **train):
    raw = dict(base, method={"name": method})
    raw["data"] = dict(base["data"], unlabeled={"dir": str(udir), "batch_size": 2})
    raw["train"] = dict(base["train"], **train)
    return raw


def test_unlabeled_batch_adds_the_methods_terms_on_it(det_setup, tmp_path):  # noqa: F811
    """The ``_u`` terms are the method's own distillation terms computed directly on the unlabelled batch."""
    from prockd.detection.engine import DetectionHooks, build

    _, base = det_setup
    b = build(build_det_config(_raw(base, "cwd", _folder(tmp_path / "u"))), log=lambda m: None)
    assert len(b.data.unlabeled) == 3 and all(r.image_id >= 10**9 for r in b.data.unlabeled.records)
    hooks = DetectionHooks(b.cfg, b)
    from prockd.core.distributed import DistInfo

    info = DistInfo(rank=0, world=1, local_rank=0)
    batch = next(iter(hooks.epoch_batches(0, info)))
    inputs, _ = hooks.step_inputs(batch, info)
    images, targets, u_images, u_targets = inputs
    assert len(u_images) == 2 and all(len(t["boxes"]) == 0 for t in u_targets)
    d = b.distiller.train()
    torch.manual_seed(0)
    losses = d(*inputs)
    assert set(losses) >= {"cwd", "cwd_u", "loss_classifier"}
    il, tg = d.student.transform(u_images, u_targets)
    feats = d.features(il.tensors)
    t_feats, t_stem = d.teacher.pyramid(il.tensors, [tuple(f.shape[-2:]) for f in feats.values()])
    direct = d.distill(feats, t_feats, t_stem, il, tg)["cwd"]
    assert torch.allclose(losses["cwd_u"], direct, rtol=1e-5, atol=1e-7)
    # the detector's own losses are those of the labelled batch alone
    torch.manual_seed(0)
    alone = d(images, targets)
    assert torch.allclose(alone["cwd"], losses["cwd"]) and "cwd_u" not in alone


@pytest.mark.slow
def test_unlabeled_set_changes_distillers_not_student_only_and_skips_box_losses(det_setup, tmp_path):  # noqa: F811
    from prockd.detection.engine import build, train

    _, base = det_setup
    udir = _folder(tmp_path / "u")
    out = {}
    for name, raw in {"so": dict(base, method={"name": "student_only"}),
                      "so_u": _raw(base, "student_only", udir),
                      "cwd": dict(base, method={"name": "cwd"}), "cwd_u": _raw(base, "cwd", udir)}.items():
        raw = dict(raw, train=dict(raw["train"], epochs=1))
        train(build_det_config(raw), tmp_path / name, log=lambda m: None)
        out[name] = torch.load(tmp_path / name / "detector.pt", weights_only=False)["model"]
    assert all(torch.equal(out["so"][k], out["so_u"][k]) for k in out["so"])  # nothing to distil: ignored
    assert not all(torch.equal(out["cwd"][k], out["cwd_u"][k]) for k in out["cwd"])
    assert not build(build_det_config(_raw(base, "fgd", udir)), log=lambda m: None).distiller.reads_unlabeled
    # ProC-KD's teacher-path detection loss needs boxes: not on the unlabelled batch
    raw = _raw(base, "prockd", udir)
    raw["method"] = {"name": "prockd", "params": {"teacher_head": "shared", "lambda_aug": 1.0}}
    b = build(build_det_config(raw), log=lambda m: None)
    ims = [b.data.unlabeled[i][0] for i in range(2)]
    tgs = [b.data.unlabeled[i][1] for i in range(2)]
    lab = [b.data.train[i] for i in range(2)]
    losses = b.distiller.train()([x for x, _ in lab], [t for _, t in lab], ims, tgs)
    assert "det_aug" in losses and "det_aug_u" not in losses and "mimic_u" in losses


def test_unlabeled_config_errors(det_setup, tmp_path):  # noqa: F811
    _, base = det_setup
    raw = dict(base, data=dict(base["data"], unlabeled={"canvas_fonts": 3}))
    with pytest.raises(ProckdError, match="canvas_fonts is for data.name=canvas"):
        build_det_config(raw)
    raw = dict(base, data=dict(base["data"], unlabeled={"canvas_fonts": 3, "dir": str(tmp_path)}))
    with pytest.raises(ProckdError, match="exactly one source"):
        build_det_config(raw)
    from prockd.detection.engine import build

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ProckdError, match="no readable image files"):
        build(build_det_config(_raw(base, "cwd", empty)), log=lambda m: None)


def test_unlabeled_canvases_use_other_fonts_and_are_cached(tmp_path):
    from prockd.detection.canvas import UNLABELED_ID, build_unlabeled_canvases, font_splits
    from prockd.detection.config import CanvasConfig
    from prockd.glyphs import charset

    cfg = CanvasConfig(charset="abc", train_fonts=2, val_fonts=2, heldout_fonts=4, cache_dir=str(tmp_path))
    roles = font_splits(cfg, charset(cfg.charset), 3)
    assert len(roles["unlabeled"]) == 3
    others = set(roles["train"]) | set(roles["val"]) | set(roles["test"])
    assert not set(roles["unlabeled"]) & others
    assert roles["train"] == font_splits(cfg, charset(cfg.charset))["train"]  # labelled roles unchanged
    msgs = []
    files = build_unlabeled_canvases(cfg, 3, 5, log=msgs.append)
    assert [i for _, i in files] == [UNLABELED_ID + k for k in range(5)] and all(f.is_file() for f, _ in files)
    assert len(msgs) == 1
    again = build_unlabeled_canvases(cfg, 3, 5, log=msgs.append)
    assert again == files and len(msgs) == 1  # cached: nothing rendered again
    assert np.asarray(Image.open(files[0][0])).shape == (cfg.size, cfg.size)


def test_init_checkpoint_starts_a_new_box_predictor_and_loads_the_rest(det_setup, tmp_path):  # noqa: F811
    from prockd.detection.config import DetectorConfig
    from prockd.detection.models import PREDICTOR, build_detector, init_from_detector

    root, base = det_setup
    from tests.test_detection_pipeline import TINY

    src = torch.load(root / "teacher.pt", weights_only=False)["model"]  # 5 classes
    m = build_detector(DetectorConfig(**TINY, init_checkpoint=str(root / "teacher.pt")), 2)
    own = m.state_dict()
    assert own[PREDICTOR + "cls_score.weight"].shape[0] == 3
    assert all(torch.equal(own[k], src[k]) for k in own if not k.startswith(PREDICTOR))
    fresh = build_detector(DetectorConfig(**TINY), 5)
    note = init_from_detector(fresh, str(root / "teacher.pt"))
    assert note is None and all(torch.equal(fresh.state_dict()[k], src[k]) for k in src)  # same classes: all
    wide = dict(TINY, fpn_channels=24)
    with pytest.raises(ProckdError, match="does not fit"):
        build_detector(DetectorConfig(**wide, init_checkpoint=str(root / "teacher.pt")), 2)


def test_finetuned_teacher_is_trained_once_on_the_students_classes(det_setup, tmp_path):  # noqa: F811
    """``teacher.finetune``: stage 1 trains the teacher with the student's classes, cached; the run's teacher is
    that detector's backbone + FPN."""
    from prockd.detection.engine import build

    root, base = det_setup
    raw = dict(base, method={"name": "cwd"})
    raw["teacher"] = dict(base["teacher"], finetune={"epochs": 1, "milestones": [], "dir": str(tmp_path / "ft")})
    msgs = []
    b = build(build_det_config(raw), log=msgs.append)
    kept = list((tmp_path / "ft").iterdir())
    assert len(kept) == 1 and (kept[0] / "teacher.pt").is_file()
    tuned = torch.load(kept[0] / "teacher.pt", weights_only=False)
    assert tuned["model"]["roi_heads.box_predictor.cls_score.weight"].shape[0] == 3  # car, person + background
    src = torch.load(root / "teacher.pt", weights_only=False)["model"]
    t_state = b.teacher.model.state_dict()
    assert all(torch.equal(t_state[k], tuned["model"][k]) for k in t_state)  # the run's teacher is the fine-tune
    changed = [k for k in t_state if k.startswith("backbone.") and not torch.equal(t_state[k], src[k])]
    assert changed  # the run's teacher holds the fine-tuned backbone, not the original one
    n = len(msgs)
    build(build_det_config(raw), log=msgs.append)
    assert not any("fine-tuning" in m for m in msgs[n:])  # cached
    assert len(list((tmp_path / "ft").iterdir())) == 1
    bad = dict(raw, teacher={k: v for k, v in raw["teacher"].items() if k != "checkpoint"})
    with pytest.raises(ProckdError, match="teacher.finetune needs teacher.checkpoint"):
        build(build_det_config(bad), log=msgs.append)


def test_init_detection_writes_a_config_that_trains(det_setup, tmp_path, capsys):  # noqa: F811
    """``prockd init --task detection``: COCO splits + unlabelled images -> a commented config with the recommended
    method (CWD at its validation-chosen weight; ProC-KD's preset with ``--method prockd``) and the teacher's shape
    read from its file, that trains as written."""
    import yaml

    from prockd.cli import main
    from tests.test_detection_pipeline import write_coco

    root, _ = det_setup
    data = tmp_path / "mydata"
    for split in ("train", "val", "test"):
        img, ann = write_coco(data / split, n=3)
        img.rename(data / split / "images")
    _folder(data / "unlabeled")
    out = tmp_path / "det.yaml"
    assert main(["init", "--task", "detection", "--data", str(data), "--teacher", str(root / "teacher.pt"),
                 "--teacher-backbone", "mobilenet_v2", "--student", "builtin:mobilenet_v2", "--config", str(out)]) == 0
    raw = yaml.safe_load(out.read_text())
    assert raw["method"] == {"name": "cwd", "params": {"weight": 0.1}}  # the benchmark's converged recommendation
    assert "name: prockd, params: {preset: mimic_light}" in out.read_text()  # the alternative, commented
    assert raw["teacher"]["fpn_channels"] == 16 and raw["teacher"]["representation_size"] == 32
    assert raw["data"]["unlabeled"]["dir"].endswith("unlabeled") and raw["student"]["min_size"] == [64]
    assert "finetune" in out.read_text()  # the fine-tuned-teacher option, commented
    assert main(["train", "--config", str(out), f"out={tmp_path / 'run'}", "train.max_steps=1", "train.epochs=1",
                 "train.progress=false", "student.min_size=[64]"]) == 0
    assert (tmp_path / "run" / "detector.pt").is_file()
    prockd_cfg = tmp_path / "det_prockd.yaml"
    assert main(["init", "--task", "detection", "--data", str(data), "--teacher", str(root / "teacher.pt"),
                 "--teacher-backbone", "mobilenet_v2", "--student", "builtin:mobilenet_v2", "--method", "prockd",
                 "--config", str(prockd_cfg)]) == 0
    assert yaml.safe_load(prockd_cfg.read_text())["method"] == {"name": "prockd", "params": {"preset": "mimic_light"}}
    # bad input: one line naming what to add
    assert main(["init", "--task", "detection", "--data", str(data), "--teacher", str(root / "teacher.pt"),
                 "--student", "resnet18"]) == 2
    assert "--teacher-backbone" in capsys.readouterr().err


def test_roi_kd_loss_is_the_temperature_scaled_kl_on_the_same_proposals(det_setup, tmp_path):  # noqa: F811
    """``roi_kd`` (Chen et al. 2017): T² · mean over proposals of KL(teacher ‖ student), checked against a direct
    computation, on the student's proposals of the labelled batch and its inference proposals on an unlabelled one;
    a teacher of other classes is refused with the fix."""
    from prockd.detection.engine import build
    from prockd.detection.methods.roi_kd import roi_kd_loss

    s = torch.randn(7, 4, dtype=torch.float64)
    t = torch.randn(7, 4, dtype=torch.float64)
    for temp in (1.0, 2.0):
        pt, ps = torch.softmax(t / temp, -1), torch.softmax(s / temp, -1)
        direct = (pt * (pt.log() - ps.log())).sum(-1).mean() * temp ** 2
        assert torch.allclose(roi_kd_loss(s, t, temp), direct)
    _, base = det_setup
    with pytest.raises(ProckdError, match="teacher.finetune"):
        build(build_det_config(dict(base, method={"name": "roi_kd"})), log=lambda m: None)
    raw = _raw(base, "roi_kd", _folder(tmp_path / "u"))
    raw["teacher"] = dict(base["teacher"], finetune={"epochs": 1, "milestones": [], "dir": str(tmp_path / "ft")})
    raw["method"] = {"name": "roi_kd", "params": {"temperature": 2.0, "proposals": 5}}
    b = build(build_det_config(raw), log=lambda m: None)
    d = b.distiller.train()
    lab = [b.data.train[i] for i in range(2)]
    unl = [b.data.unlabeled[i] for i in range(2)]
    torch.manual_seed(0)
    losses = d([x for x, _ in lab], [t for _, t in lab], [x for x, _ in unl], [t for _, t in unl])
    assert {"roi_kd", "roi_kd_u"} <= set(losses) and all(torch.isfinite(v) for v in losses.values())
    # the unlabelled term, directly: the student's inference proposals, both box classifiers on them
    il, tg = d.student.transform([x for x, _ in unl], [t for _, t in unl])
    feats = d.features(il.tensors)
    rpn = d.student.rpn
    rpn.training = False
    props, _ = rpn(il, feats)
    rpn.training = True
    props = [p[:5] for p in props]
    t_feats, _ = d.teacher.pyramid(il.tensors, [tuple(f.shape[-2:]) for f in feats.values()])

    def logits(rh, f):
        return rh.box_predictor(rh.box_head(rh.box_roi_pool(f, props, il.image_sizes)))[0]

    direct = roi_kd_loss(logits(d.student.roi_heads, feats), logits(d.teacher.model.roi_heads, dict(t_feats)), 2.0)
    assert torch.allclose(losses["roi_kd_u"], direct, rtol=1e-4, atol=1e-6)
