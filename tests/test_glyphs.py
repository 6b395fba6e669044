"""Rendered glyph data: fonts found and given disjoint roles, deterministic renders, validation split by font."""
from __future__ import annotations

import numpy as np
import pytest

from prockd.classification.config import DataConfig
from prockd.classification.data import build_task
from prockd.errors import ProckdError
from prockd.glyphs import Jitter, find_fonts, font_roles, render_set

DEJAVU = ["/usr/share/fonts/truetype/dejavu"]
needs_fonts = pytest.mark.skipif(len(find_fonts(DEJAVU)) < 8, reason="DejaVu fonts are not installed (make data)")


@needs_fonts
def test_fonts_roles_are_disjoint_and_deterministic():
    fonts = find_fonts(DEJAVU)
    assert all(p.suffix == ".ttf" and "math" not in p.name.lower() for p in fonts)
    held, pool = font_roles(fonts, 3, seed=0)
    assert len(held) == 3 and len(pool) == len(fonts) - 3 and not set(held) & set(pool)
    assert font_roles(fonts, 3, seed=0) == (held, pool) and font_roles(fonts, 3, seed=1) != (held, pool)


@needs_fonts
def test_render_is_deterministic_centred_and_cached(tmp_path):
    fonts = find_fonts(DEJAVU)[:2]
    x, y, f = render_set(fonts, "ab", 2, jitter=Jitter(), cache_dir=tmp_path)
    assert x.shape == (8, 1, 28, 28) and x.dtype == np.uint8 and y.tolist() == [0, 0, 1, 1] * 2
    assert f.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert not np.array_equal(x[0], x[1])  # two jittered copies differ
    x2, _, _ = render_set(fonts, "ab", 2, jitter=Jitter(), cache_dir=tmp_path / "other")
    assert np.array_equal(x, x2)  # rendered again from scratch: the same pixels
    clean, _, _ = render_set(fonts, "ab", 1, jitter=None, cache_dir=tmp_path)
    ys, xs = np.nonzero(clean[0, 0] > 0)
    assert ys.max() - ys.min() + 1 == 22 or xs.max() - xs.min() + 1 == 22  # longer side scaled to glyph_px
    assert abs((ys.min() + ys.max()) / 2 - 13.5) <= 1 and abs((xs.min() + xs.max()) / 2 - 13.5) <= 1
    (next(tmp_path.glob("*.npz"))).write_bytes(b"corrupted")  # a broken cache file is rendered again
    assert np.array_equal(render_set(fonts, "ab", 2, jitter=Jitter(), cache_dir=tmp_path)[0], x)


