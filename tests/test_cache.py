"""Frozen-teacher feature cache: same losses as a live teacher, keying, corruption detection."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from prockd.classification.cache import TeacherCache
from prockd.classification.config import build_config
from prockd.classification.engine import build, train


def _cache(b, tmp_path, dtype="float32"):
    return TeacherCache(b.teacher, b.task.train, tmp_path / "c", dtype, batch_size=32, log=lambda m: None)


def test_cached_features_give_the_same_losses(tiny, tmp_path):
    b = build(build_config(tiny()))
    c = _cache(b, tmp_path).prepare()
    assert c.built
    x, y, idx = next(b.task.train.batches(16, torch.Generator().manual_seed(0)))
    live = b.distiller(x, y)[1]
    cached = b.distiller(x, y, teacher_feats=c.get(idx))[1]
    for k in live:
        assert torch.allclose(live[k], cached[k], atol=1e-6), k
    c16 = _cache(b, tmp_path, "float16").prepare()
    half = b.distiller(x, y, teacher_feats=c16.get(idx))[1]
    for k in live:
        assert torch.allclose(live[k], half[k], rtol=2e-3, atol=2e-3), k


def test_training_from_cache_matches_live_teacher(tiny, tmp_path):
    raw = tiny()
    raw["train"]["epochs"] = 2
    live = train(build_config({**raw, "cache": {"enabled": False}}), tmp_path / "live", log=lambda m: None)
    cached = train(build_config(raw), tmp_path / "cached", log=lambda m: None)
    for k, v in live["final"].items():
        if k.startswith(("loss/", "test")):
            assert abs(v - cached["final"][k]) < 1e-4, (k, v, cached["final"][k])


def test_key_changes_with_teacher_taps_transform_and_data(tiny, tmp_path):
    base = _cache(build(build_config(tiny())), tmp_path).key
    raw = tiny()
    raw["teacher"]["taps"] = ["layer2", "layer3"]
    assert _cache(build(build_config(raw)), tmp_path).key != base
    raw = tiny()
    raw["teacher"]["input_size"] = 24
    assert _cache(build(build_config(raw)), tmp_path).key != base
    raw = tiny()
    raw["data"]["labels_per_class"] = 21
    assert _cache(build(build_config(raw)), tmp_path).key != base
    b = build(build_config(tiny()))
    with torch.no_grad():
        next(b.teacher.model.parameters()).add_(1.0)
    assert _cache(b, tmp_path).key != base
    assert _cache(build(build_config(tiny())), tmp_path).key == base


def test_reused_and_corruption_rebuilt(tiny, tmp_path):
    b = build(build_config(tiny()))
    first = _cache(b, tmp_path).prepare()
    ref = np.load(first.dir / "taps.npy")
    again = _cache(b, tmp_path).prepare()
    assert not again.built
    path = again.dir / "taps.npy"
    del first, again
    data = bytearray(path.read_bytes())
    data[-8:] = b"\x00\x00\x80\x7f" * 2  # flip the last values
    path.write_bytes(bytes(data))
    fixed = _cache(b, tmp_path).prepare()
    assert fixed.built and np.array_equal(np.load(fixed.dir / "taps.npy"), ref)
    (fixed.dir / "meta.json").unlink()  # a cache left without its completion record
    assert _cache(b, tmp_path).prepare().built
    meta = json.loads((fixed.dir / "meta.json").read_text())
    assert meta["n"] == len(b.task.train)
    assert not list(fixed.dir.parent.glob("*.tmp-*"))


def test_full_disk_is_an_error_naming_the_cache_not_a_bus_error(tiny, tmp_path, monkeypatch):
    """A cache that does not fit raises a ProckdError naming its folder, and leaves no partial folder.

    The disk cannot be filled in a unit test, so the OS call that reserves the blocks reports ENOSPC
    (what it returns on a full disk); without the reservation the first write into the sparse mapping
    would have killed the process with SIGBUS."""
    import errno
    import os

    import pytest

    from prockd.errors import ProckdError

    b = build(build_config(tiny()))

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(ProckdError, match=r"no room for .* MiB in .*c.*cache\.dir"):
        _cache(b, tmp_path).prepare()
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # the half-built folder is gone


def test_cache_files_are_fully_allocated(tiny, tmp_path):
    """Every array of a built cache has its blocks on disk (not sparse)."""
    b = build(build_config(tiny()))
    c = _cache(b, tmp_path).prepare()
    for f in c.dir.glob("*.npy"):
        st = f.stat()
        assert st.st_blocks * 512 >= st.st_size, f


def test_rows_read_back_are_the_arrays_numpy_wrote(tiny, tmp_path):
    """The cache's positioned reads and writes (no memory map) agree with numpy's own reading of the files, in any
    order and with repeats; a row outside the cache is an error."""
    b = build(build_config(tiny()))
    c = _cache(b, tmp_path).prepare()
    idx = torch.tensor([5, 0, 5, len(b.task.train) - 1, 3])
    got = c.get(idx)
    for name in c.files:
        ref = np.load(c.dir / f"{name}.npy")[idx.numpy()].astype(np.float32)
        assert np.array_equal(got[name].numpy(), ref)
    live = b.teacher.extract(b.task.train.take(idx).float().div(255))
    for name, v in live.items():
        assert torch.allclose(got[name], v.float(), atol=1e-5)
    with pytest.raises(IndexError, match="outside"):
        c.get(torch.tensor([len(b.task.train)]))
