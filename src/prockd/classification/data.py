"""Labelled image tasks: Fashion-MNIST, scikit-learn digits, CIFAR-100, ImageFolder, glyphs.

A task selects classes (relabelled 0..k-1), limits labels per class, makes long-tailed training sets
(exponential profile) and adds shifted test domains (fog, contrast, noise corruptions). Images are held in
memory as uint8 tensors, or, for an ImageFolder with ``data.stream: true``, stay on disk
(:class:`ImageFiles`) and are decoded batch by batch by ``DataLoader`` workers: a 100k-image set does not
have to fit in memory; the teacher cache (on disk, read row by row) and the engine work the same on both. An
unlabelled folder (``data.unlabeled.dir``) always stays on disk.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, UnidentifiedImageError
from torchvision.datasets import ImageFolder
from torchvision.transforms import functional as TF

from prockd import glyphs as G
from prockd.classification.config import DataConfig
from prockd.core.distributed import loader_context
from prockd.core.io import unlabeled_files
from prockd.errors import ProckdError, class_difference
from prockd.shifts import CorruptionConfig, corrupt

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_DIRS = ["/usr/share/datasets/fashion-mnist", "~/.cache/prockd/data/fashion-mnist"]


def _load_file(path: str, size: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """One image file as uint8 ``channels x H x W`` (grey or RGB; resized to ``size`` = (H, W) when it differs)."""
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if im.size != (size[1], size[0]):
                im = TF.resize(im, list(size), antialias=True)
            return TF.pil_to_tensor(im)
    except (OSError, UnidentifiedImageError) as e:
        raise ProckdError(f"image file {path} is unreadable ({e}); remove or replace it") from None


GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")  # PIL modes of single-channel images


def folder_geometry(files: list[str], image_size: int | None = None) -> tuple[int, tuple[int, int]]:
    """(channels, (H, W)) an image folder is loaded at: 1 when every image is grey, else 3; ``image_size`` squared
    when given, else the images' own size (the most common one when they differ; the others are resized to
    it). Only the files' headers are read."""
    modes, sizes = set(), {}
    for f in files:
        try:
            with Image.open(f) as im:
                modes.add(im.mode)
                sizes[im.size] = sizes.get(im.size, 0) + 1
        except (OSError, UnidentifiedImageError) as e:
            raise ProckdError(f"image file {f} is unreadable ({e}); remove or replace it") from None
    channels = 1 if modes and modes <= set(GREY_MODES) else 3
    if image_size is not None:
        return channels, (int(image_size), int(image_size))
    w, h = max(sizes, key=lambda k: (sizes[k], k)) if sizes else (224, 224)
    return channels, (int(h), int(w))


class ImageFiles:
    """Images on disk, decoded on demand (the streaming path): ``files`` loaded as ``channels x H x W`` (``size``:
    an int for a square, or (H, W)); ``corruption`` (a shifted test domain) is applied per image with a per-image
    seed."""

    def __init__(self, files: list[str], size: int | tuple[int, int], corruption: CorruptionConfig | None = None,
                 channels: int = 3):
        self.files, self.corruption, self.channels = list(files), corruption, int(channels)
        self.size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(N, C, H, W), as the loaded tensor would have."""
        return (len(self.files), self.channels, *self.size)

    def subset(self, idx) -> "ImageFiles":
        """The files at positions ``idx`` (still on disk)."""
        return ImageFiles([self.files[int(i)] for i in np.asarray(idx).reshape(-1)], self.size, self.corruption,
                          self.channels)

    def with_corruption(self, c: CorruptionConfig) -> "ImageFiles":
        """The same files, shifted by ``c`` when loaded."""
        return ImageFiles(self.files, self.size, c, self.channels)

    def load(self, idx) -> torch.Tensor:
        """uint8 ``len(idx) x C x H x W`` of the files at positions ``idx``."""
        idx = [int(i) for i in torch.as_tensor(idx).reshape(-1)]
        x = torch.stack([_load_file(self.files[i], self.size, self.channels) for i in idx]) if idx else \
            torch.zeros(0, self.channels, *self.size, dtype=torch.uint8)
        if self.corruption is not None:
            x = torch.cat([corrupt(x[k:k + 1], self.corruption, seed=1234 + 7 * i) for k, i in enumerate(idx)]) \
                if idx else x
        return x

    def digest(self, h) -> None:
        """Feed the files' identity (path, size, modification time), the size and the shift to hash ``h``."""
        h.update(f"{self.size}|{self.channels}|{self.corruption}".encode())
        for f in self.files:
            st = os.stat(f)
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode())


