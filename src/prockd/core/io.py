"""Atomic file writes (nothing half-written is ever left behind) and the run-directory lock."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

import torch

from PIL import Image, UnidentifiedImageError

from prockd.errors import ProckdError


_TMP = re.compile(r"\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)(?:[-.][^/]*)?$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def tmp_name(name: str, host: bool = False) -> str:
    """The name of a temporary that will become ``name``: ``<name>.tmp-[<host>-]<pid>``, so that :func:`sweep_orphans`
    can tell a killed writer's leftovers (its process gone) from a live writer's."""
    return f"{name}.tmp-{socket.gethostname() + '-' if host else ''}{os.getpid()}"


def sweep_orphans(folder: str | Path, log=None) -> int:
    """Remove what killed processes left half-written in ``folder``: every entry named ``...tmp-[<host>-]<pid>...``
    (:func:`tmp_name`, the atomic writes' temporaries) whose process is gone from this host (another host's, on a
    shared disk, are left to it). Every cache calls it before building, so an interrupted build never survives the
    next start. Returns how many entries were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    me, removed = socket.gethostname(), 0
    for p in folder.iterdir():
        m = _TMP.search(p.name)
        if not m or int(m["pid"]) == os.getpid() or (m["host"] and m["host"] != me) or _alive(int(m["pid"])):
            continue
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        removed += 1
        if log is not None:
            log(f"removed {p} ({size / 2**20:.1f} MB), left half-written by process {m['pid']}, which is gone")
    return removed


def _atomic(path: str | Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_orphans(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{tmp_name(path.name, host=True)}-")  # nodes may share it
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same directory, then rename over ``path``."""
    _atomic(path, lambda f: torch.save(obj, f))


def atomic_save_figure(fig, path: str | Path, dpi: int = 100) -> None:
    """Save a matplotlib figure as a PNG atomically (``fig.savefig`` into the temporary, then the rename)."""
    _atomic(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text atomically."""
    _atomic(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: str | Path, obj) -> None:
    """Write JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


LOCK_NAME = ".lock"


@contextlib.contextmanager
def run_lock(run_dir: str | Path, held: bool = True):
    """Hold an exclusive lock on a run directory for the duration of the block: one process owns a run
    directory (under torchrun, rank 0: ``held`` is False on the other ranks). The lock is ``fcntl.flock`` on
    ``<run_dir>/.lock``, which holds the owner's PID; the kernel releases it when the owner exits, killed or not,
    so a stale file never blocks a resume. A second process gets a :class:`~prockd.errors.ProckdError` naming
    the directory and the holder's PID before it writes anything else."""
    if not held:
        yield
        return
    import fcntl

    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        file = next((p for p in (run_dir, *run_dir.parents) if p.exists() and not p.is_dir()), run_dir)
        raise ProckdError(f"run directory {run_dir}: {file} is a file, not a folder; choose another out "
                          "(a folder, new or holding a run to resume)") from None
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ProckdError(f"run directory {run_dir} is in use by process {holder} (another run writes there); "
                          "wait for it to finish or choose another out") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def shared_build_lock(path: str | Path):
    """Wait for, then hold, an exclusive ``fcntl.flock`` on the file ``path`` for the block: the processes that need
    one shared artefact (a fine-tuned teacher a comparison's seeds share) build it once, the others wait and read it.
    The kernel releases the lock when its holder exits, killed or not."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")  # files read as images


def unlabeled_files(path: str, limit: int | None = None) -> tuple[list[str], list[str]]:
    """(readable image files, unreadable ones) under ``path``: recursively, sorted, by suffix
    (:data:`IMAGE_SUFFIXES`), at most ``limit`` readable ones. Each file's header is opened (not its pixels): a
    file that is not an image (or whose header is broken) is skipped and listed, never met mid-epoch."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ProckdError(f"data.unlabeled.dir: folder not found: {root}")
    good, bad = [], []
    for f in sorted(str(p) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        if limit and len(good) >= limit:
            break
        try:
            with Image.open(f):
                pass
            good.append(f)
        except (OSError, UnidentifiedImageError, ValueError):
            bad.append(f)
    if not good:
        raise ProckdError(f"data.unlabeled.dir: no readable image files ({', '.join(IMAGE_SUFFIXES)}) under {root}"
                          + (f" ({len(bad)} unreadable, e.g. {bad[0]})" if bad else ""))
    return good, bad
