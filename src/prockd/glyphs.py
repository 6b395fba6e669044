"""Rendered glyphs over real typefaces: the embedded cross-task benchmark's data (offline, real content).

Debian's font packages hold hundreds of real typefaces (``scripts/get_fonts.sh`` installs them). A font
is *eligible* when its character map covers every character asked for (digits and the 52 Latin
letters by default) and it is not a symbol / dingbat / math font whose code points carry other shapes.
Fonts are ordered by a deterministic shuffle (``font_seed``) of their sorted paths and given roles by
position: the first ``heldout_fonts`` of them are *held out* (test fonts, never in any training set, the
teacher's included); the rest form the *pool* that training sets draw from.

Each image is one character in one font, cropped to its ink, scaled so its longer side is ``glyph_px``
and centred on a ``size x size`` canvas (white ink on black, uint8), then jittered by a random affine
map (rotation, scale, shift) drawn from a generator seeded by (font, character, copy): the same call
always renders the same pixels. Rendered sets are cached as ``.npz`` files written atomically.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fontTools.ttLib import TTFont, TTLibError
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from prockd.core.io import sweep_orphans
from prockd.errors import ProckdError

DIGITS = "0123456789"
UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
LOWER = "abcdefghijklmnopqrstuvwxyz"
CHARSETS = {"digits": DIGITS, "letters": UPPER + LOWER, "upper": UPPER, "lower": LOWER}
FONT_DIRS = ["/usr/share/fonts/truetype", "/usr/share/fonts/opentype"]
_EXCLUDE = ("symbol", "dingbat", "math", "emoji", "icon", "awesome", "z003", "d050000l", "cursor", "braille")
_COVER = DIGITS + UPPER + LOWER


def charset(name: str) -> str:
    """The characters of a named set (digits, letters, upper, lower) or the string itself."""
    chars = CHARSETS.get(name, name)
    if not chars or len(set(chars)) != len(chars):
        raise ProckdError(f"glyph charset '{name}' must be one of {sorted(CHARSETS)} or a string of distinct characters")
    return chars


def _cmap(path: Path) -> set[int]:
    """The code points a font file maps (empty for an unreadable file)."""
    try:
        with TTFont(str(path), lazy=True, fontNumber=0) as f:
            return set((f.getBestCmap() or {}).keys())
    except (TTLibError, OSError, KeyError, AssertionError, ValueError):
        return set()


def _covers(path: Path, chars: str) -> bool:
    cmap = _cmap(path)
    return all(ord(c) in cmap for c in chars)


DESIGNS = ("upright", "italic", "mono", "script")  # families of design a font belongs to (font_design)
_SCRIPT_WORDS = ("script", "chorus", "chancery", "hand", "brush", "calligr", "cursive")


@functools.lru_cache(maxsize=4096)
def font_design(path: Path) -> str:
    """The family of design of a font file, read from its tables (fontTools): ``mono`` when ``i``, ``l``, ``m`` and
    ``W`` advance alike (typewriter and code faces), ``script`` when its family name says so (script, chancery,
    handwriting, brush ...), ``italic`` when it slants (a non-zero ``post.italicAngle``, the OS/2 or ``head``
    italic bit, or an italic / oblique / slanted style name), else ``upright`` (roman text and display faces).
    Test fonts of one design and training fonts of another make a cross-domain column (``data.glyphs.train_designs``
    / ``test_designs``), the analogue of Office-Home's Real -> Art."""
    quiet = logging.getLogger("fontTools")  # a font's odd 'head' timestamps are not the user's concern
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with TTFont(str(path), lazy=True, fontNumber=0) as f:
            cmap = f.getBestCmap() or {}
            widths = {f["hmtx"][cmap[ord(c)]][0] for c in "ilmW" if ord(c) in cmap}
            names = " ".join(str(r) for r in f["name"].names if r.nameID in (1, 2, 4, 16, 17)).lower()
            angle = float(getattr(f["post"], "italicAngle", 0) or 0) if "post" in f else 0.0
            italic_bit = bool(f["OS/2"].fsSelection & 1) if "OS/2" in f else False
            italic_bit = italic_bit or (bool(f["head"].macStyle & 2) if "head" in f else False)
    except (TTLibError, OSError, KeyError, AssertionError, ValueError, AttributeError) as e:
        raise ProckdError(f"font file {path} is unreadable ({e}); remove it or set data.glyphs.font_dirs") from None
    finally:
        quiet.setLevel(level)
    if len(widths) == 1:
        return "mono"
    if any(w in names for w in _SCRIPT_WORDS):
        return "script"
    if angle != 0 or italic_bit or any(w in names for w in ("italic", "oblique", "slanted", "kursiv")):
        return "italic"
    return "upright"