@dataclass
class ArrayDataset:
    """Images ``N x C x H x W`` uint8 (a tensor in memory, or :class:`ImageFiles` streamed from disk by
    ``num_workers`` loader processes) and labels ``N`` int64."""

    images: torch.Tensor | ImageFiles
    labels: torch.Tensor
    name: str = "data"
    num_workers: int = 0

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def streaming(self) -> bool:
        """Whether the images stay on disk (anything with ``load``, ``digest`` and ``shape``, e.g.
        :class:`ImageFiles`), decoded batch by batch."""
        return not isinstance(self.images, torch.Tensor)

    def fingerprint(self) -> str:
        """SHA-1 of the images (or of the files' identities when streaming) and labels (the teacher-cache key)."""
        h = hashlib.sha1()
        h.update(str(tuple(self.images.shape)).encode())
        if self.streaming:
            self.images.digest(h)
        else:
            h.update(self.images.numpy().tobytes())
        h.update(self.labels.numpy().tobytes())
        return h.hexdigest()

    def take(self, idx) -> torch.Tensor:
        """uint8 images at positions ``idx`` (read from disk when streaming)."""
        idx = torch.as_tensor(idx)
        return self.images.load(idx) if self.streaming else self.images[idx]

    def batches(self, batch_size: int, generator: torch.Generator | None = None, indices=None):
        """Yield (images float [0,1], labels, indices); shuffled when a generator is given. The same order and
        pixels in memory or streamed (then decoded ahead by ``num_workers`` processes)."""
        idx = torch.arange(len(self)) if indices is None else torch.as_tensor(indices)
        if generator is not None:
            idx = idx[torch.randperm(len(idx), generator=generator)]
        chunks = [idx[s:s + batch_size] for s in range(0, len(idx), batch_size)]
        if not self.streaming:
            for b in chunks:
                yield self.images[b].float().div_(255.0), self.labels[b], b
            return
        for b, x in zip(chunks, chunk_loader(self.images, chunks, self.num_workers)):
            yield x.float().div_(255.0), self.labels[b], b


class _ListSampler(torch.utils.data.Sampler):
    """The chunks a :class:`ChunkStream` reads next (set in the main process before each pass)."""

    def __init__(self):
        self.chunks: list = []

    def __iter__(self):
        return iter(self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)


class _Items(torch.utils.data.Dataset):
    """``images.load(chunk)`` for a chunk of positions handed over by the sampler."""

    def __init__(self, images):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, chunk) -> torch.Tensor:
        return self.images.load(chunk)


class ChunkStream:
    """``DataLoader`` workers decoding ``images.load(chunk)`` for the chunks of each :meth:`read`, ahead and in
    order. ``persistent``: the workers live for the whole stream (started once, not every pass: the per-epoch
    draws from an unlabelled folder left on disk); otherwise each pass starts its own (:func:`chunk_loader`)."""

    def __init__(self, images, num_workers: int, persistent: bool = True):
        self.sampler = _ListSampler()
        self.loader = torch.utils.data.DataLoader(_Items(images), batch_size=None, sampler=self.sampler,
                                                  num_workers=num_workers,
                                                  persistent_workers=persistent and num_workers > 0,
                                                  multiprocessing_context=loader_context(num_workers))

    def read(self, chunks: list[torch.Tensor]):
        """uint8 ``images.load(chunk)`` of each chunk, in order; a worker's :class:`ProckdError` (an unreadable file,
        named) is raised here as one line."""
        self.sampler.chunks = [c.tolist() for c in chunks]
        try:
            yield from self.loader
        except ProckdError as e:  # from a loader worker: its message is the last line of the worker's report
            raise ProckdError(str(e).strip().splitlines()[-1].split("ProckdError: ", 1)[-1]) from None


def chunk_loader(images, chunks: list[torch.Tensor], num_workers: int):
    """One pass of :class:`ChunkStream` over ``chunks`` (``num_workers`` processes started for it; none: here)."""
    return ChunkStream(images, num_workers, persistent=False).read(chunks)


