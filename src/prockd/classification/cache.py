"""Frozen-teacher feature cache: computed once per deterministic teacher view, kept on disk, read row by row.

The key hashes the teacher (name, kwargs, weights, taps, fusion grid, transform), the data (images and
labels) and the storage dtype: any change gives a new key. A cache directory is built under a temporary
name and renamed into place only when complete; ``meta.json`` records each array's shape and a digest,
so a partial or corrupted cache is detected and rebuilt.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import torch

from prockd.core.io import atomic_write_json, sweep_orphans, tmp_name
from prockd.errors import ProckdError

VERSION = 2
_FULL_HASH_LIMIT = 256 << 20


def reserve_blocks(path: Path) -> None:
    """Allocate a freshly created memory-mapped file's disk blocks now.

    ``open_memmap`` makes a sparse file: on a full disk the first write into an unbacked page kills the
    process with SIGBUS, far from the cause. Reserving the blocks up front turns that into an error that
    names the cache folder and the room it needs (``cache.dir`` moves it).
    """
    size = path.stat().st_size
    try:
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, size)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ProckdError(f"teacher feature cache: no room for {size / 2**20:.1f} MiB in {path.parent} "
                              f"({e.strerror}); free disk space there or set cache.dir to a folder on a disk "
                              "with room (or cache.enabled=false to run the teacher live)") from e
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem that cannot reserve: write as before
            raise


def tensor_digest(sd: dict[str, torch.Tensor]) -> str:
    """SHA-1 over a state dict's names and values."""
    h = hashlib.sha1()
    for k, v in sd.items():
        h.update(k.encode())
        h.update(v.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """SHA-1 of a file (sampled 1 MiB blocks beyond 256 MiB, plus the size)."""
    h = hashlib.sha1()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if size <= _FULL_HASH_LIMIT:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            for i in range(64):
                f.seek(int((size - (1 << 20)) * i / 63))
                h.update(f.read(1 << 20))
    return h.hexdigest()


class TeacherCache:
    """Teacher features for every item of a dataset, keyed as described in the module docstring."""

    def __init__(self, teacher, dataset, root: str | Path, dtype: str = "float16", batch_size: int = 128,
                 device: torch.device | str = "cpu", log=print):
        self.teacher = teacher
        self.dataset = dataset
        self.dtype = dtype
        self.batch_size = batch_size
        self.device = device
        self.log = log
        ident = {"version": VERSION, "teacher": teacher.describe(),
                 "weights": tensor_digest(teacher.model.state_dict()),
                 "data": dataset.fingerprint(), "n": len(dataset), "dtype": dtype}
        self.key = hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:20]
        self.dir = Path(root).expanduser() / self.key
        self.files: dict[str, _RowFile] = {}
        self.built = False

    def _valid(self) -> bool:
        meta_p = self.dir / "meta.json"
        if not meta_p.is_file():
            return False
        try:
            meta = json.loads(meta_p.read_text())
            for name, info in meta["arrays"].items():
                p = self.dir / f"{name}.npy"
                if not p.is_file() or file_digest(p) != info["digest"]:
                    return False
                arr = np.load(p, mmap_mode="r")
                if list(arr.shape) != info["shape"]:
                    return False
        except (OSError, ValueError, KeyError):
            return False
        return True

    def prepare(self) -> "TeacherCache":
        """Open the cache, building (or rebuilding a partial / corrupted one) when needed."""
        if self.dir.exists() and not self._valid():
            self.log(f"teacher cache {self.dir} is incomplete or corrupted: rebuilding")
            shutil.rmtree(self.dir, ignore_errors=True)
        if not self.dir.exists():
            self._build()
            self.built = True
        meta = json.loads((self.dir / "meta.json").read_text())
        self.files = {name: _RowFile.open(self.dir / f"{name}.npy") for name in meta["arrays"]}
        return self

    @torch.no_grad()
    def _build(self) -> None:
        tmp = self.dir.with_name(tmp_name(self.dir.name, host=True))  # nodes may share the dir
        sweep_orphans(self.dir.parent, self.log)  # a killed build's half-written folder does not survive this start
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        np_dtype = np.float16 if self.dtype == "float16" else np.float32
        files: dict[str, _RowFile] = {}
        n = len(self.dataset)
        try:
            for images, _, idx in self.dataset.batches(self.batch_size):
                feats = self.teacher.extract(images.to(self.device))
                for name, t in feats.items():
                    if name not in files:
                        files[name] = _RowFile.create(tmp / f"{name}.npy", np_dtype, (n, *t.shape[1:]))
                    files[name].write(idx.numpy(), t.cpu().numpy().astype(np_dtype))
            meta = {"key": self.key, "n": n, "arrays": {}}
            for name, f in files.items():
                f.close()
                meta["arrays"][name] = {"shape": list(f.shape), "digest": file_digest(tmp / f"{name}.npy")}
            atomic_write_json(tmp / "meta.json", meta)
            try:
                os.rename(tmp, self.dir)
            except OSError:  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            for f in files.values():
                f.close()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.log(f"teacher cache built: {self.dir} ({n} items)")

    def get(self, indices: torch.Tensor, device=None) -> dict[str, torch.Tensor]:
        """Features of the given dataset indices as float32 tensors (rows read from the files: what stays in this
        process's memory is the batch, however large the cache)."""
        idx = np.asarray(indices).reshape(-1)
        self.rows_read = getattr(self, "rows_read", 0) + len(idx)  # teacher forwards this run read instead of ran
        return {name: torch.from_numpy(f.read(idx).astype(np.float32)).to(device or "cpu")
                for name, f in self.files.items()}


