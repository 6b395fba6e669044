"""An unlabelled folder left on disk (data.unlabeled.dir): recursive, the usual formats, decoded by loader
workers, its teacher features in the cache beside the labelled ones, unreadable files skipped and counted."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from prockd.classification.config import build_config
from prockd.classification.data import IGNORE, ImageFiles, build_task
from prockd.classification.engine import (
    StreamedViews,
    UnlabeledDraws,
    augment_batch,
    build,
    open_teacher_cache,
    step_pools,
    train,
)
from prockd.core import distributed as ddp
from prockd.errors import ProckdError

FORMATS = ["png", "jpg", "webp", "tiff", "bmp"]


def _folder(root, n=15, broken=True):
    """``n`` images in nested sub-folders, every format, grey and RGB, odd sizes; plus a text file, and a .png
    that is not an image when ``broken``."""
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"part{i % 3}" / ("deep" if i % 2 else "")
        d.mkdir(parents=True, exist_ok=True)
        shape = (9 + i, 7 + i) if i % 2 else (12, 12, 3)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(d / f"{i}.{FORMATS[i % len(FORMATS)]}")
    (root / "notes.txt").write_text("not an image")
    if broken:
        (root / "part0" / "broken.png").write_bytes(b"\x89PNG but not really")
    return root


def _raw(tiny, tmp_path, **unl):
    raw = tiny("prockd")
    raw["data"]["unlabeled"] = {"dir": str(_folder(tmp_path / "unl")), "batch_size": 4, **unl}
    raw["train"].update(augment="affine", aug_views=2, epochs=2)
    return raw


def test_the_folder_stays_on_disk_every_format_found_and_the_broken_file_counted(tiny, tmp_path):
    task = build_task(build_config(_raw(tiny, tmp_path)).data)
    u = task.unlabeled
    assert u.streaming and isinstance(u.images, ImageFiles) and len(u) == 15
    assert {f.rsplit(".", 1)[1] for f in u.images.files} == set(FORMATS)
    assert task.info["unlabeled_skipped"] == 1 and task.info["unlabeled_skipped_files"][0].endswith("broken.png")
    x = u.take(torch.arange(len(u)))
    assert x.dtype == torch.uint8 and tuple(x.shape[1:]) == tuple(task.train.images.shape[1:])
    assert torch.all(u.labels == IGNORE)


def test_streamed_views_are_deterministic_per_item_and_the_recipes_augmentation(tiny, tmp_path):
    cfg = build_config(_raw(tiny, tmp_path))
    task = build_task(cfg.data)
    v = StreamedViews(task.unlabeled.images, 2, cfg.train)
    assert len(v) == 30
    a, b = v.load([17, 3, 17]), v.load([17])
    assert torch.equal(a[0], a[2]) and torch.equal(a[0], b[0])
    # item 17 is view 1 of file 2: the recipe's augmentation of that file, from a generator of (view, file) alone
    g = torch.Generator().manual_seed(20240 * 1_000_003 + 1 * 100_000_007 + 2)
    ref = augment_batch(task.unlabeled.take([2]).float() / 255, cfg.train.augment, g, cfg.train)
    assert torch.equal(a[0], ref[0].mul(255).round().clamp(0, 255).to(torch.uint8))
    assert not torch.equal(v.load([2])[0], a[0])  # view 0 and view 1 of file 2 differ


def test_the_cache_holds_the_teachers_features_of_the_pixels_the_student_draws(tiny, tmp_path):
    cfg = build_config(_raw(tiny, tmp_path))
    b = build(cfg)
    pools = step_pools(b.task, cfg.train)
    assert pools.unlabeled.streaming and len(pools.cached) == 2 * len(b.task.train) + 30
    cache = open_teacher_cache(b, cfg, pools, ddp.DistInfo(), lambda *_: None)
    draws = iter(UnlabeledDraws(pools, 15, 2, 4, 3, seed=7))
    for _ in range(3):
        x8, items = next(draws)
        assert torch.equal(x8, pools.unlabeled.take(items))
        got = cache.get(pools.offset + items)
        live = b.teacher.extract(x8.float() / 255)
        for k, v in live.items():
            assert torch.allclose(got[k], v.float(), atol=1e-5)


def test_loader_workers_change_nothing_and_a_rerun_is_identical(tiny, tmp_path):
    finals = []
    for name, workers in (("w0", 0), ("w2", 2), ("w2b", 2)):
        raw = _raw(tiny, tmp_path)
        raw["data"]["num_workers"] = workers
        raw["cache"]["dir"] = str(tmp_path / f"cache_{name}")
        finals.append(train(build_config(copy.deepcopy(raw)), tmp_path / name, log=lambda *_: None)["final"])
    assert finals[0]["loss/kl"] > 0
    for f in finals[1:]:
        assert f["loss/kl"] == pytest.approx(finals[0]["loss/kl"], rel=1e-6)
        assert f["test/deployed"] == finals[0]["test/deployed"]


def test_a_file_broken_past_its_header_is_named_and_leaves_no_half_written_cache(tiny, tmp_path):
    raw = _raw(tiny, tmp_path)
    bad = tmp_path / "unl" / "part1" / "zz_truncated.png"
    good = (tmp_path / "unl" / "part0" / "0.png").read_bytes()
    bad.write_bytes(good[: len(good) // 2])  # a valid header, pixels cut off
    with pytest.raises(ProckdError, match="zz_truncated.png"):
        train(build_config(raw), tmp_path / "run", log=lambda *_: None)
    cache_root = tmp_path / "cache"
    assert not list(cache_root.glob("*.tmp-*"))
    assert all((d / "meta.json").is_file() for d in cache_root.iterdir() if d.is_dir())


def test_a_folder_without_a_readable_image_names_the_folder(tiny, tmp_path):
    raw = tiny("rkd")
    d = tmp_path / "empty"
    d.mkdir()
    (d / "a.png").write_bytes(b"nope")
    raw["data"]["unlabeled"] = {"dir": str(d)}
    with pytest.raises(ProckdError, match=r"no readable image files .* under .*empty \(1 unreadable"):
        build_task(build_config(raw).data)