IGNORE = -100  # the target of an unlabelled image: every cross-entropy term skips it (PyTorch's ignore_index)
# the teacher-feature key under which function matching's mixtures are marked (a bool per row) for a method that
# must tell them from unlabelled images (both have the target IGNORE): Distiller.wants_mixture_rows
MIXTURE_KEY = "mixture"


@dataclass
class Task:
    """A training set, named test sets, an optional validation split carved from training data, the labels,
    and an optional unlabelled transfer set of the student's domain (labels all :data:`IGNORE`)."""

    train: ArrayDataset
    tests: dict[str, ArrayDataset]
    class_names: list[str]
    info: dict = field(default_factory=dict)
    val: ArrayDataset | None = None
    unlabeled: ArrayDataset | None = None

    @property
    def num_classes(self) -> int:
        """Size of the label space."""
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images, as the training set holds them."""
        return tuple(int(v) for v in self.train.images.shape[1:])  # tensor or ImageFiles


def _read_idx_gz(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ProckdError(f"IDX file {path} is truncated ({arr.size} values, header says {dims})")
    return arr.reshape(dims)


def find_fashion_mnist(root: str | None) -> Path | None:
    """The first directory holding the four Fashion-MNIST IDX files."""
    cands = [root] if root else [os.environ.get("PROCKD_FASHION_MNIST") or ""] + FASHION_MNIST_DIRS
    for c in cands:
        if not c:
            continue
        p = Path(c).expanduser()
        for d in (p, p / "FashionMNIST" / "raw"):
            if (d / "train-images-idx3-ubyte.gz").is_file() and (d / "t10k-labels-idx1-ubyte.gz").is_file():
                return d
    return None


def load_fashion_mnist(cfg: DataConfig):
    """(train images, train labels, test images, test labels, class names) as numpy arrays."""
    d = find_fashion_mnist(cfg.root)
    if d is None and cfg.download:
        target = Path(cfg.root or "~/.cache/prockd/data/fashion-mnist").expanduser()
        torchvision.datasets.FashionMNIST(str(target), train=True, download=True)
        torchvision.datasets.FashionMNIST(str(target), train=False, download=True)
        d = find_fashion_mnist(str(target))
    if d is None:
        where = cfg.root or ", ".join(FASHION_MNIST_DIRS)
        raise ProckdError(f"Fashion-MNIST not found (looked in {where}): install Debian's "
                          "'dataset-fashion-mnist', set data.root to a directory with the IDX .gz files, "
                          "or set data.download=true")
    return (_read_idx_gz(d / "train-images-idx3-ubyte.gz")[:, None], _read_idx_gz(d / "train-labels-idx1-ubyte.gz"),
            _read_idx_gz(d / "t10k-images-idx3-ubyte.gz")[:, None], _read_idx_gz(d / "t10k-labels-idx1-ubyte.gz"),
            list(FASHION_MNIST_CLASSES))


def load_digits_arrays(cfg: DataConfig):
    """scikit-learn's bundled 8x8 digits, a fixed stratified 70/30 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = np.round(d.images / 16.0 * 255).astype(np.uint8)[:, None]
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.3, random_state=0, stratify=d.target)
    return xtr, ytr, xte, yte, [str(i) for i in range(10)]