def coverage(fonts: list[Path], chars: str) -> dict[str, int]:
    """How many of ``fonts`` map each character of ``chars``."""
    cmaps = [_cmap(f) for f in fonts]
    return {c: sum(ord(c) in m for m in cmaps) for c in chars}


def find_fonts(dirs: list[str] | None = None, chars: str = _COVER) -> list[Path]:
    """Eligible font files (``.ttf`` / ``.otf``) under ``dirs``, sorted by path, one per distinct file content
    (memoised per process, keyed by the folders' listings)."""
    return [p for p, _ in _found(dirs, chars)]


def _found(dirs: list[str] | None, chars: str) -> tuple[tuple[Path, str], ...]:
    """(path, SHA-1) of the eligible fonts under ``dirs`` (:func:`find_fonts`)."""
    dirs = tuple(dirs or FONT_DIRS)
    listing = tuple((d, tuple(sorted(str(p) for p in Path(d).expanduser().rglob("*") if p.is_file())))
                    for d in dirs if Path(d).expanduser().is_dir())
    return _find_fonts(listing, chars)


@functools.lru_cache(maxsize=16)
def _find_fonts(listing: tuple, chars: str) -> tuple[tuple[Path, str], ...]:
    found, seen = [], set()
    for d, _ in listing:
        root = Path(d).expanduser()
        if not root.is_dir():
            continue
        for p in sorted(root.rglob("*")):
            if p.suffix.lower() not in (".ttf", ".otf") or any(x in p.name.lower() for x in _EXCLUDE):
                continue
            digest = font_digest(p)
            if digest in seen or not _covers(p, chars):
                continue
            seen.add(digest)
            found.append((p, digest))
    return tuple(found)


def _eligible_chars(chars: str) -> str:
    return _COVER + "".join(c for c in chars if c not in _COVER)


def eligible_fonts(dirs: list[str] | None, chars: str) -> list[Path]:
    """The fonts a glyph data set of ``chars`` draws its roles from: those covering digits, both Latin cases
    and every character of ``chars``."""
    return find_fonts(dirs, _eligible_chars(chars))


def eligible_font_digests(dirs: list[str] | None, chars: str) -> list[str]:
    """SHA-1 of each of :func:`eligible_fonts`, in the same order (computed once with them)."""
    return [d for _, d in _found(dirs, _eligible_chars(chars))]


def found_font_digests(dirs: list[str] | None = None) -> list[str]:
    """SHA-1 of each of :func:`find_fonts`' fonts (default coverage), in the same order: what the detection canvases'
    font roles are drawn from."""
    return [d for _, d in _found(dirs, _COVER)]


def font_digest(path: Path) -> str:
    """SHA-1 of a font file's bytes: its identity whatever its path (duplicates, other machines)."""
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def font_roles(fonts: list[Path], heldout: int, seed: int) -> tuple[list[Path], list[Path]]:
    """(held-out fonts, pool fonts) after a deterministic shuffle of the sorted font list."""
    order = np.random.default_rng(seed).permutation(len(fonts))
    shuffled = [fonts[i] for i in order]
    return shuffled[:heldout], shuffled[heldout:]


@dataclass(frozen=True)
class Jitter:
    """Random affine jitter: rotation in degrees, relative scale and relative shift (uniform, symmetric)."""

    rotation: float = 11.0
    scale: float = 0.15
    shift: float = 0.10


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha1(json.dumps(parts).encode()).digest()[:8], "little")


