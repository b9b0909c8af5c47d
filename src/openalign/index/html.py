"""A self-contained HTML page of search results: thumbnails inlined as base64 JPEG, so the file can be moved."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

_STYLE = """
body { font-family: sans-serif; margin: 1em; }
.hits { display: flex; flex-wrap: wrap; gap: 8px; }
figure { margin: 0; width: %(size)dpx; font-size: 12px; word-break: break-all; }
figure img { max-width: %(size)dpx; max-height: %(size)dpx; display: block; }
.missing { width: %(size)dpx; height: %(size)dpx; background: #ddd; display: flex; align-items: center;
           justify-content: center; color: #555; }
"""


def thumbnail_data_uri(source, size: int = 160) -> str | None:
    """A data: URI holding a JPEG thumbnail of the image at source, or None when it cannot be read.

    The image goes through processing.images.load_image, the one guarded door: a decompression bomb, a FIFO or
    a device is refused there, and shows as a grey box like a missing or undecodable file.
    """
    from openalign.errors import ImageLoadError
    from openalign.processing.images import load_image

    try:
        image = load_image(source)
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
    except (ImageLoadError, OSError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(hit: dict, size: int) -> str:
    source = hit.get("source")
    uri = thumbnail_data_uri(source, size) if source else None
    label = hit.get("caption") or ""
    picture = (
        f'<img src="{uri}" alt="{html.escape(str(source))}">'
        if uri
        else f'<div class="missing">{html.escape(label[:60] or "no image")}</div>'
    )
    caption = f"{hit.get('score', float('nan')):.4f} {html.escape(str(source or label))}"
    return f"<figure>{picture}<figcaption>{caption}</figcaption></figure>"


def write_results_html(
    queries: Sequence[str],
    results: Sequence[Sequence[dict]],
    path: str | Path,
    *,
    thumbnail_size: int = 160,
    title: str = "openalign search results",
) -> Path:
    """Write one section per query (its label, then its hits with thumbnail, score and source) to path.

    results is what Index.search returns: per query, metadata dicts with "source", "caption" and "score".
    """
    sections = []
    for query, hits in zip(queries, results):
        figures = "\n".join(_figure(hit, thumbnail_size) for hit in hits)
        sections.append(f'<h2>{html.escape(str(query))}</h2>\n<div class="hits">\n{figures}\n</div>')
    page = (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE % {'size': thumbnail_size}}</style></head>\n<body>\n<h1>{html.escape(title)}</h1>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