class _RowFile:
    """One ``.npy`` array of a cache, written and read row by row with positioned reads and writes (``pread`` /
    ``pwrite``) rather than a memory map: the pages stay in the page cache, not in the process's resident memory,
    so a run's peak RSS does not grow with the number of cached items."""

    def __init__(self, path: Path, fd: int, dtype, shape: tuple[int, ...], offset: int):
        self.path, self.fd, self.dtype, self.shape, self.offset = path, fd, np.dtype(dtype), tuple(shape), offset
        self.row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    @classmethod
    def create(cls, path: Path, dtype, shape: tuple[int, ...]) -> "_RowFile":
        """A new array file of ``shape`` (header written, blocks reserved)."""
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                  "shape": tuple(int(v) for v in shape)}
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            offset = f.tell()
            f.truncate(offset + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
        reserve_blocks(path)
        return cls(path, os.open(path, os.O_RDWR), dtype, shape, offset)

    @classmethod
    def open(cls, path: Path) -> "_RowFile":
        """An existing array file, for reading."""
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            if fortran:
                raise ValueError(f"{path}: Fortran order")
            offset = f.tell()
        return cls(path, os.open(path, os.O_RDONLY), dtype, shape, offset)

    def write(self, idx: np.ndarray, rows: np.ndarray) -> None:
        """Rows at positions ``idx`` (one write per contiguous run)."""
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        start = 0
        while start < len(idx):
            end = start + 1
            while end < len(idx) and idx[end] == idx[end - 1] + 1:
                end += 1
            data, pos = rows[start:end].tobytes(), self.offset + int(idx[start]) * self.row
            while data:
                k = os.pwrite(self.fd, data, pos)
                data, pos = data[k:], pos + k
            start = end

    def read(self, idx: np.ndarray) -> np.ndarray:
        """Rows at positions ``idx``."""
        out = np.empty((len(idx), *self.shape[1:]), dtype=self.dtype)
        flat = out.reshape(len(idx), -1).view(np.uint8)
        for k, i in enumerate(idx):
            if not 0 <= int(i) < self.shape[0]:
                raise IndexError(f"teacher cache {self.path}: row {int(i)} outside 0..{self.shape[0] - 1}")
            got = os.preadv(self.fd, [flat[k]], self.offset + int(i) * self.row)
            if got != self.row:
                raise ProckdError(f"teacher cache {self.path} is truncated; delete its folder to rebuild it")
        return out

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):
        self.close()
