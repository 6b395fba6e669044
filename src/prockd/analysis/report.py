"""The index page of a folder of analysis figures (both tasks)."""
from __future__ import annotations

import html
from pathlib import Path

from prockd.core.io import atomic_write_text


def write_index(out: Path, title: str, sections: list[tuple[str, str | None, str]]) -> Path:
    """One HTML page with every figure (``(heading, png name or None, caption)``)."""
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1400px;margin:auto}img{max-width:100%}"
             "pre{background:#f4f4f4;padding:6px}</style>", f"<h1>{html.escape(title)}</h1>"]
    for head, png, caption in sections:
        parts.append(f"<h2>{html.escape(head)}</h2>")
        if png:
            parts.append(f"<img src='{html.escape(png)}' alt='{html.escape(head)}'>")
        parts.append(f"<pre>{html.escape(caption)}</pre>")
    path = out / "index.html"
    atomic_write_text(path, "\n".join(parts) + "\n")
    return path