def load_cifar100(cfg: DataConfig):
    """CIFAR-100 from the standard python-pickle layout (``cifar-100-python/{train,test,meta}``)."""
    root = Path(cfg.root or "~/.cache/prockd/data").expanduser()
    d = root / "cifar-100-python" if (root / "cifar-100-python").is_dir() else root
    if not (d / "train").is_file() and cfg.download:
        torchvision.datasets.CIFAR100(str(root), train=True, download=True)
        d = root / "cifar-100-python"
    if not (d / "train").is_file() or not (d / "test").is_file():
        raise ProckdError(f"CIFAR-100 not found under {root}: expected cifar-100-python/train and test "
                          "(python-pickle layout); set data.root or data.download=true")

    def read(name):
        try:
            with open(d / name, "rb") as f:
                return pickle.load(f, encoding="latin1")
        except Exception as e:  # noqa: BLE001
            raise ProckdError(f"CIFAR-100 file {d / name} is unreadable: {e}") from None

    tr, te = read("train"), read("test")
    names = read("meta")["fine_label_names"] if (d / "meta").is_file() else [str(i) for i in range(100)]
    conv = lambda o: np.asarray(o["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)  # noqa: E731
    return conv(tr), np.asarray(tr["fine_labels"]), conv(te), np.asarray(te["fine_labels"]), list(names)


def load_imagefolder(cfg: DataConfig):
    """Train, optional validation (``val_dir``) and test ImageFolder directories (one sub-folder per class), at the
    images' own size and channels (grey stays one channel) unless ``image_size`` says otherwise: held in memory,
    or with ``data.stream: true`` left on disk (:class:`ImageFiles`, read batch by batch). Returns (train images,
    labels, validation (images, labels) or None, {test name: (images, labels)}, class names, info)."""
    if not cfg.train_dir or not cfg.test_dirs:
        raise ProckdError("data.name=imagefolder needs data.train_dir and data.test_dirs")

    def samples(key, path):
        p = Path(path).expanduser()
        if not p.is_dir():
            raise ProckdError(f"data.{key}: image folder not found: {p}")
        try:
            ds = ImageFolder(str(p))
        except (FileNotFoundError, RuntimeError) as e:
            raise ProckdError(f"data.{key}: image folder {p}: {e}") from None
        return [f for f, _ in ds.samples], np.asarray([t for _, t in ds.samples]), ds.classes

    ftr, ytr, names = samples("train_dir", cfg.train_dir)
    channels, size = folder_geometry(ftr, cfg.image_size)

    def read(key, path):
        files, y, n2 = samples(key, path)
        if n2 != names:
            raise ProckdError(f"data.{key}: folder {path} has other classes than the training folder "
                              f"{cfg.train_dir} ({class_difference(n2, names)}): every split needs the same class "
                              "sub-folders")
        images = ImageFiles(files, size, channels=channels)
        return (images if cfg.stream else images.load(torch.arange(len(images))).numpy()), y

    xtr = ImageFiles(ftr, size, channels=channels)
    xtr = xtr if cfg.stream else xtr.load(torch.arange(len(xtr))).numpy()
    val = read("val_dir", cfg.val_dir) if cfg.val_dir else None
    tests = {k: read(f"test_dirs.{k}", v) for k, v in cfg.test_dirs.items()}
    return xtr, ytr, val, tests, names, {"image_shape": [channels, *size]}


def load_glyphs(cfg: DataConfig):
    """Glyphs of ``cfg.glyphs.charset``: training fonts from the pool (the last ``val_fonts`` of them as a
    validation split), test on the held-out fonts; optionally scikit-learn's handwritten digits as a
    second, shifted test domain. Returns (train x, y, val x, y or None, {test name: (x, y)}, names, info)."""
    g = cfg.glyphs
    chars = G.charset(g.charset)
    fonts = G.eligible_fonts(g.font_dirs, chars)
    if len(fonts) < 3:
        where = ", ".join(g.font_dirs or G.FONT_DIRS)
        latin = G.find_fonts(g.font_dirs)  # fonts with digits and both Latin cases, whatever the charset
        if len(latin) >= 3:  # the fonts are there: the charset is what they lack
            counts = G.coverage(latin, chars)
            rare = "".join(c for c, n in counts.items() if n < 3)
            raise ProckdError(f"data.glyphs.charset {g.charset!r}: only {len(fonts)} of the {len(latin)} fonts under "
                              f"{where} cover all its characters; fewer than 3 fonts have "
                              + ", ".join(f"U+{ord(c):04X} {c!r} (in {counts[c]})" for c in rare)
                              + "; drop those characters or add fonts that have them (data.glyphs.font_dirs)")
        raise ProckdError(f"data.glyphs: only {len(fonts)} eligible font files under {where}; run "
                          "scripts/get_fonts.sh (Debian font packages) or set data.glyphs.font_dirs")
    held_n = G.heldout_count(len(fonts), g.heldout_fonts)
    heldout, pool = G.font_roles(fonts, held_n, g.font_seed)
    designs = None
    if g.train_designs or g.test_designs:  # a cross-domain column: roles first, then each role's designs
        designs = {"pool": {}, "heldout": {}}
        for role, fs in (("pool", pool), ("heldout", heldout)):
            for f in fs:
                d = G.font_design(f)
                designs[role][d] = designs[role].get(d, 0) + 1
        pool = [f for f in pool if not g.train_designs or G.font_design(f) in g.train_designs]
        heldout = [f for f in heldout if not g.test_designs or G.font_design(f) in g.test_designs]
        if not heldout or not pool:
            raise ProckdError(f"data.glyphs: train_designs={g.train_designs} / test_designs={g.test_designs} leave "
                              f"{len(pool)} pool and {len(heldout)} held-out fonts (designs found: {designs})")
    n_lab = g.train_fonts or len(pool)
    if n_lab > len(pool) or g.val_fonts >= n_lab or not heldout:
        raise ProckdError(f"data.glyphs: {len(fonts)} eligible fonts give {len(heldout)} held-out and {len(pool)} "
                          f"pool fonts; train_fonts={g.train_fonts} and val_fonts={g.val_fonts} do not fit "
                          "(need 1 <= val_fonts < train_fonts <= pool, and at least one held-out font)")
    labelled = pool[:n_lab]
    train_f, val_f = labelled[:n_lab - g.val_fonts], labelled[n_lab - g.val_fonts:]
    jit = G.Jitter(g.rotation, g.scale, g.shift)
    kw = dict(size=g.size, glyph_px=g.glyph_px, jitter=jit)
    xtr, ytr, _ = G.render_set(train_f, chars, g.copies, tag="train", **kw)
    u = cfg.unlabeled
    n_unl = u.glyph_fonts if u is not None else 0
    if g.val_extra_fonts:
        extra_val = pool[n_lab + n_unl:n_lab + n_unl + g.val_extra_fonts]
        if len(extra_val) < g.val_extra_fonts:
            raise ProckdError(f"data.glyphs.val_extra_fonts={g.val_extra_fonts}: only {len(extra_val)} pool fonts are "
                              f"left after the {n_lab} labelled and {n_unl} unlabelled ones; lower it")
        val_f = val_f + extra_val
    val = G.render_set(val_f, chars, g.copies, tag="train", **kw)[:2] if val_f else None
    xte, yte, _ = G.render_set(heldout, chars, g.test_copies, tag="test", **kw)
    tests = {"test": (xte, yte)}
    if g.handwriting_test:
        if chars != G.DIGITS:
            raise ProckdError("data.glyphs.handwriting_test needs charset 'digits'")
        from sklearn.datasets import load_digits

        d = load_digits()
        hw = torch.from_numpy(d.images / 16.0).float()[:, None]
        inner = g.glyph_px
        hw = F.interpolate(hw, size=(inner, inner), mode="bilinear", align_corners=False)
        pad = (g.size - inner) // 2
        hw = F.pad(hw, (pad, g.size - inner - pad, pad, g.size - inner - pad))
        tests["handwriting"] = ((hw.clamp(0, 1) * 255).round().to(torch.uint8).numpy(), d.target.astype(np.int64))
    info = {"fonts": {"eligible": len(fonts), "train": len(train_f), "val": len(val_f), "test": len(heldout)}}
    if designs is not None:
        info["fonts"]["designs"] = designs
    if u is not None and u.glyph_fonts:
        extra = pool[n_lab:n_lab + u.glyph_fonts]
        if len(extra) < u.glyph_fonts:
            raise ProckdError(f"data.unlabeled.glyph_fonts={u.glyph_fonts}: only {len(pool) - n_lab} pool fonts are "
                              f"left after the {n_lab} labelled ones; lower it or data.glyphs.train_fonts")
        info["unlabeled_images"] = G.render_set(extra, chars, u.copies, tag="unlabeled", **kw)[0]
        info["fonts"]["unlabeled"] = len(extra)
    return xtr, ytr, val, tests, list(chars), info


LOADERS = {"fashion_mnist": load_fashion_mnist, "digits": load_digits_arrays, "cifar100": load_cifar100}


def _rows(x, idx):
    """Rows ``idx`` (positions or a mask) of an image array, or the files at them when streaming."""
    if isinstance(x, ImageFiles):
        idx = np.asarray(idx)
        return x.subset(np.flatnonzero(idx) if idx.dtype == bool else idx)
    return x[idx]


def _images(x) -> torch.Tensor | ImageFiles:
    """An image array as a uint8 tensor (files stay files)."""
    return x if isinstance(x, ImageFiles) else torch.from_numpy(np.ascontiguousarray(x))


def _select(x, y, classes):
    keep = np.isin(y, classes)
    remap = {c: i for i, c in enumerate(classes)}
    return _rows(x, keep), np.asarray([remap[int(v)] for v in y[keep]], dtype=np.int64)


def long_tail_counts(n_max: int, k: int, imbalance: float) -> list[int]:
    """Exponential profile: ``n_i = n_max * imbalance^(-i/(k-1))`` (Cao et al. 2019 LT-CIFAR)."""
    if k == 1:
        return [n_max]
    return [max(1, int(n_max * imbalance ** (-i / (k - 1)))) for i in range(k)]


def _subsample(y: np.ndarray, counts: list[int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    idx = []
    for c, n in enumerate(counts):
        cand = np.flatnonzero(y == c)
        idx.append(np.sort(rng.permutation(cand)[:n]))
    return np.concatenate(idx)


def _unlabeled(cfg: DataConfig, extra_info: dict, train: ArrayDataset) -> ArrayDataset | None:
    """The unlabelled transfer set of ``cfg.unlabeled`` (labels :data:`IGNORE`): glyphs rendered in memory, or a
    folder's images left on disk (:class:`ImageFiles`, decoded by loader workers at the training images' size and
    channels), however many there are. Unreadable files are skipped, counted in ``info['unlabeled_skipped']``."""
    u = cfg.unlabeled
    if u is None:
        return None
    if u.glyph_fonts:
        x = torch.from_numpy(np.ascontiguousarray(extra_info.pop("unlabeled_images")))
        x = x[:u.limit] if u.limit else x
    else:
        c, h, w = (int(v) for v in train.images.shape[1:])
        if c not in (1, 3):
            raise ProckdError(f"data.unlabeled.dir: the training images have {c} channels; only 1 or 3 are supported")
        files, bad = unlabeled_files(u.dir, u.limit)
        if bad:
            extra_info["unlabeled_skipped"] = len(bad)
            extra_info["unlabeled_skipped_files"] = bad[:5]
        x = ImageFiles(files, (h, w), channels=c)
    return ArrayDataset(x, torch.full((len(x),), IGNORE, dtype=torch.int64), "unlabeled", cfg.num_workers)


class JoinedDataset:
    """Datasets one after the other, as one (what the teacher cache holds: the labelled items, then the unlabelled
    ones); each part in memory or streamed, batches in order."""

    def __init__(self, parts: list[ArrayDataset], name: str | None = None):
        self.parts = list(parts)
        self.name = name or "+".join(p.name for p in self.parts)
        self.labels = torch.cat([p.labels for p in self.parts])

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def streaming(self) -> bool:
        """Whether some part stays on disk."""
        return any(p.streaming for p in self.parts)

    def fingerprint(self) -> str:
        """SHA-1 of the parts' fingerprints, in order."""
        return hashlib.sha1("|".join(p.fingerprint() for p in self.parts).encode()).hexdigest()

    def take(self, idx) -> torch.Tensor:
        """uint8 images at positions ``idx`` of the joined order."""
        idx = torch.as_tensor(idx).reshape(-1)
        out, start = None, 0
        for p in self.parts:
            sel = ((idx >= start) & (idx < start + len(p))).nonzero().reshape(-1)
            if len(sel):
                x = p.take(idx[sel] - start)
                out = x.new_zeros((len(idx), *x.shape[1:])) if out is None else out
                out[sel] = x
            start += len(p)
        return out

    def batches(self, batch_size: int, generator: torch.Generator | None = None, indices=None):
        """(images float [0, 1], labels, joined indices) of every part in order (no shuffling: the cache's pass)."""
        if generator is not None or indices is not None:
            raise ValueError("JoinedDataset.batches reads in order only")
        start = 0
        for p in self.parts:
            for x, y, i in p.batches(batch_size):
                yield x, y, i + start
            start += len(p)


def _balanced_head(y: np.ndarray, limit: int) -> np.ndarray:
    k = int(y.max()) + 1
    per = max(1, limit // k)
    return np.sort(np.concatenate([np.flatnonzero(y == c)[:per] for c in range(k)]))


def _carve_val(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train positions, validation positions): a stratified split, at least one validation image per class
    that has two or more images."""
    rng = np.random.default_rng(seed + 7919)
    tr, va = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_val = int(round(len(idx) * fraction)) if len(idx) > 1 else 0
        n_val = min(max(n_val, 1 if len(idx) > 1 else 0), len(idx) - 1)
        va.append(idx[:n_val])
        tr.append(idx[n_val:])
    return np.sort(np.concatenate(tr)), np.sort(np.concatenate(va))


def shifted_copies(base: ArrayDataset, corruptions) -> dict[str, ArrayDataset]:
    """``base`` under each corruption (:func:`prockd.shifts.corrupt`, per image when it is left on disk), named
    ``<base name>_<kind><severity>``: a setting's shifted test sets, and the same shifts of its validation split."""
    out = {}
    for c in corruptions:
        nm = f"{base.name}_{c.kind}{c.severity}"
        shifted = base.images.with_corruption(c) if base.streaming else corrupt(base.images, c)
        out[nm] = ArrayDataset(shifted, base.labels, nm, base.num_workers)
    return out


def build_task(cfg: DataConfig) -> Task:
    """Load and shape the task described by ``cfg``."""
    raw_val, extra_info = None, {}
    if cfg.name == "imagefolder":
        xtr, ytr, raw_val, raw_tests, names, extra_info = load_imagefolder(cfg)
    elif cfg.name == "glyphs":
        xtr, ytr, raw_val, raw_tests, names, extra_info = load_glyphs(cfg)
    elif cfg.name in LOADERS:
        xtr, ytr, xte, yte, names = LOADERS[cfg.name](cfg)
        raw_tests = {"test": (xte, yte)}
    else:
        raise ProckdError(f"data.name '{cfg.name}' has no loader")
    classes = cfg.classes if cfg.classes is not None else list(range(len(names)))
    bad = [c for c in classes if not 0 <= c < len(names)]
    if bad:
        raise ProckdError(f"data.classes {bad} are outside 0..{len(names) - 1} for {cfg.name}")
    if len(set(classes)) != len(classes):
        raise ProckdError(f"data.classes has duplicates: {classes}")
    xtr, ytr = _select(xtr, ytr, classes)
    k = len(classes)
    have = [int((ytr == c).sum()) for c in range(k)]
    n_max = min(have) if cfg.labels_per_class is None else min(cfg.labels_per_class, min(have))
    counts = long_tail_counts(n_max, k, cfg.imbalance) if cfg.imbalance else (
        [n_max] * k if cfg.labels_per_class is not None else have)
    sel = _subsample(ytr, counts, cfg.subset_seed)
    nw = cfg.num_workers
    val = None
    if raw_val is not None:
        xva, yva = _select(*raw_val, classes)
        val = ArrayDataset(_images(xva), torch.from_numpy(yva), "val", nw)
    elif cfg.val_fraction:
        tr_pos, va_pos = _carve_val(ytr[sel], cfg.val_fraction, cfg.subset_seed)
        val = ArrayDataset(_images(_rows(xtr, sel[va_pos])), torch.from_numpy(ytr[sel][va_pos]), "val", nw)
        sel = sel[tr_pos]
    train = ArrayDataset(_images(_rows(xtr, sel)), torch.from_numpy(ytr[sel]), "train", nw)
    tests = {}
    for tname, (xte, yte) in raw_tests.items():
        xte, yte = _select(xte, yte, classes)
        if cfg.test_limit:
            keep = _balanced_head(yte, cfg.test_limit)
            xte, yte = _rows(xte, keep), yte[keep]
        base = ArrayDataset(_images(xte), torch.from_numpy(yte), tname, nw)
        tests[tname] = base
        tests.update(shifted_copies(base, cfg.corruptions))
    unlabeled = _unlabeled(cfg, extra_info, train)
    info = {"train_counts": [int(v) for v in np.bincount(train.labels.numpy(), minlength=k)], **extra_info}
    if val is not None:
        info["val_counts"] = [int(v) for v in np.bincount(val.labels.numpy(), minlength=k)]
    if unlabeled is not None:
        info["unlabeled_count"] = len(unlabeled)
    return Task(train, tests, [names[c] for c in classes], info=info, val=val, unlabeled=unlabeled)
