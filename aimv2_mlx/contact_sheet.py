"""A self-contained HTML contact sheet of results: thumbnails inlined as JPEG data URIs, with
scores and paths, so the one file opens in any browser, anywhere, without the images."""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

from PIL import Image

from .folders import atomic_write
from .images import ImageError, open_image
from .index import Index
from .search import Result

THUMBNAIL = 192  # longest side, pixels

STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1.5em; background: #fafafa; color: #222; }
h1 { font-size: 1.2em; } h2 { font-size: 1em; margin-top: 2em; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; width: 200px; background: #fff; padding: 4px; border: 1px solid #ddd; }
img { display: block; max-width: 192px; max-height: 192px; margin: auto; }
figcaption { font-size: 12px; word-break: break-all; }
.missing { height: 96px; display: flex; align-items: center; justify-content: center; color: #a00; }
"""


def write_contact_sheet(
    out: str | os.PathLike, index: Index, groups: list[tuple[str, list[Result]]], title: str
) -> Path:
    """Write `out` (atomically): a titled section per (heading, results) group."""
    out = Path(out).expanduser()
    sections = []
    for heading, results in groups:
        figures = "".join(_figure(index.files[r.row], r) for r in results)
        sections.append(
            (f"<h2>{html.escape(heading)}</h2>" if heading else "")
            + f'<div class="grid">{figures}</div>'
        )
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>\n"
    )
    atomic_write(out, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return out


def _figure(record, result: Result) -> str:
    caption = f"{result.score:.4f} · {html.escape(result.path)}"
    try:
        with record.item().open() as fh:
            image = open_image(fh, name=result.path).convert("RGB")
        image.thumbnail((THUMBNAIL, THUMBNAIL), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85)
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        picture = f'<img src="data:image/jpeg;base64,{data}" alt="{html.escape(result.path)}">'
    except (
        ImageError,
        OSError,
    ) as exc:  # gone or broken since it was indexed: say so, keep the page
        picture = f'<div class="missing">cannot show: {html.escape(str(exc))}</div>'
    return f"<figure>{picture}<figcaption>{caption}</figcaption></figure>"