def render_glyph(font, ch: str, size: int = 28, glyph_px: int = 22, jitter: Jitter | None = None,
                 rng: np.random.Generator | None = None, oversample: int = 4) -> np.ndarray:
    """One character as a ``size x size`` uint8 image (white on black), ink-cropped, scaled, centred, jittered."""
    big = size * oversample
    canvas = Image.new("L", (big * 6, big * 6), 0)  # ample room: no ink is clipped before the crop
    ImageDraw.Draw(canvas).text((big * 2, big * 2), ch, fill=255, font=font)
    box = canvas.getbbox()
    if box is None:
        return np.zeros((size, size), np.uint8)
    ink = canvas.crop(box)
    w, h = ink.size
    s = glyph_px * oversample / max(w, h)
    rot, sc, dx, dy = 0.0, 1.0, 0.0, 0.0
    if jitter is not None and rng is not None:
        rot = rng.uniform(-jitter.rotation, jitter.rotation)
        sc = 1.0 + rng.uniform(-jitter.scale, jitter.scale)
        dx, dy = (rng.uniform(-jitter.shift, jitter.shift, 2) * big).tolist()
    s *= sc
    ink = ink.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)
    if rot:
        ink = ink.rotate(rot, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=0)
    out = Image.new("L", (big, big), 0)
    out.paste(ink, (round((big - ink.size[0]) / 2 + dx), round((big - ink.size[1]) / 2 + dy)))
    return np.asarray(out.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


def render_set(fonts: list[Path], chars: str, copies: int, size: int = 28, glyph_px: int = 22,
               jitter: Jitter | None = Jitter(), tag: str = "", cache_dir: str | Path | None = None,
               log=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images ``N x 1 x size x size`` uint8, labels ``N`` (index into ``chars``), font index ``N``) for every
    font x character x copy, cached on disk (keyed by font files, characters, copies and rendering)."""
    key_src = {"v": 1, "fonts": [str(f) for f in fonts], "sizes": [f.stat().st_size for f in fonts],
               "chars": chars, "copies": copies, "size": size, "glyph_px": glyph_px,
               "jitter": None if jitter is None else jitter.__dict__, "tag": tag}
    key = hashlib.sha1(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache_dir or "~/.cache/prockd/data/glyphs").expanduser() / f"{key}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                return z["images"], z["labels"], z["fonts"]
        except (OSError, ValueError, KeyError, EOFError):
            path.unlink(missing_ok=True)  # corrupted: render again
    if log:
        log(f"rendering {len(fonts)} fonts x {len(chars)} characters x {copies} copies -> {path}")
    n = len(fonts) * len(chars) * copies
    images = np.zeros((n, 1, size, size), np.uint8)
    labels = np.zeros(n, np.int64)
    font_idx = np.zeros(n, np.int64)
    i = 0

    bar = tqdm(fonts, desc=f"rendering {len(chars)} characters x {copies} in {len(fonts)} fonts", unit="font",
               disable=n < 2000, leave=False)  # a first run renders ~20,000 glyphs: show it
    for fi, fp in enumerate(bar):
        try:
            font = ImageFont.truetype(str(fp), size * 4 * 2)
        except OSError as e:
            raise ProckdError(f"font file {fp} is unreadable ({e}); remove it or pick other font_dirs") from None
        for ci, ch in enumerate(chars):
            for k in range(copies):
                rng = np.random.default_rng(_seed(fp.name, ch, k, tag))
                images[i, 0] = render_glyph(font, ch, size, glyph_px, jitter, rng)
                labels[i], font_idx[i] = ci, fi
                i += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_orphans(path.parent)  # a killed render's half-written file does not survive this start
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.npz")
    np.savez(tmp, images=images, labels=labels, fonts=font_idx)
    os.replace(tmp, path)
    return images, labels, font_idx


def heldout_count(n_fonts: int, heldout: float | int) -> int:
    """Number of held-out fonts: an absolute count, or a fraction of the eligible fonts."""
    if isinstance(heldout, float) and heldout < 1:
        return int(math.floor(n_fonts * heldout))
    return int(heldout)
