"""The streaming path (``data.stream: true``): an ImageFolder left on disk gives the same task as the in-memory
path (labels, validation carve, pixels, batch order), shifted test domains are deterministic, a run trains to
the same weights (teacher cache included), and a broken file is an error naming it."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from prockd.classification.config import build_config
from prockd.classification.data import build_task
from prockd.errors import ProckdError

CLASSES = ("cat", "dog", "owl")


def write_folder(root, per_class: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    for k, c in enumerate(CLASSES):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = rng.integers(0, 60, (20, 24, 3)).astype(np.uint8)
            a[:, :, k] += 150  # a class-coloured image
            Image.fromarray(a).save(root / c / f"{i:03d}.png")
    return str(root)


def _raw(tmp_path, stream: bool, method: str = "prockd") -> dict:
    cnn = {"name": "resnet18", "pretrained": False, "in_chans": 3, "input_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3,
           "kwargs": {"channels": [8, 16, 16, 16], "stem_width": 8, "num_classes": 3},
           "taps": ["layer1", "layer2"], "fusion_size": [2, 2]}
    vit = {"name": "vit_tiny_patch16_224", "in_chans": 3, "input_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3,
           "kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}}
    return {"seed": 0, "teacher": cnn, "student": vit,
            "data": {"name": "imagefolder", "train_dir": str(tmp_path / "train"),
                     "test_dirs": {"test": str(tmp_path / "test")}, "image_size": 16, "val_fraction": 0.25,
                     "corruptions": [{"kind": "fog", "severity": 3}], "stream": stream, "num_workers": 2},
            "method": {"name": method, "params": {"num_prototypes": 4} if method == "prockd" else {}},
            "train": {"epochs": 2, "batch_size": 8, "lr": 2e-3, "warmup_epochs": 1, "progress": False},
            "cache": {"dir": str(tmp_path / f"cache_{stream}"), "dtype": "float32"}}


@pytest.fixture
def folders(tmp_path):
    write_folder(tmp_path / "train", 10, 0)
    write_folder(tmp_path / "test", 4, 1)
    return tmp_path


def test_streamed_task_equals_in_memory(folders):
    mem = build_task(build_config(_raw(folders, False)).data)
    st = build_task(build_config(_raw(folders, True)).data)
    assert st.train.streaming and not mem.train.streaming
    assert st.class_names == mem.class_names and st.image_shape == mem.image_shape == (3, 16, 16)
    for a, b in [(mem.train, st.train), (mem.val, st.val), (mem.tests["test"], st.tests["test"])]:
        assert torch.equal(a.labels, b.labels)
        assert torch.equal(a.images, b.take(torch.arange(len(b))))  # the same decoded, resized pixels
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for (x1, y1, i1), (x2, y2, i2) in zip(mem.train.batches(4, g1), st.train.batches(4, g2), strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(i1, i2)
    fog = st.tests["test_fog3"]
    once, again = fog.take(torch.arange(len(fog))), fog.take(torch.arange(len(fog)))
    assert torch.equal(once, again) and not torch.equal(once, mem.tests["test"].images)  # deterministic shift
    assert st.train.fingerprint() != st.val.fingerprint()


def test_streamed_run_trains_like_in_memory(folders):
    from prockd.classification.engine import train

    res = {}
    for stream in (False, True):
        raw = _raw(folders, stream)
        raw["train"]["keep_state"] = True  # last.pt compared below
        cfg = build_config(raw)
        res[stream] = train(cfg, folders / f"run_{stream}", log=lambda _m: None)
    a = torch.load(folders / "run_False" / "checkpoints" / "last.pt", weights_only=False)["distiller"]
    b = torch.load(folders / "run_True" / "checkpoints" / "last.pt", weights_only=False)["distiller"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert res[False]["final"]["test/deployed"] == res[True]["final"]["test/deployed"]


def test_stream_errors(folders):
    raw = copy.deepcopy(_raw(folders, True))
    raw["data"] = {"name": "digits", "stream": True}
    with pytest.raises(ProckdError, match="data.stream is for data.name=imagefolder"):
        build_config(raw)
    good = (folders / "train" / "dog" / "001.png").read_bytes()
    (folders / "train" / "dog" / "001.png").write_bytes(b"not a png")
    # the files' headers are read when the task is built (their channels and size): a broken one is named then,
    # before anything trains
    with pytest.raises(ProckdError, match=r"^image file \S*dog/001\.png is unreadable"):
        build_task(build_config(_raw(folders, True)).data)
    (folders / "train" / "dog" / "001.png").write_bytes(good[:60])  # a valid header, the pixels cut off
    st = build_task(build_config(_raw(folders, True)).data)  # pixels are read lazily ...
    with pytest.raises(ProckdError, match=r"^image file \S*dog/001\.png is unreadable"):
        for ds in (st.train, st.val):  # ... and a broken one is named (one line) when its batch is read
            list(ds.batches(64))


@pytest.mark.parametrize("stream", [False, True])
def test_imagefolder_keeps_own_size_and_channels_and_reads_val_dir(tmp_path, stream):
    """Grey 12 x 10 images stay 1 x 12 x 10 (no silent upscaling to 224 px RGB); ``val_dir`` is the validation
    split (nothing carved from train); ``image_size`` still resizes when asked."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("val", 2), ("test", 3)):
        for c in CLASSES:
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (12, 10), dtype=np.uint8)).save(tmp_path / split / c / f"{i}.png")
    raw = _raw(tmp_path, stream)
    raw["data"].update(image_size=None, val_fraction=None, val_dir=str(tmp_path / "val"), corruptions=[])
    task = build_task(build_config(raw).data)
    assert task.image_shape == (1, 12, 10)
    assert len(task.train) == 15 and len(task.val) == 6 and task.info["val_counts"] == [2, 2, 2]
    assert tuple(task.val.take(torch.arange(1)).shape) == (1, 1, 12, 10)
    raw["data"]["image_size"] = 16
    assert build_task(build_config(raw).data).image_shape == (1, 16, 16)
    raw["data"].update(val_fraction=0.2)
    with pytest.raises(ProckdError, match="val_dir"):
        build_config(raw)