@needs_fonts
def test_glyph_task_splits_by_font(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = DataConfig(name="glyphs", glyphs={"charset": "abc", "font_dirs": DEJAVU, "heldout_fonts": 4,
                                           "train_fonts": 5, "val_fonts": 2, "copies": 2, "test_copies": 1})
    task = build_task(cfg)
    assert task.class_names == ["a", "b", "c"] and task.num_classes == 3
    assert len(task.train) == 3 * 3 * 2 and len(task.val) == 2 * 3 * 2 and len(task.tests["test"]) == 4 * 3
    assert task.info["fonts"]["train"] == 3 and task.info["fonts"]["val"] == 2 and task.info["fonts"]["test"] == 4
    lt = build_task(cfg.model_copy(update={"imbalance": 6.0}))
    assert lt.info["train_counts"] == [6, 2, 1]
    with pytest.raises(ProckdError, match="val_fonts"):
        build_task(DataConfig(name="glyphs", glyphs={"font_dirs": DEJAVU, "heldout_fonts": 4, "train_fonts": 2,
                                                     "val_fonts": 2}))


def test_no_fonts_is_a_clear_error(tmp_path):
    with pytest.raises(ProckdError, match="get_fonts.sh"):
        build_task(DataConfig(name="glyphs", glyphs={"font_dirs": [str(tmp_path)]}))


@needs_fonts
def test_a_charset_no_font_covers_names_the_missing_characters():
    with pytest.raises(ProckdError, match=r"only 0 of the \d+ fonts .* fewer than 3 fonts have U\+E000 .* \(in 0\)") as e:
        build_task(DataConfig(name="glyphs", glyphs={"charset": "ab\ue000", "font_dirs": DEJAVU}))
    assert "get_fonts.sh" not in str(e.value) and "charset" in str(e.value)


def test_stratified_validation_split_is_carved_from_training():
    task = build_task(DataConfig(name="digits", classes=[0, 1, 2], labels_per_class=20, val_fraction=0.25))
    assert task.info["train_counts"] == [15, 15, 15] and task.info["val_counts"] == [5, 5, 5]
    tr = {bytes(x.numpy()) for x in task.train.images}
    assert not tr & {bytes(x.numpy()) for x in task.val.images}


@needs_fonts
def test_font_design_agrees_with_the_rendered_widths_and_style_names():
    """font_design (fontTools tables) against PIL's own reading of each DejaVu file: mono exactly when i, l, m
    and W advance alike; a slanted style name (Oblique / Italic) is never 'upright'."""
    from PIL import ImageFont

    from prockd.glyphs import font_design

    seen = set()
    for f in find_fonts(DEJAVU):
        font = ImageFont.truetype(str(f), 40)
        widths = {round(font.getlength(c), 3) for c in "ilmW"}
        design = font_design(f)
        seen.add(design)
        assert (design == "mono") == (len(widths) == 1), (f, design, widths)
        style = font.getname()[1].lower()
        if "oblique" in style or "italic" in style:
            assert design in ("italic", "mono"), (f, design)
        elif design != "mono":
            assert design == "upright", (f, design, style)
    assert {"mono", "italic", "upright"} <= seen


@needs_fonts
def test_cross_design_column_trains_on_one_design_and_tests_on_others(monkeypatch, tmp_path):
    from prockd.glyphs import font_design

    monkeypatch.setenv("HOME", str(tmp_path))
    base = {"charset": "abc", "font_dirs": DEJAVU, "heldout_fonts": 10, "train_fonts": 3, "val_fonts": 1,
            "copies": 1, "test_copies": 1}
    plain = build_task(DataConfig(name="glyphs", glyphs=base))
    cross = build_task(DataConfig(name="glyphs", glyphs={**base, "train_designs": ["upright"],
                                                          "test_designs": ["italic", "mono"]}))
    fonts = find_fonts(DEJAVU)
    held, pool = font_roles(fonts, 10, seed=0)
    d = cross.info["fonts"]["designs"]
    assert sum(d["heldout"].values()) == 10 and sum(d["pool"].values()) == len(pool)
    n_test = sum(font_design(f) in ("italic", "mono") for f in held)
    assert cross.info["fonts"]["test"] == n_test and len(cross.tests["test"]) == 3 * n_test
    assert 0 < n_test < plain.info["fonts"]["test"]
    with pytest.raises(ProckdError, match="test_designs"):
        build_task(DataConfig(name="glyphs", glyphs={**base, "test_designs": ["script"]}))


@needs_fonts
def test_extra_validation_fonts_come_after_the_unlabelled_ones_and_touch_no_other_split(monkeypatch, tmp_path):
    """``val_extra_fonts``: the validation split gains that many pool fonts, those after the labelled and the
    unlabelled ones (compared pixel for pixel with a direct render of exactly those fonts); training, unlabelled and
    test images are unchanged; asking for more fonts than the pool has left is an error naming the key."""
    from prockd.glyphs import eligible_fonts, heldout_count

    monkeypatch.setenv("HOME", str(tmp_path))
    g = {"charset": "abc", "font_dirs": DEJAVU, "heldout_fonts": 4, "train_fonts": 4, "val_fonts": 1, "copies": 1}
    unl = {"glyph_fonts": 3, "copies": 1}
    plain = build_task(DataConfig(name="glyphs", glyphs=g, unlabeled=unl))
    more = build_task(DataConfig(name="glyphs", glyphs={**g, "val_extra_fonts": 5}, unlabeled=unl))
    assert more.info["fonts"]["val"] == 6 and len(more.val) == 6 * 3 == len(plain.val) + 5 * 3
    assert np.array_equal(more.train.images.numpy(), plain.train.images.numpy())
    assert np.array_equal(more.tests["test"].images.numpy(), plain.tests["test"].images.numpy())
    assert np.array_equal(more.unlabeled.images.numpy(), plain.unlabeled.images.numpy())
    fonts = eligible_fonts(DEJAVU, "abc")
    held, pool = font_roles(fonts, heldout_count(len(fonts), 4), 0)
    direct, labels, _ = render_set(pool[3:4] + pool[7:12], "abc", 1, jitter=Jitter(), tag="train")
    assert np.array_equal(more.val.images.numpy(), direct) and more.val.labels.tolist() == labels.tolist()
    with pytest.raises(ProckdError, match="val_extra_fonts=30"):
        build_task(DataConfig(name="glyphs", glyphs={**g, "val_extra_fonts": 30}, unlabeled=unl))
